"""Loss scaling for --fp16: keep small gradients representable in float16.

fp16 has 5 exponent bits: gradients below about 6e-8 flush to zero. The loss is multiplied by
a scale S before backward, so every gradient is S times larger while it is in fp16; the fp32
main gradients are divided by S again before clipping and the step. Too large an S overflows:
a step whose gradients hold inf or nan is skipped (the weights stay as they were) and the scale
backs off.

Dynamic scaling follows Megatron's rules (and its flag defaults): start at --initial-loss-scale;
after `hysteresis` overflowing steps (not necessarily consecutive) halve the scale, never below
--min-loss-scale; after --loss-scale-window steps in a row without overflow double it and
restore the hysteresis budget. A static --loss-scale never changes; an overflowing step is
still skipped.
"""
from __future__ import annotations

from megatron_lite.config import TrainConfig


class LossScaler:
    """A loss scale and the rule that updates it after each step; state_dict() goes into checkpoints."""

    def __init__(self, initial_scale: float, min_scale: float = 1.0, window: int = 1000, hysteresis: int = 2,
                 dynamic: bool = True) -> None:
        self.scale, self.min_scale, self.window, self.hysteresis = float(initial_scale), min_scale, window, hysteresis
        self.dynamic = dynamic
        self.steps_without_overflow = 0
        self.hysteresis_left = hysteresis

    def update(self, found_inf: bool) -> None:
        """After a step: back off on overflow (once the hysteresis is spent), grow after a clean window."""
        if not self.dynamic:
            return
        if found_inf:
            self.steps_without_overflow = 0
            self.hysteresis_left -= 1
            if self.hysteresis_left <= 0:
                self.scale = max(self.scale / 2, self.min_scale)
            return
        self.steps_without_overflow += 1
        if self.steps_without_overflow == self.window:
            self.steps_without_overflow = 0
            self.hysteresis_left = self.hysteresis
            self.scale *= 2

    def state_dict(self) -> dict:
        return {"scale": self.scale, "steps_without_overflow": self.steps_without_overflow,
                "hysteresis_left": self.hysteresis_left}

    def load_state_dict(self, state: dict) -> None:
        self.scale = state["scale"]
        self.steps_without_overflow = state["steps_without_overflow"]
        self.hysteresis_left = state["hysteresis_left"]


def build_loss_scaler(cfg: TrainConfig) -> LossScaler | None:
    """The scaler --fp16 needs (None otherwise: bf16 has fp32's exponent range and needs no scaling)."""
    if not cfg.fp16:
        return None
    if cfg.loss_scale is not None:
        return LossScaler(cfg.loss_scale, dynamic=False)
    return LossScaler(cfg.initial_loss_scale, cfg.min_loss_scale, cfg.loss_scale_window, cfg.hysteresis)
