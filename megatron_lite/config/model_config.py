"""The model's configuration: architecture, mixture of experts, activation recomputation.

Each field carries a one-line docstring (the string literal under it); `training/arguments.py` turns
those into `--help` text, so the CLI and the code never disagree on what a field means.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.checks import flag, require, require_positive
from megatron_lite.config.mla_checks import MLAChecks
from megatron_lite.config.moe_checks import MoEChecks
from megatron_lite.config.rope_scaling import RopeScalingChecks

FAMILIES = ("llama", "gpt2")
RECOMPUTE_GRANULARITIES = ("full", "selective")
RECOMPUTE_METHODS = ("uniform", "block")
RECOMPUTE_MODULES = ("core_attn", "mlp", "layernorm", "moe", "mla_up_proj")


@dataclass(frozen=True)
class ModelConfig(MLAChecks, MoEChecks, RopeScalingChecks):
    family: str = "llama"
    """Architecture family: llama (RMSNorm, RoPE, SwiGLU, GQA, untied head unless tied) or gpt2 (LayerNorm, learned
    positions, GELU, tied embeddings)."""
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
    multi_latent_attention: bool = False
    """DeepSeek-V2/V3's multi-latent attention (MLA), llama family: each layer compresses the hidden state into a
    --kv-lora-rank latent (and, with --q-lora-rank, a query latent) and up-projects every head's key and value (and
    query) from it; a query or key head is --qk-head-dim channels without position and --qk-pos-emb-head-dim rotated
    ones (the key's rotated part shared by all heads), a value head --v-head-dim. --qk-layernorm normalises the two
    latents. Megatron's --rotary-scaling-factor, --mscale and --mscale-all-dim give its YaRN."""
    q_lora_rank: int | None = None
    """MLA: width of the query latent (DeepSeek-V3: 1536); default: queries projected from the hidden state."""
    kv_lora_rank: int = 32
    """MLA: width of the latent keys and values are up-projected from (DeepSeek-V3: 512)."""
    qk_head_dim: int = 128
    """MLA: channels of each query and key head that carry no position."""
    qk_pos_emb_head_dim: int = 64
    """MLA: channels of each query and key head that RoPE rotates (the key's one per token, shared by all heads)."""
    v_head_dim: int = 128
    """MLA: width of each value head."""
    untie_embeddings_and_output_weights: bool | None = None
    """Give the output layer its own weight instead of the embedding table's; --tie-embeddings-and-output-weights
    shares it (Llama 3.2, Qwen2.5 small, SmolLM). Default: the family's, gpt2 tied, llama untied."""
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
    apply_layernorm_1p: bool = False
    """Zero-centred norm weights (Megatron's): every norm stores gamma - 1, initialised at 0, and scales by 1 + weight
    (checkpoints hold the stored value; Hugging Face export writes gamma). Norm weights carry no weight decay, so the
    same model trains the same steps; what changes is the stored value's precision near gamma = 1."""
    rotary_base: float = 10000.0
    """RoPE base frequency (llama family)."""
    rotary_percent: float = 1.0
    """Fraction of each head RoPE rotates (Megatron's): the first int(head dim * fraction) channels, in the
    rotate-half convention over those channels with frequencies of that width; the others pass through unrotated."""
    rope_scaling_type: str = "none"
    """RoPE scaling for a context longer than the pretraining one (llama family), Hugging Face's rope_type: linear
    (every frequency divided by the factor), llama3 (Llama 3.1's: long wavelengths divided by the factor, short ones
    kept, a smooth ramp between; Megatron's --use-rope-scaling) or yarn (YaRN: the same split by rotations within
    the original context, and cos/sin scaled by an attention factor)."""
    rope_scaling_factor: float | None = None
    """How many times the original context the scaled one is; every --rope-scaling-type needs it (Megatron's
    --rope-scaling-factor)."""
    rope_scaling_original_max_position_embeddings: int | None = None
    """The context the model was pretrained with, before scaling; llama3 and yarn need it (they keep the frequencies
    that turn often within it)."""
    rope_scaling_low_freq_factor: float = 1.0
    """llama3: wavelengths longer than original context / this are divided by the factor."""
    rope_scaling_high_freq_factor: float = 4.0
    """llama3: wavelengths shorter than original context / this are kept; between the two bounds the factor ramps
    smoothly."""
    rope_scaling_beta_fast: float | None = None
    """yarn: frequencies turning more than this many times within the original context are kept (default 32)."""
    rope_scaling_beta_slow: float | None = None
    """yarn: frequencies turning fewer than this many times are divided by the factor (default 1); a linear ramp
    between."""
    rope_scaling_mscale: float | None = None
    """yarn, with --rope-scaling-mscale-all-dim (DeepSeek's): the attention factor is (0.1*mscale*ln(factor)+1) /
    (0.1*mscale_all_dim*ln(factor)+1)."""
    rope_scaling_mscale_all_dim: float | None = None
    """yarn: the denominator's mscale of the attention factor, with --rope-scaling-mscale."""
    rope_scaling_attention_factor: float | None = None
    """yarn: the scale of cos and sin, the attention logits' temperature (default: 0.1*ln(factor)+1, or the mscale
    ratio)."""
    init_method_std: float = 0.02
    """Standard deviation of the normal weight init; output projections use std/sqrt(2*num_layers)."""
    hidden_dropout: float = 0.0
    """Dropout on the residual branches."""
    attention_dropout: float = 0.0
    """Dropout on the attention probabilities."""
    window_size: int | None = None
    """Sliding-window attention (Mistral), Megatron's LEFT,RIGHT: each token attends to itself and the LEFT tokens
    before it, nothing earlier (flash attention's left window; Hugging Face's sliding_window is LEFT plus one); RIGHT
    must be 0 (a causal decoder sees no later token), and one number N means N,0. Unset, or LEFT -1 (written
    --window-size=-1,0 or --window-size -1): the whole causal context."""
    window_attn_skip_freq: int | list[int] | None = None
    """Which layers slide, with --window-size (Megatron's): an integer N makes every N-th layer (layers N, 2N, ...,
    counting from 1) attend fully and the others slide (2: Gemma-2's alternation; 6: Gemma-3's five to one); a list
    such as [1,1,1,0]*3 or ([1]*5+[0])*4 gives each layer 1 (slide) or 0 (full). Default: every layer slides."""
    mtp_num_layers: int | None = None
    """Multi-token prediction (DeepSeek-V3's, as Megatron-Core builds it): this many extra modules after the last
    layer, module k predicting the token k+1 positions ahead from module k-1's output and the embedding of the token
    k ahead, through its own transformer layer and the shared output layer (llama family); training only, generation
    and Hugging Face export leave them out. Default (or 0): none."""
    mtp_loss_scaling_factor: float = 0.1
    """With --mtp-num-layers: the mean of the modules' losses times this is added to the lm loss."""
    fused_kernels: bool = True
    """Fused kernels (megatron_lite/kernels/, Triton on GPU) for norms, RoPE, SwiGLU/GELU, attention and the loss; off:
    plain torch."""
    recompute_granularity: str | None = None
    """Activation recomputation: full (keep each layer's input, replay the layer in backward) or selective (replay only
    --recompute-modules); default: none."""
    recompute_method: str | None = None
    """With full: uniform (layers in groups of --recompute-num-layers, each group replayed as one) or block (the first
    --recompute-num-layers layers of each pipeline chunk, the rest kept)."""
    recompute_num_layers: int | None = None
    """With full: layers per group (uniform, default 1) or layers replayed per chunk (block)."""
    recompute_modules: list[str] | None = None
    """With selective: which parts of each layer to replay, any of core_attn, mlp, layernorm, moe, mla_up_proj (MLA's
    up-projections and RoPE) (default: core_attn)."""
    num_experts: int | None = None
    """Experts of each mixture-of-experts layer (default: none, every layer dense)."""
    moe_router_topk: int = 2
    """Experts each token is routed to."""
    moe_ffn_hidden_size: int | None = None
    """Width of each expert's MLP (default: --ffn-hidden-size)."""
    moe_layer_freq: int | list[int] = 1
    """Every N-th layer is a mixture of experts (layers N-1, 2N-1, ...), the others dense; 1: all of them. Or, as
    Megatron takes it, a list expression giving each layer 1 (MoE) or 0 (dense), such as ([0]*3+[1]*58)
    (DeepSeek-V3's three dense layers first)."""
    moe_shared_expert_intermediate_size: int | None = None
    """Width of a shared expert every token passes through besides its routed ones (default: none)."""
    moe_shared_expert_gate: bool = False
    """Scale the shared expert's output by a learned per-token sigmoid gate (Qwen2-MoE)."""
    moe_router_score_function: str = "softmax"
    """Router scores: softmax over the experts, or sigmoid per expert."""
    moe_router_pre_softmax: bool = False
    """softmax: weights are the softmax over all experts (unnormalised top-k), not over the chosen k. Sigmoid scores
    ignore it, as Megatron's do (DeepSeek-V3's recipe gives both)."""
    moe_router_topk_scaling_factor: float | None = None
    """The chosen experts' weights are multiplied by this (DeepSeek-V3's 2.5 with sigmoid scores); default: 1."""
    moe_router_num_groups: int | None = None
    """Group-limited routing (DeepSeek's device-limited routing): the experts form this many equal groups, and each
    token picks its experts within the --moe-router-group-topk groups whose best topk/group-topk scores sum highest."""
    moe_router_group_topk: int | None = None
    """With --moe-router-num-groups: the groups each token routes within."""
    moe_router_load_balancing_type: str = "aux_loss"
    """aux_loss (Switch/GShard, over the microbatch), seq_aux_loss (per sequence), or none."""
    moe_aux_loss_coeff: float = 0.0
    """Weight of the load-balancing loss (0: off)."""
    moe_z_loss_coeff: float | None = None
    """Weight of the router z-loss, mean of logsumexp(logits)^2 (default: off)."""
    moe_router_enable_expert_bias: bool = False
    """Aux-loss-free balancing (DeepSeek-V3): a per-expert bias added to the scores for choosing experts, moved each
    step towards balanced load."""
    moe_router_bias_update_rate: float = 1e-3
    """Step of the expert bias per optimizer step, towards the mean load."""
    moe_router_force_load_balancing: bool = False
    """Benchmarking only (Megatron's): route by standard normal logits instead of the router's, so that expert loads
    are even on average whatever the weights; the router's gradient passes straight through."""
    moe_expert_capacity_factor: float | None = None
    """Tokens each expert takes at most, as a multiple of an even share (default: dropless)."""
    moe_pad_expert_input_to_capacity: bool = False
    """With a capacity factor: pad every expert's input to its capacity (fixed shapes)."""
    moe_token_dispatcher_type: str = "alltoall"
    """How tokens reach their experts under expert parallelism: alltoall (each row to its expert's rank) or allgather
    (all tokens to every ep rank)."""

    # Fields a run may change when it resumes from a checkpoint: how the model trains, not the
    # function it computes. Every other field is taken from, or checked against, the checkpoint
    # (checkpointing.adopt_checkpoint_model_args); a new field is checked unless listed here.
    TRAINING_ONLY = ("seq_length", "init_method_std", "hidden_dropout", "attention_dropout", "fused_kernels",
                     "recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules",
                     "mtp_loss_scaling_factor", "moe_router_load_balancing_type", "moe_aux_loss_coeff",
                     "moe_z_loss_coeff", "moe_router_bias_update_rate", "moe_token_dispatcher_type")

    def __post_init__(self) -> None:
        """The defaults derived from other fields (frozen: set once, here)."""
        def default(name: str, value: object) -> None:
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        default("num_query_groups", self.num_attention_heads)
        if self.mtp_num_layers == 0:  # one way to say "none": a checkpoint saved with 0 loads where it is unset
            object.__setattr__(self, "mtp_num_layers", None)
        default("max_position_embeddings", self.seq_length)
        if self.hidden_size:
            default("ffn_hidden_size", 4 * self.hidden_size if self.family == "gpt2"
                    else -(-(8 * self.hidden_size // 3) // 64) * 64)

    def layer_window(self, number: int) -> int | None:
        """The window of layer `number` (0-based, global), None for the whole causal context: --window-size on the
        layers --window-attn-skip-freq leaves sliding (Megatron's is_layer_window_attention, whose layers count from
        1). Every attention of the layer (training, context parallelism, the KV cache) and the FLOPs read this."""
        freq = self.window_attn_skip_freq
        if freq is None:
            return self.window_size
        sliding = (number + 1) % freq != 0 if isinstance(freq, int) else freq[number] == 1
        return self.window_size if sliding else None

    @property
    def layer_windows(self) -> list[int | None]:
        """layer_window of every layer, in order."""
        return [self.layer_window(number) for number in range(self.num_layers)]

    @property
    def mtp_depths(self) -> int:
        """The number of multi-token prediction modules (0: none)."""
        return self.mtp_num_layers or 0

    @property
    def embedding_on_last_stage(self) -> bool:
        """Whether the last pipeline stage reads the embedding table too: as the tied output layer,
        or to embed the tokens ahead for the multi-token prediction modules."""
        return self.tie_embeddings or self.mtp_depths > 0

    @property
    def head_dim(self) -> int:
        """Width of each query and key head (MLA: its unrotated and rotated channels together)."""
        if self.multi_latent_attention:
            return self.qk_head_dim + self.qk_pos_emb_head_dim
        return self.kv_channels or self.hidden_size // self.num_attention_heads

    @property
    def value_head_dim(self) -> int:
        """Width of each value head: the head dim, but MLA's --v-head-dim."""
        return self.v_head_dim if self.multi_latent_attention else self.head_dim

    @property
    def rotary_dim(self) -> int:
        """The channels of each head RoPE rotates (Megatron's int(kv_channels * rotary_percent); MLA's
        --qk-pos-emb-head-dim)."""
        if self.multi_latent_attention:
            return self.qk_pos_emb_head_dim
        return int(self.head_dim * self.rotary_percent)

    @property
    def context_length(self) -> int:
        """The most positions the model can look at: its position table (gpt2) or rotary table (llama)."""
        return max(self.seq_length, self.max_position_embeddings)

    @property
    def tie_embeddings(self) -> bool:
        """Whether the output layer is the embedding table. Left unset, the family decides: checkpoints
        from before the field exist, and every llama one of them is untied."""
        if self.untie_embeddings_and_output_weights is None:
            return self.family == "gpt2"
        return not self.untie_embeddings_and_output_weights

    def padded_vocab_size(self, tp: int = 1) -> int:
        """Megatron's rule: round the vocabulary up to a multiple of divisible_by * tp."""
        multiple = self.make_vocab_size_divisible_by * tp
        return -(-self.vocab_size // multiple) * multiple

    @property
    def selective_recompute(self) -> tuple[str, ...]:
        """The modules selective recomputation replays (none unless --recompute-granularity selective)."""
        if self.recompute_granularity != "selective":
            return ()
        return tuple(self.recompute_modules or ("core_attn",))

    def _validate_recompute(self) -> None:
        granularity, method = self.recompute_granularity, self.recompute_method
        require(granularity in (None, *RECOMPUTE_GRANULARITIES), f"--recompute-granularity={granularity} is "
                f"unknown; allowed: {', '.join(RECOMPUTE_GRANULARITIES)}")
        if granularity == "full":
            require(method in RECOMPUTE_METHODS, f"--recompute-granularity full needs --recompute-method "
                    f"{' or '.join(RECOMPUTE_METHODS)} (it is {method})")
            if method == "block" or self.recompute_num_layers is not None:
                require_positive(self, "recompute_num_layers")
        else:
            require(method is None and self.recompute_num_layers is None,
                    "--recompute-method and --recompute-num-layers need --recompute-granularity full")
        require(granularity == "selective" or self.recompute_modules is None,
                "--recompute-modules needs --recompute-granularity selective")
        unknown = [m for m in self.selective_recompute if m not in RECOMPUTE_MODULES]
        require(not unknown, f"--recompute-modules {' '.join(unknown)} is unknown; "
                             f"allowed: {', '.join(RECOMPUTE_MODULES)}")
        require("moe" not in self.selective_recompute or self.num_experts,
                "--recompute-modules moe needs --num-experts")
        require("mla_up_proj" not in self.selective_recompute or self.multi_latent_attention,
                "--recompute-modules mla_up_proj needs --multi-latent-attention")

    def _validate_window_pattern(self) -> None:
        freq = self.window_attn_skip_freq
        if freq is None:
            return
        require(self.window_size is not None, f"--window-attn-skip-freq={freq} needs --window-size (it says which "
                "layers slide)")
        if isinstance(freq, int):
            require(freq > 0, f"--window-attn-skip-freq={freq} must be a positive number or a list of 0 and 1")
        else:
            require(len(freq) == self.num_layers and set(freq) <= {0, 1},
                    f"--window-attn-skip-freq={freq} must give each of the --num-layers={self.num_layers} layers 1 "
                    "(slide) or 0 (full)")

    def _validate_mtp(self) -> None:
        require(0 < self.mtp_num_layers < self.seq_length, f"--mtp-num-layers={self.mtp_num_layers} must be "
                f"below --seq-length={self.seq_length} (module k predicts the token k+1 positions ahead)")
        require(self.mtp_loss_scaling_factor >= 0,
                f"--mtp-loss-scaling-factor={self.mtp_loss_scaling_factor} must be >= 0")
        # Module k embeds the token k positions ahead with the shared embedding; gpt2 would need its learned
        # position table on the last pipeline stage too.
        require(self.family == "llama", f"--mtp-num-layers is for the llama family (rotary positions); "
                f"--family={self.family} is not supported with it")
        require(not isinstance(self.window_attn_skip_freq, list), "--mtp-num-layers with a per-layer "
                "--window-attn-skip-freq list is not supported (the list names no window for the MTP layers); "
                "give an integer frequency")

    def validate(self) -> None:
        require(self.family in FAMILIES, f"--family={self.family} is unknown; allowed: {', '.join(FAMILIES)}")
        self._validate_recompute()
        require_positive(self, "num_layers", "hidden_size", "num_attention_heads", "num_query_groups",
                         "ffn_hidden_size", "seq_length", "max_position_embeddings", "vocab_size",
                         "make_vocab_size_divisible_by", "norm_epsilon", "init_method_std")
        if self.multi_latent_attention:
            self._validate_mla()
        elif self.kv_channels is None:
            require(self.hidden_size % self.num_attention_heads == 0,
                    f"--hidden-size={self.hidden_size} is not divisible by "
                    f"--num-attention-heads={self.num_attention_heads} (or set --kv-channels)")
        else:
            require_positive(self, "kv_channels")
        require(not (self.untie_embeddings_and_output_weights and self.family == "gpt2"),
                "--untie-embeddings-and-output-weights is for the llama family: GPT2LMHeadModel cannot represent "
                "a gpt2 model with an untied head")
        require(not self.add_qkv_bias or self.family == "llama",
                "--add-qkv-bias is for the llama family (gpt2 has every bias already)")
        require(self.num_attention_heads % self.num_query_groups == 0,
                f"--num-attention-heads={self.num_attention_heads} is not divisible by "
                f"--num-query-groups={self.num_query_groups}")
        if self.num_experts is not None:
            self._validate_moe()
        self._validate_rope_scaling()
        if self.family == "llama":
            require(self.head_dim % 2 == 0, f"head dim {self.head_dim} (--kv-channels or hidden/heads) must be "
                    "even for RoPE")
        require(0.0 < self.rotary_percent <= 1.0 and self.rotary_dim % 2 == 0 and self.rotary_dim > 0,
                f"--rotary-percent={self.rotary_percent} must be in (0, 1] and rotate an even, non-zero number of "
                f"channels (head dim {self.head_dim} x {self.rotary_percent} = {self.rotary_dim})")
        require(self.rotary_percent == 1.0 or self.family == "llama",
                f"--rotary-percent={self.rotary_percent} is for the llama family (RoPE); gpt2 has learned positions")
        if self.family == "gpt2":
            require(self.seq_length <= self.max_position_embeddings,
                    f"--seq-length={self.seq_length} exceeds the gpt2 position table "
                    f"--max-position-embeddings={self.max_position_embeddings}")
        require(self.window_size is None or self.window_size >= 0,
                f"--window-size={self.window_size} must be >= 0 (the tokens before each token it attends to)")
        self._validate_window_pattern()
        if self.mtp_depths:
            self._validate_mtp()
        for name in ("hidden_dropout", "attention_dropout"):
            value = getattr(self, name)
            require(0.0 <= value < 1.0, f"{flag(name)}={value} must be in [0, 1)")
