"""Hugging Face `transformers` <-> megatron_lite: configs, weight names and layouts, safetensors files.

Works on full, unpadded tensors keyed by our global names (reshard.FullState.model), so it
never sees a tensor-parallel shard. What differs between the two sides:
- Llama: our fused QKV weight is laid out group by group (per query group its q heads, then
  k, then v) where HF has separate q_proj/k_proj/v_proj; our fc1 is [gate; up] where HF has
  gate_proj and up_proj. RoPE uses the same rotate-half convention, so q and k need no permutation.
- Mixtral (our llama family with every MLP a mixture of experts, softmax top-k renormalised):
  our stacked experts are the fused tensors transformers keeps (gate_up_proj [E, 2 ffn, h] with
  gate first, down_proj [E, h, ffn]) and our router is its gate.
- GPT-2: HF's Conv1D stores weights transposed ([in, out]) and its c_attn is [q; k; v] over
  all heads, not per head; the output layer is tied to the embedding on both sides.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_lite.config import ConfigError, ModelConfig

MAX_SHARD_BYTES = 2 * 2**30  # above this, model.safetensors is split with an index, as save_pretrained does
INDEX = "model.safetensors.index.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def hf_config(model: ModelConfig) -> dict:
    """config.json of the equivalent LlamaForCausalLM, MixtralForCausalLM or GPT2LMHeadModel."""
    if model.num_experts:
        return _mixtral_config(model)
    if model.family == "llama":
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": model.vocab_size,
                "hidden_size": model.hidden_size, "intermediate_size": model.ffn_hidden_size,
                "num_hidden_layers": model.num_layers, "num_attention_heads": model.num_attention_heads,
                "num_key_value_heads": model.num_query_groups, "head_dim": model.head_dim, "hidden_act": "silu",
                "max_position_embeddings": max(model.seq_length, model.max_position_embeddings),
                "rms_norm_eps": model.norm_epsilon, "rope_theta": model.rotary_base,
                "rope_parameters": {"rope_type": "default", "rope_theta": model.rotary_base},
                "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                "attention_dropout": model.attention_dropout, "torch_dtype": "float32"}
    if model.num_query_groups != model.num_attention_heads:
        raise ConfigError(f"GPT2LMHeadModel has no grouped-query attention; this model has num_query_groups="
                          f"{model.num_query_groups} < num_attention_heads={model.num_attention_heads}")
    return {"architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": model.vocab_size,
            "n_embd": model.hidden_size, "n_inner": model.ffn_hidden_size, "n_layer": model.num_layers,
            "n_head": model.num_attention_heads, "n_positions": model.max_position_embeddings,
            "activation_function": "gelu_new", "layer_norm_epsilon": model.norm_epsilon,
            "resid_pdrop": model.hidden_dropout, "embd_pdrop": model.hidden_dropout,
            "attn_pdrop": model.attention_dropout, "tie_word_embeddings": True, "torch_dtype": "float32"}


def _mixtral_config(model: ModelConfig) -> dict:
    """Mixtral: llama layers whose MLPs are all experts, softmax top-k renormalised, dropless."""
    unrepresentable = [why for bad, why in (
        (model.family != "llama", "the gpt2 family: Mixtral's layers are llama's"),
        (model.moe_layer_freq != 1, f"--moe-layer-freq={model.moe_layer_freq}: every Mixtral layer is MoE"),
        (model.moe_shared_expert_intermediate_size, "a shared expert: Mixtral has none"),
        (model.moe_router_score_function != "softmax" or model.moe_router_pre_softmax,
         "weights other than the softmax over the chosen experts' logits, Mixtral's"),
        (model.moe_router_enable_expert_bias, "an expert bias: Mixtral has none"),
        (model.moe_expert_capacity_factor is not None, "a capacity factor: Mixtral is dropless")) if bad]
    if unrepresentable:
        raise ConfigError(f"no Hugging Face family represents this mixture of experts: {unrepresentable[0]}")
    dense = hf_config(replace(model, num_experts=None))
    return {**dense, "architectures": ["MixtralForCausalLM"], "model_type": "mixtral",
            "intermediate_size": model.expert_ffn_hidden_size, "num_local_experts": model.num_experts,
            "num_experts_per_tok": model.moe_router_topk, "router_aux_loss_coef": model.moe_aux_loss_coeff,
            "router_jitter_noise": 0.0, "output_router_logits": False, "sliding_window": None}


def model_config_from_hf(hf: dict, make_vocab_size_divisible_by: int = 128) -> ModelConfig:
    """Our ModelConfig for a LlamaForCausalLM / GPT2LMHeadModel config.json (seq_length = its context)."""
    kind = hf.get("model_type")
    if kind == "mixtral":
        if hf.get("router_jitter_noise") or hf.get("sliding_window"):
            raise ConfigError("only Mixtral models without router jitter and sliding-window attention are supported")
        dense = model_config_from_hf({**hf, "model_type": "llama"}, make_vocab_size_divisible_by)
        return replace(dense, num_experts=hf["num_local_experts"], moe_router_topk=hf["num_experts_per_tok"],
                       moe_ffn_hidden_size=hf["intermediate_size"],
                       moe_aux_loss_coeff=hf.get("router_aux_loss_coef", 0.0))
    if kind == "llama":
        if hf.get("attention_bias") or hf.get("mlp_bias") or hf.get("hidden_act", "silu") != "silu":
            raise ConfigError("only Llama models without attention/MLP biases and with SiLU are supported")
        rope = (hf.get("rope_parameters") or {}).get("rope_theta", hf.get("rope_theta", 10000.0))
        heads = hf["num_attention_heads"]
        if hf.get("head_dim", hf["hidden_size"] // heads) != hf["hidden_size"] // heads:
            raise ConfigError(f"head_dim={hf['head_dim']} differs from hidden_size/num_attention_heads")
        return ModelConfig(family="llama", num_layers=hf["num_hidden_layers"], hidden_size=hf["hidden_size"],
                           num_attention_heads=heads, num_query_groups=hf.get("num_key_value_heads", heads),
                           ffn_hidden_size=hf["intermediate_size"], seq_length=hf["max_position_embeddings"],
                           max_position_embeddings=hf["max_position_embeddings"], vocab_size=hf["vocab_size"],
                           make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           norm_epsilon=hf.get("rms_norm_eps", 1e-6), rotary_base=rope)
    if kind == "gpt2":
        if hf.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
            raise ConfigError(f"GPT-2 activation {hf['activation_function']} is not GELU(tanh), which ours is")
        return ModelConfig(family="gpt2", num_layers=hf["n_layer"], hidden_size=hf["n_embd"],
                           num_attention_heads=hf["n_head"], ffn_hidden_size=hf.get("n_inner") or 4 * hf["n_embd"],
                           seq_length=hf["n_positions"], max_position_embeddings=hf["n_positions"],
                           vocab_size=hf["vocab_size"], make_vocab_size_divisible_by=make_vocab_size_divisible_by,
                           norm_epsilon=hf.get("layer_norm_epsilon", 1e-5))
    raise ConfigError(f"model_type={kind} is not supported; allowed: llama, mixtral, gpt2")


def _renames(model: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our name -> (HF name, stored transposed) for every tensor that maps one to one."""
    if model.family == "llama":
        names = {"word_embeddings.weight": "model.embed_tokens.weight", "final_layernorm.weight": "model.norm.weight",
                 "output_layer.weight": "lm_head.weight"}
        per_layer = {"input_layernorm.weight": "input_layernorm.weight",
                     "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
                     "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
        # Our stacked experts are transformers' fused ones: gate_up [E, 2 ffn, h] (gate first), down [E, h, ffn].
        moe = {"mlp.router.weight": "mlp.gate.weight", "mlp.experts.linear_fc1": "mlp.experts.gate_up_proj",
               "mlp.experts.linear_fc2": "mlp.experts.down_proj"}
        renames = {ours: (hf, False) for ours, hf in names.items()}
        for i in range(model.num_layers):
            mlp = moe if model.is_moe_layer(i) else {"mlp.linear_fc2.weight": "mlp.down_proj.weight"}
            renames.update({f"layers.{i}.{ours}": (f"model.layers.{i}.{hf}", False)
                            for ours, hf in {**per_layer, **mlp}.items()})
        return renames
    renames = {"word_embeddings.weight": ("transformer.wte.weight", False),
               "position_embeddings.weight": ("transformer.wpe.weight", False),
               "final_layernorm.weight": ("transformer.ln_f.weight", False),
               "final_layernorm.bias": ("transformer.ln_f.bias", False)}
    per_layer = {"input_layernorm": "ln_1", "pre_mlp_layernorm": "ln_2", "self_attention.linear_proj": "attn.c_proj",
                 "mlp.linear_fc1": "mlp.c_fc", "mlp.linear_fc2": "mlp.c_proj"}
    for i in range(model.num_layers):
        for ours, hf in per_layer.items():
            linear = "linear" in ours  # Conv1D weights are [in, out]
            renames[f"layers.{i}.{ours}.weight"] = (f"transformer.h.{i}.{hf}.weight", linear)
            renames[f"layers.{i}.{ours}.bias"] = (f"transformer.h.{i}.{hf}.bias", False)
    return renames


def _split_qkv(fused: torch.Tensor, model: ModelConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Our group-by-group QKV (weight or bias) -> q over all heads, k over all groups, v over all groups."""
    groups, rest = model.num_query_groups, fused.shape[1:]
    per_group = model.num_attention_heads // groups
    by_group = fused.reshape(groups, per_group + 2, model.head_dim, *rest)
    return (by_group[:, :per_group].reshape(-1, *rest), by_group[:, per_group].reshape(-1, *rest),
            by_group[:, per_group + 1].reshape(-1, *rest))


def _join_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, model: ModelConfig) -> torch.Tensor:
    groups, rest = model.num_query_groups, q.shape[1:]
    parts = [t.reshape(groups, -1, model.head_dim, *rest) for t in (q, k, v)]
    return torch.cat(parts, dim=1).reshape(-1, *rest)


def to_hf_state(ours: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    hf = {hf_name: ours[name].t() if transposed else ours[name]
          for name, (hf_name, transposed) in _renames(model).items()}
    for i in range(model.num_layers):
        attn = f"layers.{i}.self_attention.linear_qkv"
        if model.family == "llama":
            q, k, v = _split_qkv(ours[f"{attn}.weight"], model)
            hf.update({f"model.layers.{i}.self_attn.{n}_proj.weight": t for n, t in zip("qkv", (q, k, v))})
            if not model.is_moe_layer(i):
                gate, up = ours[f"layers.{i}.mlp.linear_fc1.weight"].chunk(2)
                hf[f"model.layers.{i}.mlp.gate_proj.weight"], hf[f"model.layers.{i}.mlp.up_proj.weight"] = gate, up
        else:
            hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(_split_qkv(ours[f"{attn}.weight"], model)).t()
            hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(_split_qkv(ours[f"{attn}.bias"], model))
    return {name: t.contiguous() for name, t in hf.items()}


def from_hf_state(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    if model.family == "gpt2":  # checkpoints of GPT2Model (the hub's gpt2) lack the transformer. prefix
        hf = {name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name: t
              for name, t in hf.items()}
    if model.family == "llama" and "lm_head.weight" not in hf:  # tie_word_embeddings: the head is the embedding
        hf = {**hf, "lm_head.weight": hf["model.embed_tokens.weight"]}
    renames = _renames(model)
    missing = [hf_name for hf_name, _ in renames.values() if hf_name not in hf]
    if missing:
        raise ConfigError(f"the Hugging Face weights lack {missing[0]} ({len(missing)} tensors missing)")
    ours = {name: hf[hf_name].t() if transposed else hf[hf_name] for name, (hf_name, transposed) in renames.items()}
    for i in range(model.num_layers):
        attn = f"layers.{i}.self_attention.linear_qkv"
        if model.family == "llama":
            prefix = f"model.layers.{i}."
            ours[f"{attn}.weight"] = _join_qkv(*(hf[f"{prefix}self_attn.{n}_proj.weight"] for n in "qkv"), model)
            if not model.is_moe_layer(i):
                ours[f"layers.{i}.mlp.linear_fc1.weight"] = torch.cat([hf[f"{prefix}mlp.gate_proj.weight"],
                                                                       hf[f"{prefix}mlp.up_proj.weight"]])
        else:
            ours[f"{attn}.weight"] = _join_qkv(*hf[f"transformer.h.{i}.attn.c_attn.weight"].t().chunk(3), model)
            ours[f"{attn}.bias"] = _join_qkv(*hf[f"transformer.h.{i}.attn.c_attn.bias"].chunk(3), model)
    return {name: t.float().contiguous() for name, t in ours.items()}


def save_safetensors(state: dict[str, torch.Tensor], out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index when larger than max_shard_bytes."""
    shards, size = [{}], 0
    for name, tensor in state.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return ["model.safetensors"]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    weight_map = {}
    for name, shard in zip(names, shards):
        save_file(shard, out / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, name))
    total = sum(t.numel() * t.element_size() for t in state.values())
    (out / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    return [*names, INDEX]


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    index = folder / INDEX
    if not index.exists():
        if not (folder / "model.safetensors").exists():
            raise ConfigError(f"{folder} has neither model.safetensors nor {INDEX}")
        return load_file(folder / "model.safetensors")
    state = {}
    for name in sorted(set(json.loads(index.read_text())["weight_map"].values())):
        state.update(load_file(folder / name))
    return state


def copy_tokenizer(train_config: dict, out: Path) -> str:
    """Copy the run's tokenizer files next to the weights; returns a line saying what was written."""
    kind, source = train_config.get("tokenizer_type"), train_config.get("tokenizer_model")
    if kind == "ByteTokenizer" or source is None:
        return "tokenizer: the run used the byte tokenizer, which has no files; none written"
    source = Path(source)
    if source.is_dir():
        copied = [n for n in TOKENIZER_FILES if (source / n).exists()]
        for name in copied:
            shutil.copy(source / name, out / name)
    else:
        copied = ["tokenizer.model" if kind == "SentencePieceTokenizer" else "tokenizer.json"]
        shutil.copy(source, out / copied[0])
    return f"tokenizer: {', '.join(copied)} from {source}"
