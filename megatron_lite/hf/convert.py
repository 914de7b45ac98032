"""Hugging Face `transformers` <-> megatron_lite: weight names and layouts, safetensors files
(which family, and its config.json: families.py; the tokenizer: tokenizer.py).

Works on full, unpadded tensors keyed by our global names (reshard.FullState.model), so it
never sees a tensor-parallel shard (FromHF.select reads whichever positions of a full tensor a
rank asks for). What differs between the two sides:
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
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.lazy_tensors import IndexedTensors, LazyTensors
from megatron_lite.model.norms import is_norm_weight

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


@dataclass(frozen=True)
class Recipe:
    """One of our tensors and the HF tensors it is made of, both ways. from_hf only reorders and
    joins the HF tensors' rows (each transposed first when `transposed`: our dim 0 is its dim 1),
    so given each HF tensor's row numbers it says where each of our rows comes from (FromHF.select)."""
    ours: str
    hf: tuple[str, ...]
    to_hf: Callable[[torch.Tensor], list[torch.Tensor]]
    from_hf: Callable[[list[torch.Tensor]], torch.Tensor]
    transposed: bool = False


def _plain(ours: str, hf: str, transposed: bool, model: ModelConfig) -> Recipe:
    """A tensor that maps one to one: transposed or not; a zero-centred norm weight (--apply-layernorm-1p)
    is HF's gamma minus one."""
    if model.apply_layernorm_1p and is_norm_weight(ours):
        return Recipe(ours, (hf,), lambda t: [(t.float() + 1.0).to(t.dtype)], lambda ts: ts[0].float() - 1.0)
    return Recipe(ours, (hf,), lambda t: [t.t() if transposed else t], lambda ts: ts[0].t() if transposed else ts[0],
                  transposed)


def recipes(model: ModelConfig) -> list[Recipe]:
    """Every tensor of the model, in the order the export writes them."""
    out = [_plain(ours, hf, transposed, model) for ours, (hf, transposed) in _renames(model).items()]
    for i in range(model.num_layers):
        attn = f"layers.{i}.self_attention.linear_qkv"
        if model.family == "llama":
            for kind in ("weight", "bias") if model.add_qkv_bias else ("weight",):
                out.append(Recipe(f"{attn}.{kind}", tuple(f"model.layers.{i}.self_attn.{n}_proj.{kind}" for n in "qkv"),
                                  lambda t: list(_split_qkv(t, model)), lambda ts: _join_qkv(*ts, model)))
            for ours_mlp, hf_mlp in _gated_mlps(model, i):
                out.append(Recipe(f"layers.{i}.{ours_mlp}.linear_fc1.weight",
                                  tuple(f"model.layers.{i}.{hf_mlp}.{n}_proj.weight" for n in ("gate", "up")),
                                  lambda t: list(t.chunk(2)), torch.cat))
        else:
            c_attn = f"transformer.h.{i}.attn.c_attn"
            out.append(Recipe(f"{attn}.weight", (f"{c_attn}.weight",), lambda t: [torch.cat(_split_qkv(t, model)).t()],
                              lambda ts: _join_qkv(*ts[0].t().chunk(3), model), transposed=True))
            out.append(Recipe(f"{attn}.bias", (f"{c_attn}.bias",), lambda t: [torch.cat(_split_qkv(t, model))],
                              lambda ts: _join_qkv(*ts[0].chunk(3), model)))
    return out


def hf_tensors(ours: Mapping[str, torch.Tensor], model: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """The HF tensors, one of ours read at a time (`ours` may read each when asked)."""
    for recipe in recipes(model):
        yield from zip(recipe.hf, (t.contiguous() for t in recipe.to_hf(ours[recipe.ours])))


def to_hf_state(ours: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(hf_tensors(ours, model))


_PART = 2**40  # FromHF.select numbers row r of a recipe's HF tensor p as p * _PART + r


def _runs(positions: torch.Tensor) -> list[tuple[int, int]]:
    """[first, last + 1) of each run of consecutive values in `positions`, in order."""
    breaks = (torch.nonzero(positions.diff() != 1).flatten() + 1).tolist()
    return [(int(positions[lo]), int(positions[hi - 1]) + 1) for lo, hi in zip([0, *breaks], [*breaks, len(positions)])]


def _boxes(read: Callable[[tuple[tuple[int, int], ...]], torch.Tensor], runs: list[list[tuple[int, int]]],
           chosen: tuple[tuple[int, int], ...] = ()) -> torch.Tensor:
    """The tensor made of `read(box)` for every box that takes one run per dim, joined dim by dim."""
    if len(chosen) == len(runs):
        return read(chosen)
    blocks = [_boxes(read, runs, (*chosen, run)) for run in runs[len(chosen)]]
    return blocks[0] if len(blocks) == 1 else torch.cat(blocks, dim=len(chosen))


class FromHF(IndexedTensors):
    """Our full tensors, each made from HF tensors when asked for (`hf` may read each lazily), or
    any rank's slice of one, read from the slices of the HF tensors it is made of (`select`: from a
    SafetensorsFolder, the bytes of those slices only)."""

    def __init__(self, hf: Mapping[str, torch.Tensor], model: ModelConfig) -> None:
        self.hf, self.model = hf, model
        self.recipes = self.names = {r.ours: r for r in recipes(model)}
        missing = [name for r in self.recipes.values() for name in r.hf if self._hf_name(name) is None]
        if missing:
            raise ConfigError(f"the Hugging Face weights lack {missing[0]} ({len(missing)} tensors missing)")
        embedding = self.recipes["word_embeddings.weight"].hf[0]
        if model.tie_embeddings and "lm_head.weight" in hf and not self._equal("lm_head.weight",
                                                                               self._hf_name(embedding)):
            raise ConfigError(f"tie_word_embeddings is true but lm_head.weight differs from {embedding} (transformers "
                              "unties them then); set tie_word_embeddings to false in config.json to import them "
                              "untied")

    def _hf_name(self, name: str) -> str | None:
        """The folder's name of an HF tensor: checkpoints of GPT2Model (the hub's gpt2) lack the transformer. prefix."""
        if name in self.hf:
            return name
        short = name.removeprefix("transformer.")
        return short if self.model.family == "gpt2" and short in self.hf else None

    def _shape(self, name: str) -> tuple[int, ...]:
        return tuple(self.hf.shape(name) if isinstance(self.hf, SafetensorsFolder) else self.hf[name].shape)

    def _box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        return self.hf.box(name, box) if isinstance(self.hf, SafetensorsFolder) else self.hf[name][box]

    def _equal(self, a: str, b: str) -> bool:
        """Whether two HF tables are equal, compared a block of rows at a time."""
        shape = self._shape(a)
        if shape != self._shape(b):
            return False
        step = max(1, 2**24 // max(1, shape[1] if len(shape) > 1 else 1))  # 64 MiB of fp32 rows
        return all(torch.equal(self._box(a, (slice(lo, lo + step),)), self._box(b, (slice(lo, lo + step),)))
                   for lo in range(0, shape[0], step))

    def __getitem__(self, name: str) -> torch.Tensor:
        recipe = self.recipes[name]
        return recipe.from_hf([self.hf[self._hf_name(n)] for n in recipe.hf]).float().contiguous()

    def select(self, name: str, index: Sequence[torch.Tensor]) -> torch.Tensor:
        recipe = self.recipes[name]
        parts = [self._hf_name(n) for n in recipe.hf]
        if any(len(i) == 0 for i in index):
            return torch.zeros([len(i) for i in index])
        # Where each of our rows comes from: the recipe applied to its HF tensors' row numbers.
        row_dim = 1 if recipe.transposed else 0
        origin = recipe.from_hf([p * _PART + torch.arange(self._shape(n)[row_dim]) for p, n in enumerate(parts)])

        def read(box: tuple[tuple[int, int], ...]) -> torch.Tensor:
            (lo, hi), rest = box[0], [slice(*run) for run in box[1:]]
            part, rows = divmod(lo, _PART)
            rows = slice(rows, rows + hi - lo)
            if recipe.transposed:  # 2-D: our [rows, columns] is its [columns, rows]
                return self._box(parts[part], (*rest, rows)).t()
            return self._box(parts[part], (rows, *rest))

        runs = [_runs(origin[index[0]]), *(_runs(i) for i in index[1:])]
        return _boxes(read, runs).float().contiguous()


def from_hf_state(hf: dict[str, torch.Tensor], model: ModelConfig) -> dict[str, torch.Tensor]:
    return dict(FromHF(hf, model))


class ShardWriter:
    """Writes safetensors shards as tensors come, each up to max_shard_bytes (save_pretrained's
    names: model.safetensors, or model-0000i-of-0000n.safetensors plus the index); holds one
    shard at a time."""

    def __init__(self, out: Path, max_shard_bytes: int = MAX_SHARD_BYTES) -> None:
        self.out, self.max_bytes = out, max_shard_bytes
        self.shard: dict[str, torch.Tensor] = {}
        self.size = self.total = 0
        self.written: list[list[str]] = []  # each written shard's tensor names

    def add(self, name: str, tensor: torch.Tensor) -> None:
        nbytes = tensor.numel() * tensor.element_size()
        if self.shard and self.size + nbytes > self.max_bytes:
            self._flush()
        self.shard[name] = tensor
        self.size += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        save_file(self.shard, self._part(len(self.written)), metadata={"format": "pt"})
        self.written.append(list(self.shard))
        self.shard, self.size = {}, 0

    def _part(self, i: int) -> Path:
        return self.out / f"model-{i + 1:05d}.safetensors.part"  # renamed once the number of shards is known

    def close(self) -> list[str]:
        """Write the last shard, name the shards, write the index; the files written."""
        self._flush()
        if len(self.written) == 1:
            self._part(0).replace(self.out / "model.safetensors")
            return ["model.safetensors"]
        names = [f"model-{i:05d}-of-{len(self.written):05d}.safetensors" for i in range(1, len(self.written) + 1)]
        weight_map = {}
        for i, (name, shard) in enumerate(zip(names, self.written)):
            self._part(i).replace(self.out / name)
            weight_map.update(dict.fromkeys(shard, name))
        (self.out / INDEX).write_text(json.dumps({"metadata": {"total_size": self.total}, "weight_map": weight_map},
                                                 indent=2))
        return [*names, INDEX]


def save_safetensors(tensors: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]], out: Path,
                     max_shard_bytes: int = MAX_SHARD_BYTES) -> list[str]:
    """model.safetensors, or model-0000i-of-0000n.safetensors plus the index when larger than
    max_shard_bytes, from a dict or a stream of (name, tensor)."""
    writer = ShardWriter(out, max_shard_bytes)
    for name, tensor in tensors.items() if isinstance(tensors, Mapping) else tensors:
        writer.add(name, tensor)
    return writer.close()


class SafetensorsFolder(LazyTensors):
    """A Hugging Face folder's weights, each tensor read from its file (safe_open) when asked for."""

    def __init__(self, folder: Path) -> None:
        index = folder / INDEX
        if index.exists():
            self.files = {name: folder / file for name, file in json.loads(index.read_text())["weight_map"].items()}
        elif (folder / "model.safetensors").exists():
            with safe_open(folder / "model.safetensors", framework="pt") as f:
                self.files = dict.fromkeys(f.keys(), folder / "model.safetensors")
        else:
            raise ConfigError(f"{folder} has neither model.safetensors nor {INDEX}")
        self.names = self.files

    def __getitem__(self, name: str) -> torch.Tensor:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_tensor(name)

    def shape(self, name: str) -> list[int]:
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name).get_shape()

    def box(self, name: str, box: tuple[slice, ...]) -> torch.Tensor:
        """The tensor's box (a slice per leading dim), only its bytes read from the file."""
        with safe_open(self.files[name], framework="pt") as f:
            return f.get_slice(name)[box]


def load_safetensors(folder: Path) -> dict[str, torch.Tensor]:
    return dict(SafetensorsFolder(folder))
