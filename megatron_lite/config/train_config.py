"""The training run's configuration: batches, optimizer, schedule, precision, data, checkpoints, logging.

Field docstrings become `--help` text (see model_config.py).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lite.config.checks import ConfigError, flag, require, require_positive
from megatron_lite.config.packages import require_packages

LR_DECAY_STYLES = ("cosine", "linear", "constant")
CKPT_FORMATS = ("torch_dist", "torch")  # Megatron's names; its zarr, torch_dcp and fsdp_dtensor are not ours
EXIT_SIGNALS = tuple(name for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP") if hasattr(signal, name))


def _require_writable_dir(name: str, path: str | None) -> None:
    """An output directory must be a directory we can write, or one we can create (checked, not created)."""
    if path is None:
        return
    target = Path(path)
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if existing == target:
        require(target.is_dir(), f"{flag(name)}={path} is a file, not a directory")
        require(os.access(target, os.W_OK | os.X_OK), f"{flag(name)}={path} is not writable")
    else:
        require(existing.is_dir(), f"{flag(name)}={path} cannot be created: {existing} is a file")
        require(os.access(existing, os.W_OK | os.X_OK),
                f"{flag(name)}={path} cannot be created: {existing} is not writable")


@dataclass(frozen=True)
class TrainConfig:
    micro_batch_size: int = 8
    """Samples per forward/backward pass on one rank."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks and microbatches."""
    train_iters: int = 200
    """Optimizer steps to train for."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of decay."""
    lr_warmup_iters: int = 20
    """Steps of linear warmup from 0 to --lr."""
    lr_decay_iters: int | None = None
    """Steps over which the lr decays to --min-lr (default: --train-iters)."""
    lr_decay_style: str = "cosine"
    """Shape of the decay after warmup: cosine, linear or constant."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    clip_grad: float = 1.0
    """Clip the global gradient norm to this value (0 disables clipping)."""
    bf16: bool = False
    """Mixed precision in bfloat16: bf16 weights and compute, fp32 grads, main parameters and optimizer state."""
    fp16: bool = False
    """Mixed precision in float16 (as --bf16) with loss scaling: dynamic unless --loss-scale is given."""
    loss_scale: float | None = None
    """--fp16: a static loss scale (default: dynamic loss scaling)."""
    initial_loss_scale: float = 2.0**32
    """--fp16 dynamic loss scaling: the scale to start from."""
    min_loss_scale: float = 1.0
    """--fp16 dynamic loss scaling: the scale never backs off below this."""
    loss_scale_window: int = 1000
    """--fp16 dynamic loss scaling: steps without overflow before the scale doubles."""
    hysteresis: int = 2
    """--fp16 dynamic loss scaling: overflowing steps tolerated before the scale halves."""
    compile: bool = False
    """torch.compile each transformer layer (pipeline stages and tensor-parallel mappings stay as they are)."""
    optimizer_cpu_offload: bool = False
    """Keep the fp32 main weights and Adam state in host memory and step the optimizer there (grads copied to the host,
    updated weights back)."""
    seed: int = 1234
    """Seed of weights, data order and dropout."""
    save: str | None = None
    """Directory to write checkpoints to."""
    save_interval: int | None = None
    """Save a checkpoint every N steps (and at the end) when --save is set."""
    load: str | None = None
    """Directory to resume from (its latest checkpoint; saved under any layout, it is resharded to this one)."""
    keep_last: int | None = None
    """Keep only the K most recent checkpoints in --save, deleting older iter_ directories (default: keep all)."""
    ckpt_step: int | None = None
    """Resume from iteration N of --load instead of the one its latest_checkpointed_iteration.txt names."""
    async_save: bool = False
    """Write checkpoints in the background while training goes on (the marker moves once every file is written)."""
    ckpt_format: str = "torch_dist"
    """How --save writes checkpoints: torch_dist (torch.distributed.checkpoint: every rank writes its pieces by global
    offset, and any layout loads only its own) or torch (one torch.save file per model-parallel rank, Megatron's
    legacy format). --load reads either."""
    exit_interval: int | None = None
    """Stop (saving first when --save is set) once the iteration is a multiple of N; the schedule still spans
    --train-iters."""
    exit_duration_in_mins: float | None = None
    """Stop (saving first when --save is set) after the
    first step that ends this many minutes after training started."""
    exit_signal_handler: bool = False
    """On --exit-signal (a scheduler's preemption warning) finish the current step, save and exit 0 on every rank."""
    exit_signal: str = "SIGTERM"
    """The signal --exit-signal-handler catches, e.g. SIGUSR1 for Slurm's --signal."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop before the optimizer step when the loss or the grad norm is not finite (on by default; nothing is saved
    after it)."""
    log_interval: int = 10
    """Print one log line every N steps."""
    log_dir: str | None = None
    """Where metrics.jsonl is appended (default: the --save directory, else none)."""
    tensorboard_dir: str | None = None
    """Rank 0 also writes the logged metrics here as TensorBoard events, under Megatron's tags (needs the tensorboard
    package)."""
    tensorboard_log_interval: int = 1
    """Of the log records, send to TensorBoard and wandb those of iterations that are multiples of N (validation ones
    always)."""
    wandb_project: str | None = None
    """Rank 0 also logs the metrics to this Weights & Biases project (needs the wandb package; WANDB_MODE=offline needs
    no network)."""
    wandb_exp_name: str | None = None
    """--wandb-project: the run's name (default: one wandb makes up)."""
    wandb_save_dir: str | None = None
    """--wandb-project: where wandb keeps its local files (default: wandb/ in the --save directory, else ./wandb)."""
    eval_interval: int = 100
    """Evaluate on the validation split every N steps (0 disables)."""
    eval_iters: int = 10
    """Global batches per evaluation."""
    data_path: list[str] | None = None
    """Dataset prefix of a .bin/.idx pair, or weight-prefix pairs to blend (0.7 a 0.3 b); without it a built-in corpus
    is used."""
    split: str = "98,2,0"
    """Train/valid/test proportions of each dataset's documents."""
    data_cache_dir: str | None = None
    """Where the built-in corpus and the sample indices are cached (default: ~/.cache/megatron_lite or
    $MEGATRON_LITE_CACHE, and cache/ beside --data-path)."""
    tokenizer_type: str = "ByteTokenizer"
    """Tokenizer the data was preprocessed with: ByteTokenizer (needs no file), SentencePieceTokenizer or
    HuggingFaceTokenizer."""
    tokenizer_model: str | None = None
    """The tokenizer's file or folder: a SentencePiece .model, a tokenizer.json or a transformers tokenizer folder."""
    device: str | None = None
    """cpu or cuda (default: cuda when available)."""

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype of the model's weights and of what flows between its stages."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def num_microbatches(self, data_parallel_size: int = 1) -> int:
        return self.global_batch_size // (self.micro_batch_size * data_parallel_size)

    def validate(self, data_parallel_size: int = 1) -> None:
        require_positive(self, "micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                         "eval_iters", "tensorboard_log_interval")
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            lower = max(per_step, self.global_batch_size // per_step * per_step)
            raise ConfigError(
                f"--global-batch-size={self.global_batch_size} is not divisible by --micro-batch-size="
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}; "
                f"nearest valid values: {lower} or {lower + per_step}")
        require(self.lr >= 0 and self.min_lr >= 0, f"--lr={self.lr} and --min-lr={self.min_lr} must be >= 0")
        require(self.min_lr <= self.lr, f"--min-lr={self.min_lr} must not exceed --lr={self.lr}")
        require(self.lr_warmup_iters >= 0, f"--lr-warmup-iters={self.lr_warmup_iters} must be >= 0")
        require(self.lr_decay_style in LR_DECAY_STYLES,
                f"--lr-decay-style={self.lr_decay_style} is unknown; allowed: {', '.join(LR_DECAY_STYLES)}")
        if self.lr_decay_iters is not None:
            require(self.lr_decay_iters > 0, f"--lr-decay-iters={self.lr_decay_iters} must be positive")
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 exclude each other; choose one")
        if self.loss_scale is not None:
            require(self.fp16 and self.loss_scale > 0, f"--loss-scale={self.loss_scale} needs --fp16 and must be > 0")
        require(0 < self.min_loss_scale <= self.initial_loss_scale,
                f"--min-loss-scale={self.min_loss_scale} must be > 0 and at most --initial-loss-scale="
                f"{self.initial_loss_scale}")
        require(self.loss_scale_window > 0 and self.hysteresis > 0,
                f"--loss-scale-window={self.loss_scale_window} and --hysteresis={self.hysteresis} must be positive")
        require(self.clip_grad >= 0, f"--clip-grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        require(self.weight_decay >= 0, f"--weight-decay={self.weight_decay} must be >= 0")
        require(self.eval_interval >= 0, f"--eval-interval={self.eval_interval} must be >= 0 (0 disables)")
        if self.exit_interval is not None:
            require(self.exit_interval > 0, f"--exit-interval={self.exit_interval} must be positive")
        if self.save_interval is not None:
            require(self.save_interval > 0, f"--save-interval={self.save_interval} must be positive")
        require(self.ckpt_format in CKPT_FORMATS,
                f"--ckpt-format={self.ckpt_format} is unknown; allowed: {', '.join(CKPT_FORMATS)}")
        if self.keep_last is not None:
            require(self.keep_last > 0, f"--keep-last={self.keep_last} must be positive")
        require(self.device in (None, "cpu", "cuda"), f"--device={self.device} is unknown; allowed: cpu, cuda")
        weights = self.split.replace("/", ",").split(",")
        require(len(weights) == 3 and all(w.strip().replace(".", "", 1).isdigit() for w in weights)
                and sum(float(w) for w in weights) > 0,
                f"--split={self.split} must be three non-negative numbers like 98,2,0")
        require(self.data_path is not None or self.tokenizer_type == "ByteTokenizer",
                f"--tokenizer-type={self.tokenizer_type} needs --data-path (data preprocessed with it); "
                "the built-in corpus is byte-level")
        if self.ckpt_step is not None:
            require(self.load is not None, f"--ckpt-step={self.ckpt_step} needs --load")
            require(self.ckpt_step >= 0, f"--ckpt-step={self.ckpt_step} must be >= 0")
        if self.exit_duration_in_mins is not None:
            require(self.exit_duration_in_mins > 0,
                    f"--exit-duration-in-mins={self.exit_duration_in_mins} must be positive")
        require(self.exit_signal in EXIT_SIGNALS,
                f"--exit-signal={self.exit_signal} is not a signal a job is warned with; "
                f"allowed: {', '.join(EXIT_SIGNALS)}")
        for name in ("save", "log_dir", "tensorboard_dir", "wandb_save_dir"):
            _require_writable_dir(name, getattr(self, name))
        require(self.wandb_project is not None or (self.wandb_exp_name is None and self.wandb_save_dir is None),
                "--wandb-exp-name and --wandb-save-dir go with --wandb-project; add it or drop them")
        require_packages(self)  # last: it imports the writers' packages
