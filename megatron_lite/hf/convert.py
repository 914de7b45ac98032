"""Hugging Face `transformers` <-> megatron_lite: weight names and layouts, safetensors files
(which family, and its config.json: families.py; the tokenizer: tokenizer.py).

Works on full, unpadded tensors keyed by our global names (reshard.FullState.model), so it
never sees a tensor-parallel shard. What differs between the two sides:
- Llama, Qwen2, Qwen3: our fused QKV weight (and Qwen2's bias) is laid out group by group (per
  query group its q heads, then k, then v) where HF has separate q_proj/k_proj/v_proj; our fc1
  is [gate; up] where HF has gate_proj and up_proj; our q/k_layernorm are Qwen3's q/k_norm.
  RoPE uses the same rotate-half convention, so q and k need no permutation.
- Mixtral, Qwen2-MoE, Qwen3-MoE: our stacked experts are the fused tensors transformers keeps
  (gate_up_proj [E, 2 ffn, h] with gate first, down_proj [E, h, ffn]), our router is its gate,
  and Qwen2-MoE's shared expert and its gate are ours.
- GPT-2: HF's Conv1D stores weights transposed ([in, out]) and its c_attn is [q; k; v] over
  all heads, not per head; the output layer is tied to the embedding on both sides.
- Tied models (GPT-2, tie_word_embeddings): lm_head.weight is not written, as save_pretrained
  does not write it; on import a folder's copy of it must equal the embedding (transformers
  unties the two if not, which our tied model cannot represent).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from megatron_lite.config import ConfigError, ModelConfig

MAX_SHARD_BYTES = 2 * 2**30  # above this, model.safetensors is split with an index, as save_pretrained does
INDEX = "model.safetensors.index.json"
# A transformers folder's tokenizer files: hf/tokenizer.py copies them, tools/generate.py looks for them.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "tokenizer.model")


def _renames(model: ModelConfig) -> dict[str, tuple[str, bool]]:
    """Our name -> (HF name, stored transposed) for every tensor that maps one to one."""
    if model.family == "llama":
        names = {"word_embeddings.weight": "model.embed_tokens.weight", "final_layernorm.weight": "model.norm.weight"}
        if not model.tie_embeddings:  # tied, transformers' lm_head is embed_tokens: save_pretrained leaves it out
            names["output_layer.weight"] = "lm_head.weight"
        per_layer = {"input_layernorm.weight": "input_layernorm.weight",
                     "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
                     "pre_mlp_layernorm.weight": "post_attention_layernorm.weight"}
        if model.qk_layernorm:
            per_layer.update({"self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
                              "self_attention.k_layernorm.weight": "self_attn.k_norm.weight"})
        # Our stacked experts are transformers' fused ones: gate_up [E, 2 ffn, h] (gate first), down [E, h, ffn].
        moe = {"mlp.router.weight": "mlp.gate.weight", "mlp.experts.linear_fc1": "mlp.experts.gate_up_proj",
               "mlp.experts.linear_fc2": "mlp.experts.down_proj"}
        if model.moe_shared_expert_intermediate_size:
            moe.update({"mlp.shared_expert.linear_fc2.weight": "mlp.shared_expert.down_proj.weight",
                        "mlp.shared_expert_gate.weight": "mlp.shared_expert_gate.weight"})
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


def _gated_mlps(model: ModelConfig, layer: int) -> list[tuple[str, str]]:
    """(our module, HF module) of each SwiGLU MLP of a layer whose fc1 is HF's gate_proj + up_proj:
    the dense MLP, or an MoE layer's shared expert."""
    if not model.is_moe_layer(layer):
        return [("mlp", "mlp")]
    return [("mlp.shared_expert", "mlp.shared_expert")] if model.moe_shared_expert_intermediate_size else []


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
            for kind in ("weight", "bias") if model.add_qkv_bias else ("weight",):
                q, k, v = _split_qkv(ours[f"{attn}.{kind}"], model)
                hf.update({f"model.layers.{i}.self_attn.{n}_proj.{kind}": t for n, t in zip("qkv", (q, k, v))})
            for ours_mlp, hf_mlp in _gated_mlps(model, i):
                gate, up = ours[f"layers.{i}.{ours_mlp}.linear_fc1.weight"].chunk(2)
                hf[f"model.layers.{i}.{hf_mlp}.gate_proj.weight"] = gate
                hf[f"model.layers.{i}.{hf_mlp}.up_proj.weight"] = up
        else:
            hf[f"transformer.h.{i}.attn.c_attn.weight"] = torch.cat(_split_qkv(ours[f"{attn}.weight"], model)).t()
            hf[f"transformer.h.{i}.attn.c_attn.bias"] = torch.cat(_split_qkv(ours[f"{attn}.bias"], model))
    return {name: t.contiguous() for name, t in hf.items()}


def from_hf_state(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    if model.family == "gpt2":  # checkpoints of GPT2Model (the hub's gpt2) lack the transformer. prefix
        hf = {name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name: t
              for name, t in hf.items()}
    renames = _renames(model)
    missing = [hf_name for hf_name, _ in renames.values() if hf_name not in hf]
    if missing:
        raise ConfigError(f"the Hugging Face weights lack {missing[0]} ({len(missing)} tensors missing)")
    embedding = renames["word_embeddings.weight"][0]
    if model.tie_embeddings and "lm_head.weight" in hf and not torch.equal(hf["lm_head.weight"], hf[embedding]):
        raise ConfigError(f"tie_word_embeddings is true but lm_head.weight differs from {embedding} (transformers "
                          "unties them then); set tie_word_embeddings to false in config.json to import them untied")
    ours = {name: hf[hf_name].t() if transposed else hf[hf_name] for name, (hf_name, transposed) in renames.items()}
    for i in range(model.num_layers):
        attn = f"layers.{i}.self_attention.linear_qkv"
        if model.family == "llama":
            prefix = f"model.layers.{i}."
            for kind in ("weight", "bias") if model.add_qkv_bias else ("weight",):
                ours[f"{attn}.{kind}"] = _join_qkv(*(hf[f"{prefix}self_attn.{n}_proj.{kind}"] for n in "qkv"), model)
            for ours_mlp, hf_mlp in _gated_mlps(model, i):
                ours[f"layers.{i}.{ours_mlp}.linear_fc1.weight"] = torch.cat([hf[f"{prefix}{hf_mlp}.gate_proj.weight"],
                                                                              hf[f"{prefix}{hf_mlp}.up_proj.weight"]])
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

