"""Which Hugging Face `transformers` family represents a model, and the config.json of each.

Ours -> HF (`hf_config`): the llama family is LlamaForCausalLM, Qwen2ForCausalLM with q/k/v
biases, Qwen3ForCausalLM with per-head q/k norms; with experts, MixtralForCausalLM (every layer
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

ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                 "mixtral": "MixtralForCausalLM", "qwen2_moe": "Qwen2MoeForCausalLM",
                 "qwen3_moe": "Qwen3MoeForCausalLM", "gpt2": "GPT2LMHeadModel"}
MOE_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe")


def hf_family(model: ModelConfig) -> str:
    """The model_type of the HF family that computes what `model` does; ConfigError if none."""
    if model.family == "gpt2":
        for bad, why in ((model.num_experts, "experts"), (model.qk_layernorm, "q/k norms"),
                         (model.kv_channels not in (None, model.hidden_size // model.num_attention_heads),
                          f"--kv-channels={model.kv_channels}"),
                         (model.num_query_groups != model.num_attention_heads,
                          f"grouped-query attention (num_query_groups={model.num_query_groups} < "
                          f"num_attention_heads={model.num_attention_heads})")):
            if bad:
                raise ConfigError(f"GPT2LMHeadModel cannot represent {why}, which this gpt2-family model has")
        return "gpt2"
    if model.add_qkv_bias and model.qk_layernorm:
        raise ConfigError("no Hugging Face family has q/k/v biases and q/k norms together")
    if not model.num_experts:
        return "qwen2" if model.add_qkv_bias else "qwen3" if model.qk_layernorm else "llama"
    family = ("qwen2_moe" if model.moe_shared_expert_intermediate_size else "qwen3_moe" if model.qk_layernorm
              else "mixtral")
    refusals = [
        (model.moe_router_score_function != "softmax", "sigmoid router scores (they are softmax in every family)"),
        (model.moe_router_enable_expert_bias, "an expert bias"),
        (model.moe_expert_capacity_factor is not None, "a capacity factor (the families are dropless)"),
        (family == "qwen2_moe" and not model.moe_shared_expert_gate,
         "a shared expert without a gate (Qwen2-MoE's is gated: --moe-shared-expert-gate)"),
        (family == "qwen2_moe" and model.qk_layernorm, "a shared expert with q/k norms"),
        (family == "qwen3_moe" and model.add_qkv_bias, "q/k norms with q/k/v biases"),
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
              "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
              "tie_word_embeddings": False, "attention_dropout": model.attention_dropout, "torch_dtype": "float32"}
    config.update({"llama": {"attention_bias": False, "mlp_bias": False}, "mixtral": {"sliding_window": None},
                   "qwen3": {"attention_bias": False}, "qwen3_moe": {"attention_bias": False},
                   "qwen2_moe": {"qkv_bias": model.add_qkv_bias}}.get(family, {}))
    if family.startswith("qwen"):
        config["use_sliding_window"] = False
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
        _refuse(hf, activation_function=lambda v: v not in ("gelu_new", "gelu_pytorch_tanh"))
        return ModelConfig(family="gpt2", num_layers=hf["n_layer"], hidden_size=hf["n_embd"],
                           num_attention_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                           seq_length=hf["n_positions"], max_position_embeddings=hf["n_positions"],
                           vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    if kind not in ARCHITECTURES:
        raise ConfigError(f"model_type={kind} is not supported; allowed: {', '.join(ARCHITECTURES)}")
    rope = hf.get("rope_parameters") or {}
    _refuse(hf, hidden_act=lambda v: v != "silu", tie_word_embeddings=bool, rope_scaling=bool,
            use_sliding_window=bool, attention_bias=bool, mlp_bias=bool, router_jitter_noise=bool,
            mlp_only_layers=bool, **({"sliding_window": bool} if kind in ("llama", "mixtral") else {}))
    _refuse(rope, rope_type=lambda v: v != "default")
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    model = dict(family="llama", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                 num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads") or heads,
                 kv_channels=None if head_dim * heads == hf["hidden_size"] else head_dim,
                 ffn_hidden_size=hf["intermediate_size"], seq_length=hf["max_position_embeddings"],
                 max_position_embeddings=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                 make_vocab_size_divisible_by=make_vocab_size_divisible_by, norm_epsilon=hf.get("rms_norm_eps", 1e-6),
                 rotary_base=rope.get("rope_theta", hf.get("rope_theta", 10000.0)),
                 add_qkv_bias=kind == "qwen2" or (kind == "qwen2_moe" and hf.get("qkv_bias", True)),
                 qk_layernorm=kind in ("qwen3", "qwen3_moe"))
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


def _refuse(fields: dict, **unsupported) -> None:
    """ConfigError naming the first field whose value the predicate says we cannot compute."""
    for name, bad in unsupported.items():
        if fields.get(name) is not None and bad(fields[name]):
            raise ConfigError(f"{name}={fields[name]!r} is not supported (the model would compute something else)")
