"""The training run's configuration: batches, optimizer, schedule, precision, data, checkpoints, logging.

Field docstrings become `--help` text (see model_config.py).
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from pathlib import Path

import torch

from megatron_lite.config.checks import ConfigError, flag, require, require_null_vocab, require_positive
from megatron_lite.config.optimizer_checks import OptimizerChecks
from megatron_lite.config.packages import require_packages
from megatron_lite.config.schedule import BatchSchedule

CKPT_FORMATS = ("torch_dist", "torch")  # Megatron's names (its fsdp_dtensor is read as torch_dist); zarr, torch_dcp not
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
class TrainConfig(BatchSchedule, OptimizerChecks):
    micro_batch_size: int = 8
    """Samples per forward/backward pass on one rank."""
    global_batch_size: int = 16
    """Samples per optimizer step over all data-parallel ranks and microbatches."""
    rampup_batch_size: list[int] | None = None
    """START INCREMENT SAMPLES: the global batch starts at START and grows by INCREMENT in equal steps over the first
    SAMPLES samples up to --global-batch-size (Megatron's; every size must divide by micro batch x dp)."""
    train_iters: int | None = None
    """Optimizer steps to train for (default: 200, or what --train-samples takes)."""
    train_samples: int | None = None
    """Train on this many samples instead of --train-iters (the schedule's -samples flags then apply)."""
    lr: float = 1e-3
    """Peak learning rate, reached at the end of warmup."""
    min_lr: float = 1e-4
    """Learning rate at the end of decay."""
    lr_warmup_iters: int | None = None
    """Steps of linear warmup from 0 to --lr (default: 20 in an iteration-based run without --lr-warmup-fraction)."""
    lr_warmup_samples: int | None = None
    """With --train-samples: samples of linear warmup (default 0)."""
    lr_warmup_fraction: float | None = None
    """Warmup as this fraction of the decay (--lr-decay-iters or --lr-decay-samples), instead of a length."""
    lr_warmup_init: float = 0.0
    """The lr the linear warmup starts from (Megatron's), rising to --lr (the --decoupled-lr groups' too)."""
    lr_decay_iters: int | None = None
    """Steps over which the lr decays to --min-lr (default: --train-iters)."""
    lr_decay_samples: int | None = None
    """With --train-samples: samples over which the lr decays to --min-lr (default: --train-samples)."""
    lr_decay_style: str = "cosine"
    """Shape of the decay after warmup: cosine, linear, constant, inverse-square-root (peak x sqrt(warmup / step),
    not below --min-lr) or WSD (warmup, stable at --lr, then an anneal over the decay's last --lr-wsd-decay-iters or
    -samples)."""
    lr_wsd_decay_style: str = "exponential"
    """WSD's anneal: exponential, linear, cosine or minus_sqrt."""
    lr_wsd_decay_iters: int | None = None
    """WSD: the anneal's length in steps (it ends where the decay ends)."""
    lr_wsd_decay_samples: int | None = None
    """WSD with --train-samples: the anneal's length in samples."""
    decoupled_lr: float | None = None
    """Peak lr of the input embedding and the output layer, whose schedule is the others' (default: --lr)."""
    decoupled_min_lr: float | None = None
    """--decoupled-lr's floor (default: --min-lr)."""
    calculate_per_token_loss: bool = False
    """Average the loss over the global batch's unmasked tokens, not per microbatch then over microbatches (equal
    whenever every microbatch has as many unmasked tokens)."""
    weight_decay: float = 0.1
    """AdamW decoupled weight decay (not applied to biases and norm weights)."""
    adam_beta1: float = 0.9
    """AdamW beta1."""
    adam_beta2: float = 0.95
    """AdamW beta2."""
    adam_eps: float = 1e-8
    """AdamW epsilon."""
    optimizer: str = "adam"
    """adam (AdamW) or muon: Muon for the hidden layers' matrices, AdamW for embeddings, output layer, norms and biases
    (docs/optimizers.md)."""
    muon_momentum: float = 0.9
    """--optimizer muon: the momentum buffer's decay, M <- beta M + (1 - beta) grad."""
    muon_use_nesterov: bool = False
    """--optimizer muon: orthogonalise the Nesterov update (1 - beta) grad + beta M instead of M."""
    muon_split_qkv: bool = True
    """--optimizer muon: orthogonalise the fused QKV weight as one matrix instead of its query, key and value blocks
    apart."""
    muon_num_ns_steps: int = 5
    """--optimizer muon: Newton-Schulz iterations per orthogonalisation."""
    muon_coefficient_type: str = "quintic"
    """--optimizer muon: the Newton-Schulz coefficients: quintic (a set per step, Megatron's default) or simple (Keller
    Jordan's (3.4445, -4.7750, 2.0315) every step)."""
    muon_scale_mode: str = "spectral"
    """--optimizer muon: the orthogonalised update of a rows x cols matrix times spectral sqrt(max(rows, cols)),
    unit_rms_norm sqrt(rows / cols) or shape_scaling sqrt(max(1, rows / cols))."""
    muon_extra_scale_factor: float = 1.0
    """--optimizer muon: a further factor on the update (0.2 with spectral matches AdamW's update RMS)."""
    muon_tp_mode: str = "duplicated"
    """--optimizer muon: how a tensor-parallel matrix is orthogonalised: duplicated (gathered whole on each of its tp
    ranks; Megatron's blockwise and distributed are not implemented)."""
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
    no_save_optim: bool = False
    """--save: the weights, iteration and RNG state only, no optimizer state (--ckpt-format torch_dist); a run resumes
    from such a checkpoint with --no-load-optim or --finetune."""
    no_load_optim: bool = False
    """--load: take the weights only, not the optimizer state (the optimizer starts fresh)."""
    no_load_rng: bool = False
    """--load: leave the random generators as --seed sets them."""
    finetune: bool = False
    """--load: the weights only, from iteration 0 with no samples consumed (neither optimizer nor RNG state)."""
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
    log_params_norm: bool = False
    """Log the L2 norm of all weights (params-norm)."""
    log_num_zeros_in_grad: bool = False
    """Log how many gradient entries are exactly zero, before clipping (num-zeros)."""
    log_throughput: bool = False
    """Add Megatron's "throughput per GPU (TFLOP/s/GPU): X |" after the step time in the log line (the TFLOP/s/GPU
    field further on, and the throughput tag, are there in any case)."""
    log_timers_to_tensorboard: bool = False
    """Send the step's phases to TensorBoard and wandb, seconds per step averaged over the log interval, under
    Megatron's timer tags: batch-generator-time (reading the microbatches), forward-backward-time (all microbatches'
    forward and backward, the grad reduction included), optimizer-time (clipping and the optimizer step)."""
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
    """Global batches per evaluation (0: no evaluation)."""
    data_path: list[str] | None = None
    """Dataset prefix of a .bin/.idx pair, or weight-prefix pairs to blend (0.7 a 0.3 b); without it a built-in corpus
    is used."""
    mock_data: bool = False
    """Train on random tokens (the same for every layout and run) instead of a corpus; needs no --data-path."""
    split: str = "98,2,0"
    """Train/valid/test proportions of each dataset's documents."""
    reset_position_ids: bool = False
    """Positions restart at 0 after each end-of-document token of a packed sample (Megatron's; RoPE and gpt2's
    position table see each document from its start)."""
    reset_attention_mask: bool = False
    """A token attends only to the earlier tokens of its own document, not across the end-of-document tokens of a
    packed sample (Megatron's; the flash kernel and context parallelism skip other documents' key blocks)."""
    eod_mask_loss: bool = False
    """No loss where the input token is the end-of-document token (whose target is the next document's first token),
    Megatron's; the loss is the mean over the tokens that count."""
    data_cache_dir: str | None = None
    """Where the built-in corpus and the sample indices are cached (default: ~/.cache/megatron_lite or
    $MEGATRON_LITE_CACHE, and cache/ beside --data-path)."""
    num_workers: int = 0
    """Worker processes of a torch DataLoader reading the coming microbatches' training samples ahead of the step
    (Megatron's; its default is 2); 0: read in the training process, which memory-mapped samples make cheap. The
    batches are the same either way."""
    tokenizer_type: str = "ByteTokenizer"
    """Tokenizer the data was preprocessed with: ByteTokenizer (needs no file), SentencePieceTokenizer,
    Llama2Tokenizer (a SentencePiece .model, BOS before each document), HuggingFaceTokenizer, GPT2BPETokenizer
    (--vocab-file, --merge-file; the default when they are given) or NullTokenizer (ids written as numbers,
    --vocab-size)."""
    tokenizer_model: str | None = None
    """The tokenizer's file or folder: a SentencePiece .model, a tokenizer.json or a transformers tokenizer folder."""
    vocab_file: str | None = None
    """GPT2BPETokenizer: its vocab.json."""
    merge_file: str | None = None
    """GPT2BPETokenizer: its merges.txt."""
    tokenizer_vocab_size: int | None = None
    """NullTokenizer: ids 0..N-1, and N ends documents; other tokenizers take their own vocabulary."""
    device: str | None = None
    """cpu or cuda (default: cuda when available)."""

    def __post_init__(self) -> None:
        """The defaults derived from other fields (frozen: set once, here)."""
        if self.train_iters is None:
            object.__setattr__(self, "train_iters", 200 if self.train_samples is None
                               else self.iterations_for(self.train_samples))
        if self.lr_warmup_iters is None and self.train_samples is None and self.lr_warmup_fraction is None:
            object.__setattr__(self, "lr_warmup_iters", 20)

    @property
    def params_dtype(self) -> torch.dtype:
        """The dtype of the model's weights and of what flows between its stages."""
        return torch.bfloat16 if self.bf16 else torch.float16 if self.fp16 else torch.float32

    def num_microbatches(self, data_parallel_size: int = 1, global_batch_size: int | None = None) -> int:
        """Microbatches per step on each rank, of --global-batch-size or of a ramp's `global_batch_size`."""
        return (global_batch_size or self.global_batch_size) // (self.micro_batch_size * data_parallel_size)

    def validate(self, data_parallel_size: int = 1) -> None:
        require_positive(self, "micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                         "tensorboard_log_interval")
        require(self.eval_iters >= 0, f"--eval-iters={self.eval_iters} must be >= 0 (0: no evaluation)")
        require(self.num_workers >= 0, f"--num-workers={self.num_workers} must be >= 0 (0: read in process)")
        self._validate_schedule(data_parallel_size)
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            lower = max(per_step, self.global_batch_size // per_step * per_step)
            raise ConfigError(
                f"--global-batch-size={self.global_batch_size} is not divisible by --micro-batch-size="
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}; "
                f"nearest valid values: {lower} or {lower + per_step}")
        require(self.lr >= 0 and self.min_lr >= 0, f"--lr={self.lr} and --min-lr={self.min_lr} must be >= 0")
        require(self.min_lr <= self.lr, f"--min-lr={self.min_lr} must not exceed --lr={self.lr}")
        require(not (self.bf16 and self.fp16), "--bf16 and --fp16 exclude each other; choose one")
        if self.loss_scale is not None:
            require(self.fp16 and self.loss_scale > 0, f"--loss-scale={self.loss_scale} needs --fp16 and must be > 0")
        require(0 < self.min_loss_scale <= self.initial_loss_scale,
                f"--min-loss-scale={self.min_loss_scale} must be > 0 and at most --initial-loss-scale="
                f"{self.initial_loss_scale}")
        require(self.loss_scale_window > 0 and self.hysteresis > 0,
                f"--loss-scale-window={self.loss_scale_window} and --hysteresis={self.hysteresis} must be positive")
        self._validate_muon()
        require(self.clip_grad >= 0, f"--clip-grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        require(self.weight_decay >= 0, f"--weight-decay={self.weight_decay} must be >= 0")
        require(self.eval_interval >= 0, f"--eval-interval={self.eval_interval} must be >= 0 (0 disables)")
        if self.exit_interval is not None:
            require(self.exit_interval > 0, f"--exit-interval={self.exit_interval} must be positive")
        if self.save_interval is not None:
            require(self.save_interval > 0, f"--save-interval={self.save_interval} must be positive")
        require(self.ckpt_format in CKPT_FORMATS,
                f"--ckpt-format={self.ckpt_format} is unknown; allowed: {', '.join(CKPT_FORMATS)}")
        require(not self.no_save_optim or self.ckpt_format == "torch_dist",
                "--no-save-optim needs --ckpt-format torch_dist (the torch format always holds the optimizer state)")
        if self.keep_last is not None:
            require(self.keep_last > 0, f"--keep-last={self.keep_last} must be positive")
        require(self.device in (None, "cpu", "cuda"), f"--device={self.device} is unknown; allowed: cpu, cuda")
        weights = self.split.replace("/", ",").split(",")
        require(len(weights) == 3 and all(w.strip().replace(".", "", 1).isdigit() for w in weights)
                and sum(float(w) for w in weights) > 0,
                f"--split={self.split} must be three non-negative numbers like 98,2,0")
        require(not (self.mock_data and self.data_path), "--mock-data and --data-path exclude each other; choose one")
        require(self.data_path is not None or self.mock_data or self.tokenizer_type == "ByteTokenizer",
                f"--tokenizer-type={self.tokenizer_type} needs --data-path (data preprocessed with it) or "
                "--mock-data; the built-in corpus is byte-level")
        if self.tokenizer_type == "NullTokenizer":
            require_null_vocab(self.tokenizer_vocab_size)
        require(not self.finetune or self.load is not None, "--finetune needs --load (the weights to start from)")
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
