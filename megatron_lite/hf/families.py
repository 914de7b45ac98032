"""Which Hugging Face `transformers` family represents a model, and the config.json of each.

Ours -> HF (`hf_config`): the llama family is LlamaForCausalLM, MistralForCausalLM with a
sliding window on every layer, Qwen2ForCausalLM with q/k/v biases, Qwen3ForCausalLM with per-head
q/k norms (both with a sliding window on any of their layers: their layer_types say which, as
Gemma-2's alternation or Qwen's max_window_layers); with experts, MixtralForCausalLM (every layer
MoE, softmax top-k renormalised), Qwen2MoeForCausalLM (a gated shared expert, q/k/v biases or
not) or Qwen3MoeForCausalLM (q/k norms). gpt2 is GPT2LMHeadModel. What no family represents is
refused with one line naming it.

HF -> ours (`model_config_from_hf`): every config.json field that changes what the model
computes is mapped or refused with one line naming the field and its value; nothing is
dropped silently. Fields that only matter to training in transformers (the router's aux-loss
weight) map to ours where we have them.
"""
from __future__ import annotations

from megatron_lite.config import ConfigError, ModelConfig

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
                 "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")
# The rope_parameters fields each rope_type we compute reads; ours is --rope-scaling-<field>
# (rope_scaling_<field>), and rope_type "default" is our --rope-scaling-type none.
ROPE_FIELDS = {"default": (), "linear": ("factor",),
               "llama3": ("factor", "original_max_position_embeddings", "low_freq_factor", "high_freq_factor"),
               "yarn": ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale",
                        "mscale_all_dim", "attention_factor")}


def hf_family(model: ModelConfig) -> str:
    """The model_type of the HF family that computes what `model` does; ConfigError if none."""
    if model.multi_latent_attention:
        raise ConfigError("no Hugging Face family here represents multi-latent attention (DeepSeek-V3's "
                          "DeepseekV3ForCausalLM is not mapped yet)")
    if model.family == "gpt2":
        for bad, why in ((model.num_experts, "experts"), (model.qk_layernorm, "q/k norms"),
                         (_sliding_window(model) is not None, "a sliding window"),
                         (model.kv_channels not in (None, model.hidden_size // model.num_attention_heads),
                          f"--kv-channels={model.kv_channels}"),
                         (model.num_query_groups != model.num_attention_heads,
                          f"grouped-query attention (num_query_groups={model.num_query_groups} < "
                          f"num_attention_heads={model.num_attention_heads})")):
            if bad:
                raise ConfigError(f"GPT2LMHeadModel cannot represent {why}, which this gpt2-family model has")
        return "gpt2"
    if model.rotary_percent != 1.0:
        raise ConfigError(f"--rotary-percent={model.rotary_percent}: no Hugging Face family here represents partial "
                          "RoPE (the Llama, Mistral, Qwen and Mixtral families rotate the whole head)")
    if model.add_qkv_bias and model.qk_layernorm:
        raise ConfigError("no Hugging Face family has q/k/v biases and q/k norms together")
    some_layers_only = len(set(model.layer_windows)) > 1
    if not model.num_experts:
        if some_layers_only and not (model.add_qkv_bias or model.qk_layernorm):
            raise ConfigError("no Hugging Face family represents a sliding window on some layers only without q/k/v "
                              "biases or q/k norms (Qwen2's and Qwen3's layer_types do; Mistral's window is every "
                              "layer's)")
        return ("qwen2" if model.add_qkv_bias else "qwen3" if model.qk_layernorm
                else "llama" if _sliding_window(model) is None else "mistral")
    family = ("qwen2_moe" if model.moe_shared_expert_intermediate_size else "qwen3_moe" if model.qk_layernorm
              else "mixtral")
    refusals = [
        (model.moe_router_score_function != "softmax", "sigmoid router scores (they are softmax in every family)"),
        (model.moe_router_enable_expert_bias, "an expert bias"),
        (model.moe_router_num_groups is not None, "group-limited routing"),
        (model.moe_router_topk_scaling_factor not in (None, 1.0), "scaled top-k weights"),
        (isinstance(model.moe_layer_freq, list), "a --moe-layer-freq list (decoder_sparse_step is a frequency)"),
        (model.moe_expert_capacity_factor is not None, "a capacity factor (the families are dropless)"),
        (family == "qwen2_moe" and not model.moe_shared_expert_gate,
         "a shared expert without a gate (Qwen2-MoE's is gated: --moe-shared-expert-gate)"),
        (family == "qwen2_moe" and model.qk_layernorm, "a shared expert with q/k norms"),
        (family == "qwen3_moe" and model.add_qkv_bias, "q/k norms with q/k/v biases"),
        (family != "mixtral" and _sliding_window(model) is not None,
         "a sliding window with a shared expert or q/k norms (only Mixtral's is every layer's)"),
        (family == "mixtral" and some_layers_only, "a sliding window on some layers only (Mixtral's is every "
         "layer's)"),
        (family == "mixtral" and model.add_qkv_bias, "q/k/v biases without a shared expert or q/k norms"),
        (family == "mixtral" and model.moe_layer_freq != 1,
         f"--moe-layer-freq={model.moe_layer_freq} without a shared expert or q/k norms (every Mixtral layer is MoE)"),
        (family == "mixtral" and model.moe_router_pre_softmax,
         "unnormalised top-k weights without a shared expert or q/k norms (Mixtral renormalises)")]
    why = next((why for bad, why in refusals if bad), None)
    if why:
        raise ConfigError(f"no Hugging Face family represents this mixture of experts: {why}")
    return family


def hf_config(model: ModelConfig) -> dict:
    """config.json of the family `hf_family` names."""
    family = hf_family(model)
    if family == "gpt2":
        return {"architectures": [ARCHITECTURES[family]], "model_type": "gpt2", "vocab_size": model.vocab_size,
                "n_embd": model.hidden_size, "n_inner": model.ffn_hidden_size, "n_layer": model.num_layers,
                "n_head": model.num_attention_heads, "n_positions": model.max_position_embeddings,
                "activation_function": "gelu_new", "layer_norm_epsilon": model.norm_epsilon,
                "resid_pdrop": model.hidden_dropout, "embd_pdrop": model.hidden_dropout,
                "attn_pdrop": model.attention_dropout, "tie_word_embeddings": True, "torch_dtype": "float32"}
    config = {"architectures": [ARCHITECTURES[family]], "model_type": family, "vocab_size": model.vocab_size,
              "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
              "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
              "num_key_value_heads": model.num_query_groups, "head_dim": model.head_dim, "hidden_act": "silu",
              "max_position_embeddings": model.context_length,
              "rms_norm_eps": model.norm_epsilon, "rope_theta": model.rotary_base,
              "rope_parameters": _rope_parameters(model),
              "tie_word_embeddings": model.tie_embeddings, "attention_dropout": model.attention_dropout,
              "torch_dtype": "float32"}
    config.update({"llama": {"attention_bias": False, "mlp_bias": False},
                   "qwen3": {"attention_bias": False}, "qwen3_moe": {"attention_bias": False},
                   "qwen2_moe": {"qkv_bias": model.add_qkv_bias}}.get(family, {}))
    sliding_window = _sliding_window(model)
    if family in ("mistral", "mixtral"):
        config["sliding_window"] = sliding_window
    elif family.startswith("qwen"):
        # layer_types name each layer's attention. Without them transformers slides the layers from
        # max_window_layers onwards, so that is the first sliding layer: right wherever the pattern is Qwen's.
        windows = model.layer_windows
        config.update(use_sliding_window=sliding_window is not None, sliding_window=sliding_window,
                      max_window_layers=next((i for i, w in enumerate(windows) if w is not None), model.num_layers))
        if family in ("qwen2", "qwen3"):
            config["layer_types"] = ["full_attention" if w is None else "sliding_attention" for w in windows]
    if family == "mixtral":
        config.update({"intermediate_size": model.expert_ffn_hidden_size, "num_local_experts": model.num_experts,
                       "router_jitter_noise": 0.0})
    elif family in MOE_FAMILIES:
        config.update({"num_experts": model.num_experts, "moe_intermediate_size": model.expert_ffn_hidden_size,
                       "norm_topk_prob": not model.moe_router_pre_softmax, "decoder_sparse_step": model.moe_layer_freq,
                       "mlp_only_layers": []})
        if family == "qwen2_moe":
            config["shared_expert_intermediate_size"] = model.moe_shared_expert_intermediate_size
    if family in MOE_FAMILIES:
        config.update({"num_experts_per_tok": model.moe_router_topk, "router_aux_loss_coef": model.moe_aux_loss_coeff,
                       "output_router_logits": False})
    return config


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our ModelConfig for a config.json of one of ARCHITECTURES' families (seq_length = its context)."""
    kind = hf.get("model_type")
    if kind == "gpt2":
        _refuse(hf, activation_function=lambda v: v not in ("gelu_new", "gelu_pytorch_tanh"),
                tie_word_embeddings=lambda v: not v)  # our gpt2 family is always tied
        return ModelConfig(family="gpt2", num_layers=hf["n_layer"], hidden_size=hf["n_embd"],
                           num_attention_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                           seq_length=hf["n_positions"], max_position_embeddings=hf["n_positions"],
                           vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    if kind not in ARCHITECTURES:
        raise ConfigError(f"model_type={kind} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    _refuse_unmapped(hf)
    _refuse(hf, hidden_act=lambda v: v != "silu", pretraining_tp=lambda v: v != 1, attention_bias=bool,
            mlp_bias=bool, router_jitter_noise=bool, mlp_only_layers=bool)
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    model = dict(family="llama", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                 num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
                 kv_channels=None if head_dim * heads == hf["hidden_size"] else head_dim,
                 ffn_hidden_size=hf["intermediate_size"], seq_length=hf["max_position_embeddings"],
                 max_position_embeddings=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                 make_vocab_size_divisible_by=make_vocab_size_divisible_by, norm_epsilon=hf.get("rms_norm_eps", 1e-6),
                 **_rope_args(hf),
                 add_qkv_bias=kind == "qwen2" or (kind == "qwen2_moe" and hf.get("qkv_bias", True)),
                 qk_layernorm=kind in ("qwen3", "qwen3_moe"), **_window_args(hf, kind),
                 # Every one of these families defaults to untied, as our llama family does (None).
                 untie_embeddings_and_output_weights=False if hf.get("tie_word_embeddings") else None)
    if kind == "mixtral":
        model.update(num_experts=hf["num_local_experts"], moe_ffn_hidden_size=hf["intermediate_size"])
    elif kind in MOE_FAMILIES:
        model.update(num_experts=hf.get("num_experts") or hf["num_local_experts"],
                     moe_ffn_hidden_size=hf["moe_intermediate_size"], moe_layer_freq=hf.get("decoder_sparse_step", 1),
                     moe_router_pre_softmax=not hf.get("norm_topk_prob", False))
        if kind == "qwen2_moe":
            _refuse(hf, shared_expert_intermediate_size=lambda v: not v)
            model.update(moe_shared_expert_intermediate_size=hf["shared_expert_intermediate_size"],
                         moe_shared_expert_gate=True)
    if kind in MOE_FAMILIES:
        model.update(moe_router_topk=hf["num_experts_per_tok"], moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0))
    return ModelConfig(**model)


def _sliding_window(model: ModelConfig) -> int | None:
    """config.json's sliding_window, which counts the token itself: our window plus one; None where no layer
    slides."""
    return None if all(window is None for window in model.layer_windows) else model.window_size + 1


def _window_args(hf: dict, kind: str) -> dict:
    """Our window_size and window_attn_skip_freq for config.json's sliding window and the layers it is on;
    ConfigError for a window in a family we do not map it for."""
    if kind in ("mistral", "mixtral"):
        _refuse(hf, layer_types=lambda v: any(t != "full_attention" for t in v))
        window = hf.get("sliding_window")
        return {"window_size": None if window is None else window - 1}  # HF counts the token itself
    if kind not in ("qwen2", "qwen3"):
        _refuse(hf, use_sliding_window=bool, layer_types=lambda v: any(t != "full_attention" for t in v),
                **({"sliding_window": bool} if kind == "llama" else {}))
        return {}
    # transformers' rule and defaults: a window of sliding_window (4096) only with use_sliding_window, on the
    # layers layer_types name sliding_attention, or without them on layers max_window_layers (28) onwards.
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
    layers = hf["num_hidden_layers"]
    types = hf.get("layer_types") or ["sliding_attention" if window is not None and i >= hf.get("max_window_layers", 28)
                                      else "full_attention" for i in range(layers)]
    if len(types) != layers or not set(types) <= {"full_attention", "sliding_attention"}:
        raise ConfigError(f"layer_types={types!r} is not supported (full_attention or sliding_attention for each "
                          f"of the {layers} layers)")
    if "sliding_attention" not in types:
        return {}
    if window is None:
        raise ConfigError(f"layer_types={types!r} names sliding layers but use_sliding_window="
                          f"{hf.get('use_sliding_window')!r} sets no window (transformers refuses to run it)")
    pattern = [int(t == "sliding_attention") for t in types]
    return {"window_size": window - 1, "window_attn_skip_freq": None if all(pattern) else pattern}


def _rope_parameters(model: ModelConfig) -> dict:
    """config.json's rope_parameters: the type, the base and the type's fields we have (unset ones left out)."""
    kind = "default" if model.rope_scaling_type == "none" else model.rope_scaling_type
    fields = {name: getattr(model, f"rope_scaling_{name}") for name in ROPE_FIELDS[kind]}
    return {"rope_type": kind, "rope_theta": model.rotary_base, **{k: v for k, v in fields.items() if v is not None}}


def _rope_args(hf: dict) -> dict:
    """Our rotary_base and rope_scaling_* fields from config.json's rope dict; ConfigError naming a
    rope_type or a field of it we do not compute."""
    # transformers 5 reads the older rope_scaling over rope_parameters when a config.json has both.
    rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
    older = rope.pop("type", "default")  # the older name of rope_type
    kind = rope.pop("rope_type", older)
    if kind not in ROPE_FIELDS:
        raise ConfigError(f"rope_type={kind!r} is not supported; allowed: {', '.join(map(repr, ROPE_FIELDS))}")
    # Values that compute what leaving them out does: a full rotary dim, and yarn's rounded ramp bounds.
    _refuse(rope, partial_rotary_factor=lambda v: v != 1, truncate=lambda v: v is not True)
    rope.pop("partial_rotary_factor", None)
    rope.pop("truncate", None)
    unknown = next((name for name in rope if name not in ("rope_theta", *ROPE_FIELDS[kind])), None)
    if unknown:
        raise ConfigError(f"rope_parameters {unknown}={rope[unknown]!r} is not supported with rope_type={kind!r} "
                          "(the model would compute something else)")
    if kind in ("llama3", "yarn"):  # transformers' default for the pretraining context
        rope.setdefault("original_max_position_embeddings", hf["max_position_embeddings"])
    # transformers 5 writes rope_theta: null beside rope_parameters; 10000 is its default.
    return {"rotary_base": rope.pop("rope_theta", None) or hf.get("rope_theta") or 10000.0,
            "rope_scaling_type": "none" if kind == "default" else kind,
            **{f"rope_scaling_{name}": value for name, value in rope.items()}}


# config.json fields of the llama-like families that change nothing we compute: bookkeeping,
# generation and init defaults, caching.
_NEUTRAL = {"architectures", "model_type", "torch_dtype", "dtype", "transformers_version", "use_cache",
            "initializer_range", "bos_token_id", "eos_token_id", "pad_token_id", "attention_dropout",
            "output_router_logits"}
# The fields model_config_from_hf maps or checks.
_MAPPED = {"hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "head_dim",
           "intermediate_size", "max_position_embeddings", "vocab_size", "rms_norm_eps", "rope_parameters",
           "rope_scaling", "rope_theta", "tie_word_embeddings", "hidden_act", "attention_bias", "mlp_bias",
           "use_sliding_window", "sliding_window", "max_window_layers", "layer_types", "pretraining_tp", "qkv_bias",
           "router_jitter_noise", "mlp_only_layers", "num_local_experts", "num_experts", "moe_intermediate_size",
           "decoder_sparse_step", "norm_topk_prob", "shared_expert_intermediate_size", "num_experts_per_tok",
           "router_aux_loss_coef"}


def _refuse_unmapped(hf: dict) -> None:
    """ConfigError naming a config.json field that is neither mapped, nor known to change nothing,
    nor one of every transformers config's generic fields: refused rather than dropped."""
    from transformers import PretrainedConfig  # imported only to convert

    known = _MAPPED | _NEUTRAL | set(PretrainedConfig().to_dict())
    unknown = sorted(name for name in hf if name not in known)
    if unknown:
        raise ConfigError(f"config.json field {unknown[0]}={hf[unknown[0]]!r} is not mapped to megatron_lite "
                          "(refused rather than dropped: it may change what the model computes)")


def _refuse(fields: dict, **unsupported) -> None:
    """ConfigError naming the first field whose value the predicate says we cannot compute."""
    for name, bad in unsupported.items():
        if fields.get(name) is not None and bad(fields[name]):
            raise ConfigError(f"{name}={fields[name]!r} is not supported (the model would compute something else)")
