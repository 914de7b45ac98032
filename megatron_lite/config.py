"""The three configuration dataclasses, their validation, and the two errors a run can end with.

Each field carries a one-line docstring (the string literal under it); `arguments.py` turns
those into `--help` text, so the CLI and the code never disagree on what a field means.
"""
from __future__ import annotations

import os
import signal
from dataclasses import dataclass, field
from pathlib import Path

import torch


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, value and what is allowed."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or grad norm, a checkpoint that failed to save);
    every rank raises it together, and the message says what is left untouched."""


def _require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        _require(value is not None and value > 0, f"{_flag(name)}={value} must be a positive number")


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


FAMILIES = ("llama", "gpt2")
SCHEDULES = ("gpipe", "1f1b", "interleaved")
CP_COMM_TYPES = ("p2p", "allgather", "a2a")
MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
MOE_DISPATCHERS = ("alltoall", "allgather")
# Megatron-FSDP's names for what data-parallel replicas shard: nothing, the optimizer state
# (ZeRO-1), also the gradients (ZeRO-2), also the parameters (ZeRO-3 / FSDP).
SHARDING_STRATEGIES = ("no_shard", "optim", "optim_grads", "optim_grads_params")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe")


@dataclass
class ModelConfig:
    family: str = "llama"
    """Architecture family: llama (RMSNorm, RoPE, SwiGLU, GQA, untied head) or gpt2 (LayerNorm, learned positions, GELU, tied embeddings)."""
    num_layers: int = 4
    """Number of transformer layers."""
    hidden_size: int = 128
    """Width of the residual stream."""
    num_attention_heads: int = 4
    """Number of query heads."""
    num_query_groups: int | None = None
    """Number of key/value heads for grouped-query attention (default: one per query head)."""
    kv_channels: int | None = None
    """Width of each attention head (default: hidden/heads); Qwen3 and Gemma use wider heads."""
    add_qkv_bias: bool = False
    """Biases on the query, key and value projections only (Qwen2), llama family; gpt2 has every bias anyway."""
    qk_layernorm: bool = False
    """Normalise each query and key head (the family's norm over the head dim) before RoPE (Qwen3, OLMo2)."""
    ffn_hidden_size: int | None = None
    """Width of the MLP (default: 4*hidden for gpt2, 8/3*hidden rounded up to 64 for llama)."""
    seq_length: int = 128
    """Tokens per training sample."""
    max_position_embeddings: int | None = None
    """Size of the learned position table for gpt2 (default: seq_length); the RoPE context for llama."""
    vocab_size: int = 258
    """Tokenizer vocabulary size (set from the tokenizer, before padding)."""
    make_vocab_size_divisible_by: int = 128
    """Pad the vocabulary to a multiple of this (times tp) so the embedding shards evenly."""
    norm_epsilon: float = 1e-5
    """Epsilon of the layer norms."""
    rotary_base: float = 10000.0
    """RoPE base frequency (llama family)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init; output projections use std/sqrt(2*num_layers)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    fused_kernels: bool = True
    """Fused kernels (kernels/, Triton on GPU) for norms, RoPE, SwiGLU/GELU, attention and the loss; off: plain torch."""
    recompute_granularity: str | None = None
    """Activation recomputation: full (keep each layer's input, replay the layer in backward) or selective (replay only --recompute-modules); default: none."""
    recompute_method: str | None = None
    """With full: uniform (layers in groups of --recompute-num-layers, each group replayed as one) or block (the first --recompute-num-layers layers of each pipeline chunk, the rest kept)."""
    recompute_num_layers: int | None = None
    """With full: layers per group (uniform, default 1) or layers replayed per chunk (block)."""
    recompute_modules: list[str] | None = None
    """With selective: which parts of each layer to replay, any of core_attn, mlp, layernorm, moe (default: core_attn)."""
    num_experts: int | None = None
    """Experts of each mixture-of-experts layer (default: none, every layer dense)."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """Width of each expert's MLP (default: --ffn-hidden-size)."""
    moe_layer_freq: int = 1
    """Every N-th layer is a mixture of experts (layers N-1, 2N-1, ...), the others dense; 1: all of them."""
    moe_shared_expert_intermediate_size: int | None = None
    """Width of a shared expert every token passes through besides its routed ones (default: none)."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by a learned per-token sigmoid gate (Qwen2-MoE)."""
    moe_router_score_function: str = "softmax"
    """Router scores: softmax over the experts, or sigmoid per expert."""
    moe_router_pre_softmax: bool = False
    """softmax: weights are the softmax over all experts (unnormalised top-k), not over the chosen k."""
    moe_router_load_balancing_type: str = "aux_loss"
    """aux_loss (Switch/GShard, over the microbatch), seq_aux_loss (per sequence), or none."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (0: off)."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router z-loss, mean of logsumexp(logits)^2 (default: off)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for choosing experts, moved each step towards balanced load."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert bias per optimizer step, towards the mean load."""
    moe_expert_capacity_factor: float | None = None
    """Tokens each expert takes at most, as a multiple of an even share (default: dropless)."""
    moe_pad_expert_input_to_capacity: bool = False
    """With a capacity factor: pad every expert's input to its capacity (fixed shapes)."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach their experts under expert parallelism: alltoall (each row to its expert's rank) or allgather (all tokens to every ep rank)."""

    # Fields a run may change when it resumes from a checkpoint: how the model trains, not the
    # function it computes. Every other field is taken from, or checked against, the checkpoint
    # (checkpointing.adopt_checkpoint_model_args); a new field is checked unless listed here.
    TRAINING_ONLY = ("seq_length", "init_method_std", "hidden_dropout", "attention_dropout", "fused_kernels",
                     "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
                     "moe_router_load_balancing_type", "moe_aux_loss_coeff", "moe_z_loss_coeff",
                     "moe_router_bias_update_rate", "moe_token_dispatcher_type")

    def __post_init__(self) -> None:
        if self.num_query_groups is None:
            self.num_query_groups = self.num_attention_heads
        if self.max_position_embeddings is None:
            self.max_position_embeddings = self.seq_length
        if self.ffn_hidden_size is None and self.hidden_size:
            if self.family == "gpt2":
                self.ffn_hidden_size = 4 * self.hidden_size
            else:
                self.ffn_hidden_size = -(-(8 * self.hidden_size // 3) // 64) * 64

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, number: int) -> bool:
        """Whether layer `number` (0-based, global) is a mixture of experts (Megatron's freq: layers freq-1, 2*freq-1, ...)."""
        return bool(self.num_experts) and (number + 1) % self.moe_layer_freq == 0

    @property
    def head_dim(self) -> int:
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def tie_embeddings(self) -> bool:
        return self.family == "gpt2"

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's rule: round the vocabulary up to a multiple of divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    def _validate_moe(self) -> None:
        _require_positive(self, "num_experts", "moe_router_topk", "moe_layer_freq")
        _require(self.moe_router_topk <= self.num_experts,
                 f"--moe-router-topk={self.moe_router_topk} exceeds --num-experts={self.num_experts}")
        _require(self.moe_router_score_function in MOE_SCORE_FUNCTIONS,
                 f"--moe-router-score-function={self.moe_router_score_function} is unknown; allowed: "
                 f"{', '.join(MOE_SCORE_FUNCTIONS)}")
        _require(self.moe_router_load_balancing_type in MOE_LOAD_BALANCING,
                 f"--moe-router-load-balancing-type={self.moe_router_load_balancing_type} is unknown; allowed: "
                 f"{', '.join(MOE_LOAD_BALANCING)}")
        _require(self.moe_token_dispatcher_type in MOE_DISPATCHERS,
                 f"--moe-token-dispatcher-type={self.moe_token_dispatcher_type} is unknown; allowed: "
                 f"{', '.join(MOE_DISPATCHERS)}")
        _require(self.moe_router_score_function == "softmax" or not self.moe_router_pre_softmax,
                 "--moe-router-pre-softmax needs --moe-router-score-function softmax")
        _require(self.moe_aux_loss_coeff >= 0 and (self.moe_z_loss_coeff or 0) >= 0,
                 f"--moe-aux-loss-coeff={self.moe_aux_loss_coeff} and --moe-z-loss-coeff={self.moe_z_loss_coeff} "
                 "must be >= 0")
        if self.moe_expert_capacity_factor is not None:
            _require(self.moe_expert_capacity_factor > 0,
                     f"--moe-expert-capacity-factor={self.moe_expert_capacity_factor} must be > 0 (leave it unset "
                     "for dropless routing)")
        _require(self.moe_expert_capacity_factor is not None or not self.moe_pad_expert_input_to_capacity,
                 "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        _require(not self.moe_shared_expert_gate or self.moe_shared_expert_intermediate_size,
                 "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(self, name) is not None:
                _require_positive(self, name)

    @property
    def selective_recompute(self) -> tuple[str, ...]:
        """The modules selective recomputation replays (none unless --recompute-granularity selective)."""
        if self.recompute_granularity != "selective":
            return ()
        return tuple(self.recompute_modules or ("core_attn",))

    def _validate_recompute(self) -> None:
        granularity, method = self.recompute_granularity, self.recompute_method
        _require(granularity in (None, *RECOMPUTE_GRANULARITIES), f"--recompute-granularity={granularity} is "
                 f"unknown; allowed: {', '.join(RECOMPUTE_GRANULARITIES)}")
        if granularity == "full":
            _require(method in RECOMPUTE_METHODS, f"--recompute-granularity full needs --recompute-method "
                     f"{' or '.join(RECOMPUTE_METHODS)} (it is {method})")
            if method == "block" or self.recompute_num_layers is not None:
                _require_positive(self, "recompute_num_layers")
        else:
            _require(method is None and self.recompute_num_layers is None,
                     "--recompute-method and --recompute-num-layers need --recompute-granularity full")
        _require(granularity == "selective" or self.recompute_modules is None,
                 "--recompute-modules needs --recompute-granularity selective")
        unknown = [m for m in self.selective_recompute if m not in RECOMPUTE_MODULES]
        _require(not unknown, f"--recompute-modules {' '.join(unknown)} is unknown; allowed: {', '.join(RECOMPUTE_MODULES)}")
        _require("moe" not in self.selective_recompute or self.num_experts,
                 "--recompute-modules moe needs --num-experts")

    def validate(self) -> None:
        _require(self.family in FAMILIES, f"--family={self.family} is unknown; allowed: {', '.join(FAMILIES)}")
        self._validate_recompute()
        _require_positive(self, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                          "ffn_hidden_size", "seq_length", "max_position_embeddings", "vocab_size",
                          "make_vocab_size_divisible_by", "norm_epsilon", "init_method_std")
        if self.kv_channels is None:
            _require(self.hidden_size % self.num_attention_heads == 0,
                     f"--hidden-size={self.hidden_size} is not divisible by "
                     f"--num-attention-heads={self.num_attention_heads} (or set --kv-channels)")
        else:
            _require_positive(self, "kv_channels")
        _require(not self.add_qkv_bias or self.family == "llama",
                 "--add-qkv-bias is for the llama family (gpt2 has every bias already)")
        _require(self.num_attention_heads % self.num_query_groups == 0,
                 f"--num-attention-heads={self.num_attention_heads} is not divisible by "
                 f"--num-query-groups={self.num_query_groups}")
        if self.num_experts is not None:
            self._validate_moe()
        if self.family == "llama":
            _require(self.head_dim % 2 == 0, f"head dim {self.head_dim} (--kv-channels or hidden/heads) must be "
                     "even for RoPE")
        if self.family == "gpt2":
            _require(self.seq_length <= self.max_position_embeddings,
                     f"--seq-length={self.seq_length} exceeds the gpt2 position table "
                     f"--max-position-embeddings={self.max_position_embeddings}")
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            _require(0.0 <= value < 1.0, f"{_flag(name)}={value} must be in [0, 1)")


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = 1
    """Ranks that split each layer's weights (Megatron tensor parallelism)."""
    context_parallel_size: int = 1
    """Ranks that split each sequence (context parallelism): every layer sees 1/cp of the tokens, attention exchanges keys and values."""
    cp_comm_type: str = "p2p"
    """How context-parallel attention exchanges keys and values: p2p (ring), allgather (all-gather K/V) or a2a (Ulysses all-to-all)."""
    pipeline_model_parallel_size: int = 1
    """Ranks that split the layers into pipeline stages."""
    virtual_pipeline_model_parallel_size: int | None = None
    """Model chunks per pipeline rank (interleaved 1F1B); default 1."""
    num_layers_per_virtual_pipeline_stage: int | None = None
    """Alternative to --virtual-pipeline-model-parallel-size: layers per model chunk."""
    pipeline_schedule: str | None = None
    """gpipe, 1f1b or interleaved (default: interleaved when vpp > 1, else 1f1b)."""
    sequence_parallel: bool = False
    """Split norms, dropout and the residual stream along the sequence across the tp group (needs tp > 1)."""
    data_parallel_size: int = 1
    """Model replicas; derived as world_size / (tp * pp), never set by hand."""
    use_distributed_optimizer: bool = False
    """Shard fp32 Adam state across data-parallel ranks (ZeRO-1): reduce-scatter grads, all-gather params."""
    data_parallel_sharding_strategy: str | None = None
    """What data-parallel ranks shard: no_shard, optim (ZeRO-1, = --use-distributed-optimizer), optim_grads (ZeRO-2), optim_grads_params (ZeRO-3 / FSDP); default: optim with --use-distributed-optimizer, else no_shard."""
    ddp_bucket_size: int = 40_000_000
    """Elements per data-parallel gradient bucket; a bucket's reduction starts as soon as its grads are final."""
    expert_model_parallel_size: int = 1
    """Ranks that split each MoE layer's experts (expert parallelism), carved out of tp x dp x cp (tp first); tokens reach their experts by all-to-all."""
    overlap_param_gather: bool = False
    """With --use-distributed-optimizer: all-gather the updated parameters in the background, each bucket waited for just before the next forward first uses it."""
    distributed_timeout_minutes: float = 5.0
    """A collective waiting longer than this raises instead of hanging."""

    @property
    def vpp(self) -> int:
        return self.virtual_pipeline_model_parallel_size or 1

    @property
    def sharding(self) -> str:
        """The data-parallel sharding strategy in effect (one of SHARDING_STRATEGIES)."""
        return self.data_parallel_sharding_strategy or ("optim" if self.use_distributed_optimizer else "no_shard")

    @property
    def schedule(self) -> str:
        return self.pipeline_schedule or ("interleaved" if self.vpp > 1 else "1f1b")

    def validate(self) -> None:
        _require_positive(self, "tensor_model_parallel_size", "context_parallel_size", "pipeline_model_parallel_size",
                          "expert_model_parallel_size",
                          "data_parallel_size", "distributed_timeout_minutes", "ddp_bucket_size")
        _require(self.cp_comm_type in CP_COMM_TYPES,
                 f"--cp-comm-type={self.cp_comm_type} is unknown; allowed: {', '.join(CP_COMM_TYPES)}")
        strategy = self.data_parallel_sharding_strategy
        if strategy is not None:
            _require(strategy in SHARDING_STRATEGIES, f"--data-parallel-sharding-strategy={strategy} is unknown; "
                     f"allowed: {', '.join(SHARDING_STRATEGIES)}")
            _require(strategy != "no_shard" or not self.use_distributed_optimizer,
                     "--data-parallel-sharding-strategy=no_shard contradicts --use-distributed-optimizer")
            # Every sharded strategy steps through the distributed optimizer (its Adam state is sharded).
            self.use_distributed_optimizer = strategy != "no_shard"
        _require(not self.overlap_param_gather or self.use_distributed_optimizer,
                 "--overlap-param-gather needs --use-distributed-optimizer (only sharded parameters are gathered)")
        _require(not self.overlap_param_gather or self.sharding != "optim_grads_params",
                 "--overlap-param-gather is for optim and optim_grads; optim_grads_params gathers each layer's "
                 "parameters before it runs anyway, the next layer's in the background")
        if self.virtual_pipeline_model_parallel_size is not None:
            _require_positive(self, "virtual_pipeline_model_parallel_size")
        pp, vpp = self.pipeline_model_parallel_size, self.vpp
        _require(self.schedule in SCHEDULES,
                 f"--pipeline-schedule={self.schedule} is unknown; allowed: {', '.join(SCHEDULES)}")
        _require(vpp == 1 or pp > 1, f"--virtual-pipeline-model-parallel-size={vpp} needs "
                                     f"--pipeline-model-parallel-size > 1 (it is {pp})")
        _require(vpp == 1 or self.schedule == "interleaved",
                 f"--pipeline-schedule={self.schedule} cannot run {vpp} model chunks per rank; "
                 "use --pipeline-schedule interleaved (or leave it unset)")
        _require(self.schedule != "interleaved" or vpp > 1,
                 "--pipeline-schedule=interleaved needs --virtual-pipeline-model-parallel-size > 1")

    def validate_model(self, model: "ModelConfig") -> None:
        """The model must split evenly over the tensor- and pipeline-parallel groups."""
        pp, vpp = self.pipeline_model_parallel_size, self.vpp
        _require(model.num_layers % (pp * vpp) == 0,
                 f"--num-layers={model.num_layers} is not divisible by pp*vpp={pp}*{vpp}={pp * vpp}")
        tp = self.tensor_model_parallel_size
        for name in ("num_attention_heads", "num_query_groups", "ffn_hidden_size"):
            value = getattr(model, name)
            _require(value % tp == 0, f"{_flag(name)}={value} is not divisible by --tensor-model-parallel-size={tp}")
        if self.sequence_parallel:
            _require(model.seq_length % tp == 0,
                     f"--seq-length={model.seq_length} is not divisible by --tensor-model-parallel-size={tp}, "
                     "which --sequence-parallel needs")
        ep = self.expert_model_parallel_size
        if ep > 1:
            _require(model.num_experts is not None, f"--expert-model-parallel-size={ep} needs --num-experts")
            _require(model.num_experts % ep == 0,
                     f"--num-experts={model.num_experts} is not divisible by --expert-model-parallel-size={ep}")
        cp = self.context_parallel_size
        if cp > 1:
            # The sequence is cut into 2*cp chunks (each rank holds two, for causal load balance),
            # and under SP the rank's tokens are cut again over tp.
            chunks = 2 * cp * (tp if self.sequence_parallel else 1)
            _require(model.seq_length % chunks == 0,
                     f"--seq-length={model.seq_length} is not divisible by 2 x --context-parallel-size={cp}"
                     + (f" x --tensor-model-parallel-size={tp} (sequence parallel)" if self.sequence_parallel else "")
                     + f" = {chunks}")
            if self.cp_comm_type == "a2a":
                for name in ("num_attention_heads", "num_query_groups"):
                    value = getattr(model, name)
                    _require(value % (tp * cp) == 0,
                             f"{_flag(name)}={value} is not divisible by tp x cp = {tp * cp}, which "
                             "--cp-comm-type=a2a needs (each rank takes whole heads)")
            _require(model.attention_dropout == 0.0,
                     f"--attention-dropout={model.attention_dropout} is not supported with "
                     f"--context-parallel-size={cp}; use 0")


LR_DECAY_STYLES = ("cosine", "linear", "constant")
EXIT_SIGNALS = tuple(name for name in ("SIGTERM", "SIGINT", "SIGUSR1", "SIGUSR2", "SIGHUP") if hasattr(signal, name))


def _require_writable_dir(name: str, path: str | None) -> None:
    """An output directory must be a directory we can write, or one we can create (checked, not created)."""
    if path is None:
        return
    target = Path(path)
    existing = next(p for p in (target, *target.absolute().parents) if p.exists())
    if existing == target:
        _require(target.is_dir(), f"{_flag(name)}={path} is a file, not a directory")
        _require(os.access(target, os.W_OK | os.X_OK), f"{_flag(name)}={path} is not writable")
    else:
        _require(existing.is_dir(), f"{_flag(name)}={path} cannot be created: {existing} is a file")
        _require(os.access(existing, os.W_OK | os.X_OK),
                 f"{_flag(name)}={path} cannot be created: {existing} is not writable")


@dataclass
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
    """Keep the fp32 main weights and Adam state in host memory and step the optimizer there (grads copied to the host, updated weights back)."""
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
    exit_interval: int | None = None
    """Stop (saving first when --save is set) once the iteration is a multiple of N; the schedule still spans --train-iters."""
    exit_duration_in_mins: float | None = None
    """Stop (saving first when --save is set) after the first step that ends this many minutes after training started."""
    exit_signal_handler: bool = False
    """On --exit-signal (a scheduler's preemption warning) finish the current step, save and exit 0 on every rank."""
    exit_signal: str = "SIGTERM"
    """The signal --exit-signal-handler catches, e.g. SIGUSR1 for Slurm's --signal."""
    check_for_nan_in_loss_and_grad: bool = True
    """Stop before the optimizer step when the loss or the grad norm is not finite (on by default; nothing is saved after it)."""
    log_interval: int = 10
    """Print one log line every N steps."""
    log_dir: str | None = None
    """Where metrics.jsonl is appended (default: the --save directory, else none)."""
    eval_interval: int = 100
    """Evaluate on the validation split every N steps (0 disables)."""
    eval_iters: int = 10
    """Global batches per evaluation."""
    data_path: list[str] | None = None
    """Dataset prefix of a .bin/.idx pair, or weight-prefix pairs to blend (0.7 a 0.3 b); without it a built-in corpus is used."""
    split: str = "98,2,0"
    """Train/valid/test proportions of each dataset's documents."""
    data_cache_dir: str | None = None
    """Where the built-in corpus and the sample indices are cached (default: ~/.cache/megatron_lite or $MEGATRON_LITE_CACHE, and cache/ beside --data-path)."""
    tokenizer_type: str = "ByteTokenizer"
    """Tokenizer the data was preprocessed with: ByteTokenizer (needs no file), SentencePieceTokenizer or HuggingFaceTokenizer."""
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
        _require_positive(self, "micro_batch_size", "global_batch_size", "train_iters", "log_interval",
                          "eval_iters")
        per_step = self.micro_batch_size * data_parallel_size
        if self.global_batch_size % per_step:
            lower = max(per_step, self.global_batch_size // per_step * per_step)
            raise ConfigError(
                f"--global-batch-size={self.global_batch_size} is not divisible by --micro-batch-size="
                f"{self.micro_batch_size} x data-parallel size {data_parallel_size} = {per_step}; "
                f"nearest valid values: {lower} or {lower + per_step}")
        _require(self.lr >= 0 and self.min_lr >= 0, f"--lr={self.lr} and --min-lr={self.min_lr} must be >= 0")
        _require(self.min_lr <= self.lr, f"--min-lr={self.min_lr} must not exceed --lr={self.lr}")
        _require(self.lr_warmup_iters >= 0, f"--lr-warmup-iters={self.lr_warmup_iters} must be >= 0")
        _require(self.lr_decay_style in LR_DECAY_STYLES,
                 f"--lr-decay-style={self.lr_decay_style} is unknown; allowed: {', '.join(LR_DECAY_STYLES)}")
        if self.lr_decay_iters is not None:
            _require(self.lr_decay_iters > 0, f"--lr-decay-iters={self.lr_decay_iters} must be positive")
        _require(not (self.bf16 and self.fp16), "--bf16 and --fp16 exclude each other; choose one")
        if self.loss_scale is not None:
            _require(self.fp16 and self.loss_scale > 0, f"--loss-scale={self.loss_scale} needs --fp16 and must be > 0")
        _require(0 < self.min_loss_scale <= self.initial_loss_scale,
                 f"--min-loss-scale={self.min_loss_scale} must be > 0 and at most --initial-loss-scale="
                 f"{self.initial_loss_scale}")
        _require(self.loss_scale_window > 0 and self.hysteresis > 0,
                 f"--loss-scale-window={self.loss_scale_window} and --hysteresis={self.hysteresis} must be positive")
        _require(self.clip_grad >= 0, f"--clip-grad={self.clip_grad} must be >= 0 (0 disables clipping)")
        _require(self.weight_decay >= 0, f"--weight-decay={self.weight_decay} must be >= 0")
        _require(self.eval_interval >= 0, f"--eval-interval={self.eval_interval} must be >= 0 (0 disables)")
        if self.exit_interval is not None:
            _require(self.exit_interval > 0, f"--exit-interval={self.exit_interval} must be positive")
        if self.save_interval is not None:
            _require(self.save_interval > 0, f"--save-interval={self.save_interval} must be positive")
        if self.keep_last is not None:
            _require(self.keep_last > 0, f"--keep-last={self.keep_last} must be positive")
        _require(self.device in (None, "cpu", "cuda"), f"--device={self.device} is unknown; allowed: cpu, cuda")
        weights = self.split.replace("/", ",").split(",")
        _require(len(weights) == 3 and all(w.strip().replace(".", "", 1).isdigit() for w in weights)
                 and sum(float(w) for w in weights) > 0,
                 f"--split={self.split} must be three non-negative numbers like 98,2,0")
        _require(self.data_path is not None or self.tokenizer_type == "ByteTokenizer",
                 f"--tokenizer-type={self.tokenizer_type} needs --data-path (data preprocessed with it); "
                 "the built-in corpus is byte-level")
        if self.ckpt_step is not None:
            _require(self.load is not None, f"--ckpt-step={self.ckpt_step} needs --load")
            _require(self.ckpt_step >= 0, f"--ckpt-step={self.ckpt_step} must be >= 0")
        if self.exit_duration_in_mins is not None:
            _require(self.exit_duration_in_mins > 0,
                     f"--exit-duration-in-mins={self.exit_duration_in_mins} must be positive")
        _require(self.exit_signal in EXIT_SIGNALS,
                 f"--exit-signal={self.exit_signal} is not a signal a job is warned with; allowed: {', '.join(EXIT_SIGNALS)}")
        for name in ("save", "log_dir"):
            _require_writable_dir(name, getattr(self, name))


@dataclass
class Config:
    """Everything one run needs; `arguments.parse_args` builds it."""
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_flags_given: tuple[str, ...] | None = None
    """ModelConfig fields the user set (a flag, or the --model preset named on the command line);
    None for a Config built in code, where every field counts as set. On --load, a field that is
    set must match the checkpoint and one that is not is taken from it."""

    def validate(self) -> None:
        self.model.validate()
        self.parallel.validate()
        self.parallel.validate_model(self.model)
        self.train.validate(self.parallel.data_parallel_size)
        _require(not (self.model.recompute_granularity and self.parallel.sharding == "optim_grads_params"),
                 "--recompute-granularity with --data-parallel-sharding-strategy=optim_grads_params is not "
                 "supported yet (a replayed layer would free the parameters its backward still needs)")
        _require(not (self.train.compile and self.parallel.sharding == "optim_grads_params"),
                 "--compile with --data-parallel-sharding-strategy=optim_grads_params is not supported (the "
                 "parameters are gathered and freed around each layer, outside what a compiled layer may assume)")
        m, pp = self.train.num_microbatches(self.parallel.data_parallel_size), self.parallel.pipeline_model_parallel_size
        # Megatron's interleaved schedule runs microbatches in groups of pp.
        _require(self.parallel.schedule != "interleaved" or m % pp == 0,
                 f"the interleaved schedule needs the number of microbatches (global batch "
                 f"{self.train.global_batch_size} / (micro batch {self.train.micro_batch_size} x dp "
                 f"{self.parallel.data_parallel_size}) = {m}) to be a multiple of "
                 f"--pipeline-model-parallel-size={pp}")


def field_docs(cls: type) -> dict[str, str]:
    """The one-line docstring under each dataclass field, read from the source."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = nxt.value.value
    return docs
