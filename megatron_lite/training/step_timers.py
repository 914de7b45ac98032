"""The phases of the training steps timed for --log-timers-to-tensorboard, under Megatron's timer names.

Off (None in the loop), nothing is timed or synchronised. On, a CUDA device is synchronised at each
phase's start and end, so a phase's time is its kernels' and not their launch's.
"""
from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator

import torch


class StepTimers:
    """Seconds spent in each named phase since the last `per_step`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.totals: dict[str, float] = {}

    @contextlib.contextmanager
    def time(self, name: str) -> Iterator[None]:
        self._synchronize()
        start = time.perf_counter()
        yield
        self._synchronize()
        self.totals[name] = self.totals.get(name, 0.0) + time.perf_counter() - start

    def per_step(self, steps: int) -> dict[str, float]:
        """{"<name>-time": seconds per step} over the last `steps` steps (Megatron's tags); starts over."""
        scalars = {f"{name}-time": total / steps for name, total in self.totals.items()}
        self.totals = {}
        return scalars

    def _synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def timed(timers: StepTimers | None, name: str) -> contextlib.AbstractContextManager:
    """`timers.time(name)`, or nothing when the phases are not timed."""
    return contextlib.nullcontext() if timers is None else timers.time(name)
