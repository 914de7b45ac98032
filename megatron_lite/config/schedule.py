"""The lr schedule's and the batch ramp's rules: a base of TrainConfig, which holds the fields.

Kept apart from train_config.py so the schedule's arithmetic (Megatron's ramp and sample counts)
and its checks read as one piece.
"""
from __future__ import annotations

from megatron_lite.config.checks import flag, require

LR_DECAY_STYLES = ("cosine", "linear", "constant", "inverse-square-root", "WSD")
LR_WSD_DECAY_STYLES = ("exponential", "linear", "cosine", "minus_sqrt")


class BatchSchedule:
    """The global batch of each step and the schedule flags' checks, on TrainConfig's fields."""

    def batch_size_at(self, consumed_samples: int) -> int:
        """The global batch of the step that starts after `consumed_samples`: --rampup-batch-size's
        START, grown by INCREMENT each time another SAMPLES / ((global - START) / INCREMENT) samples
        are consumed, --global-batch-size once more than SAMPLES are (Megatron's ramp)."""
        if self.rampup_batch_size is None or consumed_samples > self.rampup_batch_size[2]:
            return self.global_batch_size
        start, increment, samples = self.rampup_batch_size
        per_increment = samples / ((self.global_batch_size - start) // increment)
        return start + int(consumed_samples / per_increment) * increment

    @property
    def global_batch_sizes(self) -> list[int]:
        """Every global batch the run steps with: the ramp's, then --global-batch-size."""
        ramp = self.rampup_batch_size
        return [*(range(ramp[0], self.global_batch_size, ramp[1]) if ramp else ()), self.global_batch_size]

    def iterations_for(self, samples: int) -> int:
        """Steps that --train-samples takes: the ramp's steps, then whole global batches (Megatron's count,
        which may end a little short of `samples`)."""
        steps, consumed = 0, 0
        if self.rampup_batch_size is not None:
            while consumed <= self.rampup_batch_size[2] and consumed <= samples:
                consumed += self.batch_size_at(consumed)
                steps += 1
        return steps + (samples - consumed) // self.global_batch_size

    def _validate_schedule(self, data_parallel_size: int) -> None:
        """The lr schedule's and the batch ramp's flags (Megatron's rules: -iters flags with an
        iteration-based run, -samples flags with --train-samples)."""
        for name in ("train_samples", "lr_warmup_samples", "lr_decay_iters", "lr_decay_samples", "lr_wsd_decay_iters",
                     "lr_wsd_decay_samples", "lr_warmup_iters"):
            value = getattr(self, name)
            require(value is None or value >= (0 if "warmup" in name else 1),
                    f"{flag(name)}={value} must be {'>= 0' if 'warmup' in name else 'positive'}")
        unit = "iters" if self.train_samples is None else "samples"
        other = "samples" if unit == "iters" else "iters"
        wrong = [name for name in (f"lr_warmup_{other}", f"lr_decay_{other}", f"lr_wsd_decay_{other}")
                 if getattr(self, name) is not None]
        require(not wrong, f"{flag(wrong[0])} goes with "
                           f"{'--train-samples' if other == 'samples' else '--train-iters'}; "
                           f"this run counts {unit}: use {flag(wrong[0]).replace(other, unit)}" if wrong else "")
        if self.lr_warmup_fraction is not None:
            require(0 <= self.lr_warmup_fraction <= 1,
                    f"--lr-warmup-fraction={self.lr_warmup_fraction} must be between 0 and 1")
            require(self.lr_warmup_iters is None and self.lr_warmup_samples is None,
                    f"--lr-warmup-fraction and --lr-warmup-{unit} exclude each other; choose one")
        require(self.lr_warmup_init >= 0, f"--lr-warmup-init={self.lr_warmup_init} must be >= 0")
        require(self.lr_decay_style in LR_DECAY_STYLES,
                f"--lr-decay-style={self.lr_decay_style} is unknown; allowed: {', '.join(LR_DECAY_STYLES)}")
        require(self.lr_wsd_decay_style in LR_WSD_DECAY_STYLES,
                f"--lr-wsd-decay-style={self.lr_wsd_decay_style} is unknown; allowed: {', '.join(LR_WSD_DECAY_STYLES)}")
        anneal = getattr(self, f"lr_wsd_decay_{unit}")
        if self.lr_decay_style == "WSD":
            decay = (self.lr_decay_iters or self.train_iters) if unit == "iters" else (
                self.lr_decay_samples or self.train_samples)
            require(anneal is not None and anneal <= decay,
                    f"--lr-decay-style=WSD needs --lr-wsd-decay-{unit} (the anneal), at most the decay's {decay}")
        for name in ("decoupled_lr", "decoupled_min_lr"):
            require(getattr(self, name) is None or getattr(self, name) >= 0, f"{flag(name)} must be >= 0")
        require(self.decoupled_min_lr is None or self.decoupled_lr is not None,
                "--decoupled-min-lr needs --decoupled-lr")
        if self.rampup_batch_size is not None:
            self._validate_rampup(data_parallel_size)

    def _validate_rampup(self, data_parallel_size: int) -> None:
        ramp = self.rampup_batch_size
        require(len(ramp) == 3 and ramp[0] > 0 and ramp[1] > 0 and ramp[2] >= 0,
                f"--rampup-batch-size={' '.join(map(str, ramp))} must be START INCREMENT SAMPLES "
                "(START, INCREMENT > 0)")
        start, increment, _ = ramp
        require(start < self.global_batch_size and (self.global_batch_size - start) % increment == 0,
                f"--rampup-batch-size: START={start} must be below --global-batch-size={self.global_batch_size} and "
                f"their difference a multiple of INCREMENT={increment}")
        per_step = self.micro_batch_size * data_parallel_size
        bad = [size for size in self.global_batch_sizes if size % per_step]
        require(not bad, f"--rampup-batch-size: global batch {bad[0] if bad else 0} of the ramp is not divisible by "
                         f"--micro-batch-size={self.micro_batch_size} x data-parallel size {data_parallel_size} = "
                         f"{per_step}")
