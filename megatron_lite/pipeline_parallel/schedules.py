"""Pipeline schedules: the order in which each stage runs forward (F) and backward (B) passes of
the m microbatches of one step, and when it talks to its neighbours.

With p stages and each F+B taking one unit per microbatch, every schedule here idles a stage
for p-1 units per step while the pipeline fills and drains, against m units of work, so the
bubble fraction is (p-1)/m. They differ in memory and in how the bubble can shrink:

- GPipe: all m forwards, then all m backwards. Each stage keeps the activations of all m
  microbatches alive until its backwards start.
- 1F1B (PipeDream-flush, Megatron's default): stage r runs p-r-1 warmup forwards, then
  alternates one forward and one backward, then drains the remaining backwards. Same bubble
  as GPipe, but at most p-r microbatches are in flight on stage r instead of m.
- Interleaved 1F1B: each rank holds v model chunks (virtual stages c*p + r), so a microbatch
  crosses the ring of ranks v times in smaller pieces; the fill and drain shrink by v and the
  bubble becomes (p-1)/(v*m), for v times more point-to-point messages. Microbatches run in
  groups of g (default p), chunk-major within a group; interleaved_order says which rank runs
  how many forwards first and which m Megatron accepts.

A schedule only orders calls: `runner.forward(chunk, microbatch, input)` and
`runner.backward(chunk, microbatch, input, output, output_grad)` do the work, so the same
schedule code drives the model or the cost model that draws and measures it (trace.py).
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

from megatron_lite import parallel_state
from megatron_lite.config.parallel_config import interleaved_microbatches_problem
from megatron_lite.pipeline_parallel.p2p import communicate
from megatron_lite.pipeline_parallel.zero_bubble import forward_backward_zb_h1, forward_backward_zbv, forward_only_zbv


class StageRunner(Protocol):
    tensor_shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device | None

    def forward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None) -> torch.Tensor: ...

    def backward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None, output_tensor: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None: ...


class _Neighbours:
    """p2p for a linear pipeline: nothing enters the first stage nor leaves the last."""

    def __init__(self, runner: StageRunner) -> None:
        grid = parallel_state.get_grid()
        self.first, self.last = grid.coord("pp") == 0, grid.coord("pp") == grid.size("pp") - 1
        self.kw = dict(shape=runner.tensor_shape, dtype=runner.dtype, device=runner.device)

    def recv_forward(self) -> torch.Tensor | None:
        return None if self.first else communicate(recv_prev=True, **self.kw)[0]

    def recv_backward(self) -> torch.Tensor | None:
        return None if self.last else communicate(recv_next=True, **self.kw)[1]

    def send_forward(self, y: torch.Tensor) -> None:
        if not self.last:
            communicate(send_next=y, **self.kw)

    def send_backward(self, grad: torch.Tensor | None) -> None:
        if not self.first:
            communicate(send_prev=grad, **self.kw)

    def send_forward_recv_backward(self, y: torch.Tensor) -> torch.Tensor | None:
        return None if self.last else communicate(send_next=y, recv_next=True, **self.kw)[1]

    def send_backward_recv_forward(self, grad: torch.Tensor | None) -> torch.Tensor | None:
        return None if self.first else communicate(send_prev=grad, recv_prev=True, **self.kw)[0]


def forward_backward_no_pipelining(runner: StageRunner, num_microbatches: int) -> None:
    """Gradient accumulation on one stage: F then B for each microbatch."""
    for i in range(num_microbatches):
        runner.backward(0, i, None, runner.forward(0, i, None), None)


def forward_backward_gpipe(runner: StageRunner, num_microbatches: int) -> None:
    """All forwards, then all backwards (first in, first out)."""
    p2p = _Neighbours(runner)
    inputs, outputs = [], []
    for i in range(num_microbatches):
        x = p2p.recv_forward()
        y = runner.forward(0, i, x)
        p2p.send_forward(y)
        inputs.append(x)
        outputs.append(y)
    for i in range(num_microbatches):
        grad = p2p.recv_backward()
        p2p.send_backward(runner.backward(0, i, inputs[i], outputs[i], grad))
        inputs[i] = outputs[i] = None  # free this microbatch's activations now


def forward_backward_1f1b(runner: StageRunner, num_microbatches: int) -> None:
    """Warmup forwards, steady one-forward-one-backward, cooldown backwards (Megatron's order)."""
    grid = parallel_state.get_grid()
    p2p = _Neighbours(runner)
    # Stage r must run p-r-1 forwards before the first backward can reach it from the last stage.
    warmup = min(grid.size("pp") - grid.coord("pp") - 1, num_microbatches)
    steady = num_microbatches - warmup
    inputs, outputs = deque(), deque()
    next_forward, next_backward = 0, 0

    def forward(x: torch.Tensor | None) -> torch.Tensor:
        nonlocal next_forward
        y = runner.forward(0, next_forward, x)
        next_forward += 1
        inputs.append(x)
        outputs.append(y)
        return y

    def backward(grad: torch.Tensor | None) -> torch.Tensor | None:
        nonlocal next_backward
        grad_in = runner.backward(0, next_backward, inputs.popleft(), outputs.popleft(), grad)
        next_backward += 1
        return grad_in

    for _ in range(warmup):
        p2p.send_forward(forward(p2p.recv_forward()))
    x = p2p.recv_forward() if steady else None
    for i in range(steady):
        grad = p2p.send_forward_recv_backward(forward(x))
        grad_in = backward(grad)
        if i == steady - 1:
            p2p.send_backward(grad_in)
        else:
            x = p2p.send_backward_recv_forward(grad_in)
    for _ in range(warmup):
        p2p.send_backward(backward(p2p.recv_backward()))


def interleaved_table(num_microbatches: int, num_chunks: int, group_size: int) -> list[tuple[int, int]]:
    """(chunk, microbatch) of each virtual step, in the order every rank runs its forwards.

    The microbatches are cut into groups of `group_size` consecutive ones, the last group taking
    what is left; a group runs chunk 0 on each of its microbatches, then chunk 1, and so on.
    """
    table = []
    for start in range(0, num_microbatches, group_size):
        group = range(start, min(start + group_size, num_microbatches))
        table += [(chunk, i) for chunk in range(num_chunks) for i in group]
    return table


def interleaved_warmup(pp: int, rank: int, num_chunks: int, num_microbatches: int, group_size: int) -> int:
    """Forwards rank `rank` runs before its first backward: all of them when the rule asks for more."""
    return min((pp - rank - 1) * 2 + (num_chunks - 1) * group_size, num_microbatches * num_chunks)


def interleaved_order(pp: int, rank: int, num_chunks: int, num_microbatches: int,
                      group_size: int | None = None) -> list[tuple[str, int, int]]:
    """("F" or "B", chunk, microbatch) in the order `rank` runs them under interleaved 1F1B.

    This is megatron-core's order (megatron/core/pipeline_parallel/schedules.py:
    get_schedule_table, get_pp_rank_microbatches, forward_backward_pipelining_with_interleaving):

    - Every rank walks the same list of virtual steps (interleaved_table) with its forwards, and
      the same list again with its backwards, each step's chunk mirrored (chunk c -> v-1-c):
      the last chunk's backwards come first, as the gradients enter the ring at its end.
    - Rank r runs w = 2*(p-r-1) + (v-1)*g warmup forwards, g the group size (default p): by
      then the gradient of its first backward has come back around the ring. Then pairs of
      (forward w+k, backward k), then the w remaining backwards. When w would reach all m*v
      forwards, the rank runs every forward before any backward: with m == p only the ranks
      with 2*(p-r-1) >= p do, and the last rank keeps (v-1)*p + 1 passes alive, not v*p.
    - Accepted microbatch counts: interleaved_microbatches_problem (parallel_config.py).
    """
    group_size = pp if group_size is None else group_size
    table = interleaved_table(num_microbatches, num_chunks, group_size)
    forwards = [("F", chunk, i) for chunk, i in table]
    backwards = [("B", num_chunks - 1 - chunk, i) for chunk, i in table]
    warmup = interleaved_warmup(pp, rank, num_chunks, num_microbatches, group_size)
    steady = len(table) - warmup
    order = forwards[:warmup]
    for k in range(steady):
        order += [forwards[warmup + k], backwards[k]]
    return order + backwards[steady:]


def forward_backward_interleaved(runner: StageRunner, num_microbatches: int, num_chunks: int,
                                 microbatch_group_size: int | None = None) -> None:
    """Interleaved 1F1B over num_chunks model chunks per rank, in interleaved_order's order.

    The point-to-point calls are Megatron's, in lockstep: after each virtual step a rank sends
    what it produced and receives the input of a later step, and its neighbours post the
    matching calls, so every call completes without waiting for a later one. The ring's wrap
    (last rank -> first rank going forward, first -> last going backward) runs p-1 steps
    behind its receiver, which is why a group must hold at least p microbatches: the tensor
    for chunk c+1 of a microbatch then comes back before that step needs it.
    """
    grid = parallel_state.get_grid()
    p, r, v, m = grid.size("pp"), grid.coord("pp"), num_chunks, num_microbatches
    group_size = p if microbatch_group_size is None else microbatch_group_size
    problem = interleaved_microbatches_problem(p, m, group_size)
    if problem is not None:
        raise ValueError(problem)
    table = interleaved_table(m, v, group_size)
    total, warmup = len(table), interleaved_warmup(p, r, v, m, group_size)
    steady = total - warmup
    kw = dict(shape=runner.tensor_shape, dtype=runner.dtype, device=runner.device)

    def forward_key(k: int) -> tuple[int, int]:
        return table[k]

    def backward_key(k: int) -> tuple[int, int]:
        chunk, i = table[k]
        return v - 1 - chunk, i

    def first_virtual(chunk: int) -> bool:
        return r == 0 and chunk == 0

    def last_virtual(chunk: int) -> bool:
        return r == p - 1 and chunk == v - 1

    # Keyed by (chunk, microbatch), from when they arrive or are made until that backward.
    inputs, outputs, grads = {}, {}, {}

    def forward(k: int) -> torch.Tensor | None:
        chunk, i = key = forward_key(k)
        if first_virtual(chunk):
            inputs[key] = None  # the first virtual stage reads tokens, not a received tensor
        outputs[key] = runner.forward(chunk, i, inputs[key])
        return None if last_virtual(chunk) else outputs[key]  # the loss goes nowhere

    def backward(k: int) -> torch.Tensor | None:
        chunk, i = key = backward_key(k)
        if last_virtual(chunk):
            grads[key] = None  # the loss starts its own backward
        grad_in = runner.backward(chunk, i, inputs.pop(key), outputs.pop(key), grads.pop(key))
        return None if first_virtual(chunk) else grad_in

    def received_key(k: int, is_forward: bool) -> tuple[int, int] | None:
        """Whose input (is_forward) or output gradient arrives in the call after step k, if any."""
        step = forward_key if is_forward else backward_key
        if r != (0 if is_forward else p - 1):
            return step(k + 1) if k + 1 < total else None
        # Across the wrap the sender is p-1 steps behind: its step k-(p-1) on chunk c feeds chunk
        # c+1 here going forward (c-1 going backward), unless c ends the ring (loss or tokens).
        if k < p - 1:
            return None
        chunk, i = step(k - (p - 1))
        if chunk == (v - 1 if is_forward else 0):
            return None
        return (chunk + 1 if is_forward else chunk - 1), i

    def exchange(output: torch.Tensor | None, grad_in: torch.Tensor | None,
                 input_for: tuple[int, int] | None, grad_for: tuple[int, int] | None) -> None:
        """One lockstep call: send an output on and a gradient back, receive the input of
        `input_for` and the output gradient of `grad_for` (None: nothing to receive)."""
        x, grad = communicate(send_next=output, send_prev=grad_in, recv_prev=input_for is not None,
                              recv_next=grad_for is not None, **kw)
        if input_for is not None:
            inputs[input_for] = x
        if grad_for is not None:
            grads[grad_for] = grad

    # Megatron receives the first backward's gradient with the last warmup call, or on its own
    # after the warmup when that is every forward; the last rank makes it from the loss.
    first_grad = None if r == p - 1 else backward_key(0)
    exchange(None, None, None if r == 0 else forward_key(0), None)
    for k in range(warmup):
        last = k == warmup - 1 and steady > 0
        exchange(forward(k), None, received_key(k, True), first_grad if last else None)
    if steady == 0:
        exchange(None, None, None, first_grad)
    for k in range(steady):
        exchange(forward(warmup + k), backward(k), received_key(warmup + k, True), received_key(k, False))
    for k in range(steady, total):
        exchange(None, backward(k), None, received_key(k, False))


def run_schedule(runner: StageRunner, name: str, num_microbatches: int, num_chunks: int = 1,
                 microbatch_group_size: int | None = None) -> None:
    """Run one step's forward and backward passes with the named schedule (microbatch_group_size:
    the interleaved schedule's, default pp)."""
    if parallel_state.get_grid().size("pp") == 1:
        forward_backward_no_pipelining(runner, num_microbatches)
    elif name == "gpipe":
        forward_backward_gpipe(runner, num_microbatches)
    elif name == "1f1b":
        forward_backward_1f1b(runner, num_microbatches)
    elif name == "zb-h1":
        forward_backward_zb_h1(runner, num_microbatches)
    elif name == "zbv":
        forward_backward_zbv(runner, num_microbatches)
    else:
        forward_backward_interleaved(runner, num_microbatches, num_chunks, microbatch_group_size)


def forward_only(runner: StageRunner, num_microbatches: int, num_chunks: int = 1) -> None:
    """Forward passes only (evaluation): each microbatch flows through every virtual stage in order."""
    grid = parallel_state.get_grid()
    if grid.v_shape:
        forward_only_zbv(runner, num_microbatches)
        return
    kw = dict(shape=runner.tensor_shape, dtype=runner.dtype, device=runner.device)
    for i in range(num_microbatches):
        for c in range(num_chunks):
            first = grid.coord("pp") == 0 and c == 0
            last = grid.coord("pp") == grid.size("pp") - 1 and c == num_chunks - 1
            x = None if first else communicate(recv_prev=True, **kw)[0]
            y = runner.forward(c, i, x)
            if not last:
                communicate(send_next=y, **kw)
