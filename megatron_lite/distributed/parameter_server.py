"""Data parallelism through a parameter server (--data-parallel-mode parameter-server).

The alternative to the ring all-reduce of data_parallel.py, as the early large-scale trainers
did it: in each data-parallel group the dp-index-0 rank is the *server* and every rank is a
*worker* (the server computes too, colocated with a worker as a server sharing its node). Per
optimizer step, after the last microbatch's backward:

  1. every other worker sends its fp32 grad buffer (the flat `grad_data`) to the server;
  2. the server adds them to its own and divides by dp: the mean the all-reduce gives;
  3. the server measures (and clips) the grad norm and sends it to each worker, for the log and
     the non-finite check every rank takes together;
  4. the server steps AdamW and sends the updated parameters to each worker, which receives them
     straight into its parameters (they are views of one flat buffer, `param_data`).

Only servers hold optimizer state: a worker builds no Adam moments and no fp32 main weights.
The servers of all groups form the model-parallel group ("mp" = tp x pp at dp index 0), so the
grad norm sums over them exactly as in all-reduce mode. The price is traffic: the server's
link carries (dp - 1) x the grads in and (dp - 1) x the parameters out per step, where a ring
all-reduce sends 2 (dp - 1) / dp x the grads from every rank, so the server becomes the
bottleneck as workers are added (step_bytes below; docs/parallelism.md).

Every transfer is a point-to-point send of comm.py, metered as "send" on the "dp" group.
Checkpoints are those of all-reduce mode: the first replica (the server) writes the model and
the optimizer state; workers, holding none, write nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import send_recv
from megatron_lite.config import TrainConfig
from megatron_lite.distributed.data_parallel import DataParallelGrads
from megatron_lite.optimizer.optimizer import LocalOptimizer, main_param

GROUP = "dp"  # the replicas of one server: parameter-server mode refuses cp > 1, so dp x cp is dp
# Point-to-point tags, apart from the pipeline's (1, 2) and context parallelism's (3, 4): all of
# them use the default group.
GRAD_TAG, NORM_TAG, PARAM_TAG = 5, 6, 7
NORM_DTYPE = torch.float64  # the grad norm as the server logs it, so every rank logs the same float
GRAD_NORM_BYTES = torch.finfo(NORM_DTYPE).bits // 8


def step_bytes(grad_bytes: int, param_bytes: int, dp: int, server: bool) -> int:
    """Bytes one rank sends per optimizer step in parameter-server mode ("send" on "dp").

    `grad_bytes`: this rank's fp32 grad buffers (with their bucket padding); `param_bytes`: its
    flat parameter buffers, in the parameters' dtype; `dp`: the data-parallel size. A worker
    sends its grads once; the server sends each of the dp - 1 workers the grad norm (a float64,
    GRAD_NORM_BYTES) and the parameters. dp 1: nothing. The planner (megatron_lite/planner/)
    counts a layout's traffic with this function: keep its name and signature.
    """
    if dp == 1:
        return 0
    return (dp - 1) * (param_bytes + GRAD_NORM_BYTES) if server else grad_bytes


def _server_and_workers() -> tuple[int, list[int]]:
    """Global ranks of this rank's server and of the other workers of its data-parallel group."""
    members = parallel_state.get_grid().members(GROUP)
    return members[0], members[1:]


def is_server() -> bool:
    """Whether this rank is the server of its data-parallel group (its dp index is 0)."""
    return parallel_state.get_grid().index(GROUP) == 0


class ParameterServerGrads(DataParallelGrads):
    """The same grad buffer as all-reduce mode, reduced once per step at the server instead of in
    buckets during backward; the parameters are views of one flat buffer so that the server sends
    them, and a worker receives them, in one message."""

    def __init__(self, module: nn.Module, bucket_size: int, **kwargs) -> None:
        super().__init__(module, bucket_size, flat_params=True, **kwargs)

    def start_grad_sync_on_backward(self) -> None:
        """No bucket reductions during backward: the grads travel whole, after it."""

    def finish_grad_sync(self) -> None:
        """Workers send their grads; the server receives them one worker at a time into one scratch
        buffer (memory for one more copy, not dp - 1), adds them to its own and divides by dp."""
        server, workers = _server_and_workers()
        if not is_server():
            send_recv([("send", self.grad_data, server, GRAD_TAG)], GROUP)
            return
        received = torch.empty_like(self.grad_data) if workers else None
        for worker in workers:
            send_recv([("recv", received, worker, GRAD_TAG)], GROUP)
            self.grad_data.add_(received)
        if self.divisor > 1:
            self.grad_data.div_(self.divisor)


class ParameterServerOptimizer(LocalOptimizer):
    """AdamW on the server over all of its parameters, nothing on a worker (an AdamW over no
    tensors, so the loop's lr updates and checkpoints need no case of their own); the grad norm
    and the updated parameters go from the server to its workers."""

    def __init__(self, chunks: list[nn.Module], buffers: list[ParameterServerGrads], cfg: TrainConfig) -> None:
        self.buffers, self.server = buffers, is_server()
        self.tensors = [main_param(p, p.main_grad, p, offload=cfg.optimizer_cpu_offload)
                        for c in chunks for p in c.parameters() if p.requires_grad] if self.server else []
        self._build(cfg, experts=False)

    def clip_grads(self, max_norm: float) -> float:
        """The server clips its mean grads (the norm summed over "mp", which holds servers only)
        and sends the norm to its workers, whose own grads are not the step's."""
        server, workers = _server_and_workers()
        if self.server:
            norm = super().clip_grads(max_norm)
            sent = torch.tensor([norm], dtype=NORM_DTYPE, device=self.buffers[0].grad_data.device)
            send_recv([("send", sent, worker, NORM_TAG) for worker in workers], GROUP)
            return norm
        received = torch.empty(1, dtype=NORM_DTYPE, device=self.buffers[0].grad_data.device)
        send_recv([("recv", received, server, NORM_TAG)], GROUP)
        return received.item()

    def step(self) -> None:
        """The server steps and sends every buffer's parameters to each worker; a worker receives
        them in place. The same order of buffers on both sides matches the messages."""
        server, workers = _server_and_workers()
        if self.server:
            super().step()
            send_recv([("send", buf.param_data, worker, PARAM_TAG) for worker in workers for buf in self.buffers],
                      GROUP)
        else:
            send_recv([("recv", buf.param_data, server, PARAM_TAG) for buf in self.buffers], GROUP)

    def load_state_dict(self, state: dict) -> None:
        """Workers hold no optimizer state: the server loads it, a worker ignores it."""
        if self.server:
            super().load_state_dict(state)
