"""Stopping a run early but cleanly: on the signal a scheduler sends before it kills a job
(--exit-signal-handler) or once a wall-clock budget is spent (--exit-duration-in-mins).

The signal may reach one rank only, and clocks differ between ranks, so after each step every
rank contributes its flags to one all-reduce (max) and all of them stop at the same step: the
step finishes, a checkpoint is saved and every rank exits 0, as Megatron's do.
"""
from __future__ import annotations

import signal
import time

import torch

from megatron_lite.comm import all_reduce
from megatron_lite.config import TrainConfig


class ExitConditions:
    """Watches for the exit signal and the time budget; check() after every step."""

    def __init__(self, cfg: TrainConfig, device: torch.device | None = None) -> None:
        self.signal = getattr(signal, cfg.exit_signal) if cfg.exit_signal_handler else None
        self.budget_s = None if cfg.exit_duration_in_mins is None else 60.0 * cfg.exit_duration_in_mins
        self.device = device
        self.start = time.monotonic()
        self.received = False
        self._previous = signal.signal(self.signal, self._handle) if self.signal is not None else None

    def _handle(self, signum: int, frame: object) -> None:
        self.received = True  # acted on after the current step, never in the middle of one

    def check(self) -> str | None:
        """Why every rank stops after this step, or None to go on; collective when anything is watched."""
        if self.signal is None and self.budget_s is None:
            return None
        over_time = self.budget_s is not None and time.monotonic() - self.start >= self.budget_s
        flags = torch.tensor([float(self.received), float(over_time)], device=self.device)
        all_reduce(flags, group="world", op=torch.distributed.ReduceOp.MAX)
        reasons = []
        if flags[0]:
            reasons.append(f"{self.signal.name} received (--exit-signal-handler)")
        if flags[1]:
            reasons.append(f"--exit-duration-in-mins={self.budget_s / 60:g} reached")
        return " and ".join(reasons) or None

    def close(self) -> None:
        """Give the signal back to whoever handled it before."""
        if self.signal is not None:
            signal.signal(self.signal, self._previous)
