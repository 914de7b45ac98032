"""Schedule traces: what ran where and when, the bubble it left, and a cost model to measure it.

Under the cost model a stage does no math: a forward takes `forward_time`, a backward
`backward_time`, and every tensor sent between stages is one number, the virtual time at
which it was produced. A stage starts a pass at max(its own clock, the time its input was
produced), so running the real schedule and p2p code on CPU ranks gives a deterministic
timeline, free of the noise of a shared CPU.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Event:
    rank: int
    chunk: int
    microbatch: int
    kind: str  # "F", "B" (the whole backward, or only the input's gradient when a "W" follows)
    start: float
    end: float


class Trace:
    """Events of one rank, in the order they ran."""

    def __init__(self, rank: int) -> None:
        self.rank = rank
        self.events: list[Event] = []

    def record(self, chunk: int, microbatch: int, kind: str, start: float, end: float) -> None:
        self.events.append(Event(self.rank, chunk, microbatch, kind, start, end))


def bubble_fraction(events: list[Event]) -> float:
    """Idle time over busy time: (makespan - busy) / busy, from the busiest rank's view.

    This is the quantity the textbook (p-1)/m describes: the fill-and-drain time of the
    pipeline relative to the useful work of one stage.
    """
    makespan = max(e.end for e in events) - min(e.start for e in events)
    busy = max(sum(e.end - e.start for e in events if e.rank == r) for r in {e.rank for e in events})
    return (makespan - busy) / busy


def peak_in_flight(events: list[Event], rank: int) -> int:
    """Most microbatches (per chunk) whose forward ran on `rank` and whose backward had not
    finished (with a split backward, whose W had not: that pass still reads the activations)."""
    ends = "W" if any(e.kind == "W" for e in events) else "B"
    points = []
    for e in events:
        if e.rank == rank and e.kind in ("F", ends):
            points.append((e.start, 1) if e.kind == "F" else (e.end, -1))
    live = peak = 0
    for _, delta in sorted(points, key=lambda p: (p[0], p[1])):
        live += delta
        peak = max(peak, live)
    return peak


class CostModelRunner:
    """A stage runner with fixed pass durations in virtual time (see the module docstring)."""

    tensor_shape = (1,)
    dtype = torch.float64
    device = None

    def __init__(self, trace: Trace, forward_time: float = 1.0, backward_time: float = 2.0,
                 weight_grad_time: float = 1.0) -> None:
        """A split backward (zero-bubble schedules) takes backward_time - weight_grad_time for
        B and weight_grad_time for W: one backward, cut in two."""
        self.trace, self.forward_time, self.backward_time = trace, forward_time, backward_time
        self.weight_grad_time = weight_grad_time
        self.clock = 0.0

    def _run(self, chunk: int, microbatch: int, kind: str, ready: torch.Tensor | None, duration: float) -> torch.Tensor:
        start = max(self.clock, 0.0 if ready is None else ready.item())
        self.clock = start + duration
        self.trace.record(chunk, microbatch, kind, start, self.clock)
        return torch.tensor([self.clock], dtype=self.dtype)

    def forward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None) -> torch.Tensor:
        return self._run(chunk, microbatch, "F", input_tensor, self.forward_time)

    def backward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None, output_tensor: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None:
        grad = self._run(chunk, microbatch, "B", output_grad, self.backward_time)
        return None if input_tensor is None else grad

    def backward_input(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None,
                       output_tensor: torch.Tensor, output_grad: torch.Tensor | None) -> torch.Tensor | None:
        grad = self._run(chunk, microbatch, "B", output_grad, self.backward_time - self.weight_grad_time)
        return None if input_tensor is None else grad

    def backward_weight(self, chunk: int, microbatch: int) -> None:
        self._run(chunk, microbatch, "W", None, self.weight_grad_time)
