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
  groups of p, chunk-major within a group, which is why m must be a multiple of p here.

A schedule only orders calls: `runner.forward(chunk, microbatch, input)` and
`runner.backward(chunk, microbatch, input, output, output_grad)` do the work, so the same
schedule code drives the model or the cost model that draws and measures it (trace.py).
"""
from __future__ import annotations

from collections import deque
from typing import Protocol

import torch

from megatron_lite import parallel_state
from megatron_lite.pipeline_parallel.p2p import communicate


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


def forward_backward_interleaved(runner: StageRunner, num_microbatches: int, num_chunks: int) -> None:
    """Interleaved 1F1B over num_chunks model chunks per rank (Megatron's schedule).

    Virtual step k (0 <= k < m*v) runs microbatch (k // (p*v)) * p + k % p on chunk
    (k % (p*v)) // p going forward, and on the mirrored chunk going backward. Rank r warms up
    with (p-r-1)*2 + (v-1)*p forwards: enough for its first backward's gradient to have come
    back around the ring.
    """
    grid = parallel_state.get_grid()
    p, r, v, m = grid.size("pp"), grid.coord("pp"), num_chunks, num_microbatches
    total = m * v
    kw = dict(shape=runner.tensor_shape, dtype=runner.dtype, device=runner.device)
    if m == p:  # every forward fits in the warmup; the steady phase is empty
        warmup, all_warmup = total, True
    else:
        warmup, all_warmup = min((p - r - 1) * 2 + (v - 1) * p, total), False
    steady = total - warmup

    def chunk_of(k: int, forward: bool) -> int:
        c = (k % (p * v)) // p
        return c if forward else v - 1 - c

    def microbatch_of(k: int) -> int:
        return (k // (p * v)) * p + k % p

    def first_virtual(c: int) -> bool:
        return r == 0 and c == 0

    def last_virtual(c: int) -> bool:
        return r == p - 1 and c == v - 1

    inputs = [deque() for _ in range(v)]
    outputs = [deque() for _ in range(v)]
    grads = [deque() for _ in range(v)]

    def forward(k: int) -> torch.Tensor | None:
        c = chunk_of(k, True)
        if first_virtual(c) and len(inputs[c]) == len(outputs[c]):
            inputs[c].append(None)  # the first virtual stage reads tokens, not a received tensor
        y = runner.forward(c, microbatch_of(k), inputs[c][-1])
        outputs[c].append(y)
        return None if last_virtual(c) else y  # the loss goes nowhere

    def backward(k: int) -> torch.Tensor | None:
        c = chunk_of(k, False)
        grad = None if last_virtual(c) else grads[c].popleft()  # the loss starts its own backward
        grad_in = runner.backward(c, microbatch_of(k), inputs[c].popleft(), outputs[c].popleft(), grad)
        return None if first_virtual(c) else grad_in

    inputs[0].append(None if r == 0 else communicate(recv_prev=True, **kw)[0])
    for k in range(warmup):
        y = forward(k)
        next_chunk = chunk_of(k + 1, True)
        recv_prev = not (r == 0 and next_chunk == 0) and k != total - 1
        if k == warmup - 1 and not all_warmup:
            x, grad = communicate(send_next=y, recv_prev=recv_prev, recv_next=r != p - 1, **kw)
            if r != p - 1:
                grads[v - 1].append(grad)
        else:
            x, _ = communicate(send_next=y, recv_prev=recv_prev, **kw)
        if recv_prev:
            inputs[next_chunk].append(x)

    for k in range(steady):
        forward_k, backward_k = k + warmup, k
        y = forward(forward_k)
        grad_in = backward(backward_k)
        # The first rank is p-1 virtual steps ahead of the last one, hence the offsets.
        if r == 0:
            next_forward_chunk = chunk_of(forward_k - (p - 1), True)
            recv_prev = next_forward_chunk != v - 1
            next_forward_chunk += 1
        else:
            next_forward_chunk, recv_prev = chunk_of(forward_k + 1, True), True
        if r == p - 1:
            next_backward_chunk = chunk_of(backward_k - (p - 1), False)
            recv_next = next_backward_chunk != 0
            next_backward_chunk -= 1
        else:
            next_backward_chunk, recv_next = chunk_of(backward_k + 1, False), True
        recv_prev = recv_prev and k != steady - 1
        x, grad = communicate(send_next=y, send_prev=grad_in, recv_prev=recv_prev, recv_next=recv_next, **kw)
        if recv_prev:
            inputs[next_forward_chunk].append(x)
        if recv_next:
            grads[next_backward_chunk].append(grad)

    if all_warmup and r != p - 1:
        grads[v - 1].append(communicate(recv_next=True, **kw)[1])
    for k in range(steady, total):
        grad_in = backward(k)
        next_chunk = chunk_of(k + 1, False)
        recv_next = not (r == p - 1 and next_chunk == v - 1) and k != total - 1
        _, grad = communicate(send_prev=grad_in, recv_next=recv_next, **kw)
        if recv_next:
            grads[next_chunk].append(grad)


def run_schedule(runner: StageRunner, name: str, num_microbatches: int, num_chunks: int = 1) -> None:
    """Run one step's forward and backward passes with the named schedule."""
    if parallel_state.get_grid().size("pp") == 1:
        forward_backward_no_pipelining(runner, num_microbatches)
    elif name == "gpipe":
        forward_backward_gpipe(runner, num_microbatches)
    elif name == "1f1b":
        forward_backward_1f1b(runner, num_microbatches)
    else:
        forward_backward_interleaved(runner, num_microbatches, num_chunks)


def forward_only(runner: StageRunner, num_microbatches: int, num_chunks: int = 1) -> None:
    """Forward passes only (evaluation): each microbatch flows through every virtual stage in order."""
    grid = parallel_state.get_grid()
    kw = dict(shape=runner.tensor_shape, dtype=runner.dtype, device=runner.device)
    for i in range(num_microbatches):
        for c in range(num_chunks):
            first = grid.coord("pp") == 0 and c == 0
            last = grid.coord("pp") == grid.size("pp") - 1 and c == num_chunks - 1
            x = None if first else communicate(recv_prev=True, **kw)[0]
            y = runner.forward(c, i, x)
            if not last:
                communicate(send_next=y, **kw)
