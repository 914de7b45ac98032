"""The parameter tensors a rank holds, by formula: what the model classes build for a layout,
without building them (a 1T-parameter layout is counted in microseconds).

The list is in the order of the chunk's `parameters()` (GPTModel, TransformerLayer, Attention,
MLP, MoELayer register them in this order), because the grad buffer cuts buckets in that
order (distributed/data_parallel.py: bucket_spans) and the padding of each bucket depends on
it. Each tensor says whether its grad is partial (summed over tp or the embedding group
before the data-parallel reduction: a deferred bucket), whether it is an expert's (its own
buffer, over edp), and which ZeRO-3 unit it belongs to (GPTModel.param_units).
tests/test_planner.py checks the list against the parameters of the built model.
"""
from __future__ import annotations

from dataclasses import dataclass

from megatron_lite.config.model_config import ModelConfig
from megatron_lite.pipeline_parallel.partition import chunk_layers, stage_ends


@dataclass(frozen=True)
class ParamSpec:
    numel: int
    deferred: bool = False  # partial grad: waits for its tp / embedding sum (a trailing bucket)
    expert: bool = False
    unit: int = 0  # index of its ZeRO-3 unit in the chunk (GPTModel.param_units)
    gathers: int = 2  # ZeRO-3 all-gathers per microbatch: before its unit's forward and backward
    matrix: bool = False  # a hidden layer's weight matrix: Muon's under --optimizer muon (optimizer/muon.py)
    tp_split: bool = False  # a matrix split over tp (Muon gathers its update whole)


def _norm(model: ModelConfig, size: int, partial: bool, unit: int) -> list[ParamSpec]:
    count = 1 if model.family == "llama" else 2  # RMSNorm: weight; LayerNorm: weight and bias
    return [ParamSpec(size, partial, unit=unit)] * count


@dataclass(frozen=True)
class MLALinear:
    """One weight of a multi-latent attention layer (model/mla.py), whole: rows (output features) x cols
    (input features), how tp holds it, and the width of the latent norm on its output (0: none)."""
    rows: int
    cols: int
    split: str  # "column" (its rows over tp), "row" (its columns) or "duplicated" (whole on every tp rank)
    norm: int = 0

    @property
    def duplicated(self) -> bool:
        return self.split == "duplicated"

    def local_shape(self, tp: int) -> tuple[int, int]:
        """(rows, cols) on one tp rank."""
        return (self.rows // tp if self.split == "column" else self.rows,
                self.cols // tp if self.split == "row" else self.cols)


def mla_linears(model: ModelConfig) -> list[MLALinear]:
    """Multi-latent attention's weights in parameters() order: the query path (down-projection, its latent's norm
    and up-projection, or one projection without --q-lora-rank), the key/value path (its down-projection also
    makes the rotated key part, which its latent norm leaves out), the output projection. The one place of their
    shapes: parameters, FLOPs, compute time and traffic all read them from here."""
    h, a, kv, pos = model.hidden_size, model.num_attention_heads, model.kv_lora_rank, model.qk_pos_emb_head_dim
    rq, qk, v = model.q_lora_rank, model.qk_head_dim + pos, model.v_head_dim
    norm = model.qk_layernorm  # --qk-layernorm normalises the two latents
    query = ([MLALinear(a * qk, h, "column")] if rq is None else
             [MLALinear(rq, h, "duplicated", rq if norm else 0), MLALinear(a * qk, rq, "column")])
    return [*query, MLALinear(kv + pos, h, "duplicated", kv if norm else 0),
            MLALinear(a * (model.qk_head_dim + v), kv, "column"), MLALinear(h, a * v, "row")]


def _mla_params(model: ModelConfig, tp: int, sp: bool, unit: int) -> list[ParamSpec]:
    """Multi-latent attention's tensors on a tp rank. The duplicated down-projections and the latent norms see
    this rank's tokens under SP, so their grads are partial over tp there (as the layer norms')."""
    out: list[ParamSpec] = []
    for linear in mla_linears(model):
        rows, cols = linear.local_shape(tp)
        out.append(ParamSpec(rows * cols, linear.duplicated and sp, unit=unit, matrix=True,
                             tp_split=not linear.duplicated))
        if linear.norm:
            out += _norm(model, linear.norm, sp, unit)
    return out


def layer_params(model: ModelConfig, number: int, tp: int, ep: int, sp: bool, unit: int) -> list[ParamSpec]:
    """One transformer layer's tensors on a tp rank (and ep rank, for its experts)."""
    h, d, f = model.hidden_size, model.head_dim, model.ffn_hidden_size
    gpt2 = model.family == "gpt2"
    out = _norm(model, h, sp, unit)
    if model.multi_latent_attention:
        out += _mla_params(model, tp, sp, unit)
    else:
        qkv = (model.num_attention_heads + 2 * model.num_query_groups) * d
        out.append(ParamSpec(qkv * h // tp, unit=unit, matrix=True, tp_split=True))
        if gpt2 or model.add_qkv_bias:
            out.append(ParamSpec(qkv // tp, unit=unit))
        out.append(ParamSpec(h * model.num_attention_heads * d // tp, unit=unit, matrix=True, tp_split=True))
        if gpt2:
            out.append(ParamSpec(h, sp, unit=unit))  # row-parallel bias: replicated, partial under SP
        if model.qk_layernorm:
            out += _norm(model, d, tp > 1, unit) + _norm(model, d, tp > 1, unit)
    out += _norm(model, h, sp, unit)
    if model.is_moe_layer(number):
        out.append(ParamSpec(model.num_experts * h, sp, unit=unit, matrix=True))  # router
        gate = 2 if model.family == "llama" else 1
        local = model.num_experts // ep
        fe = model.expert_ffn_hidden_size
        out += [ParamSpec(local * fe * gate * h, expert=True, unit=unit, matrix=True),
                ParamSpec(local * h * fe, expert=True, unit=unit, matrix=True)]
        if model.moe_shared_expert_intermediate_size:
            out += _mlp(model, model.moe_shared_expert_intermediate_size, tp, sp, unit)
        if model.moe_shared_expert_gate:
            out.append(ParamSpec(h, sp, unit=unit))
    else:
        out += _mlp(model, f, tp, sp, unit)
    return out


def _mlp(model: ModelConfig, ffn: int, tp: int, sp: bool, unit: int) -> list[ParamSpec]:
    h = model.hidden_size
    if model.family == "llama":  # SwiGLU fc1 [gate; up], no biases
        return [ParamSpec(2 * ffn * h // tp, unit=unit, matrix=True, tp_split=True),
                ParamSpec(h * ffn // tp, unit=unit, matrix=True, tp_split=True)]
    return [ParamSpec(ffn * h // tp, unit=unit, matrix=True, tp_split=True), ParamSpec(ffn // tp, unit=unit),
            ParamSpec(h * ffn // tp, unit=unit, matrix=True, tp_split=True), ParamSpec(h, sp, unit=unit)]


def chunk_params(model: ModelConfig, tp: int, pp: int, vpp: int, ep: int, sp: bool, pp_rank: int,
                 chunk: int, v_shape: bool = False) -> list[ParamSpec]:
    """Every tensor of model chunk `chunk` on pipeline rank `pp_rank`, in parameters() order."""
    layers = chunk_layers(model.num_layers, pp, vpp, pp_rank, chunk, v_shape)
    pre, post = stage_ends(pp, vpp, pp_rank, chunk, v_shape)
    h, vocab = model.hidden_size, model.padded_vocab_size(tp)
    out: list[ParamSpec] = []
    unit = 0
    shared_on_last = model.embedding_on_last_stage
    if pre or (post and shared_on_last):
        # The embedding's backward needs only the ids: one gather; on the last stage the output
        # unit uses the same table, gathered for its forward and backward too.
        gathers = (1 if pre else 0) + (2 if post and shared_on_last else 0)
        out.append(ParamSpec(vocab // tp * h, deferred=shared_on_last and pp > 1, unit=0, gathers=gathers))
    if pre:
        unit = 1
        if model.family == "gpt2":
            out.append(ParamSpec(model.max_position_embeddings * h, deferred=sp, unit=unit, gathers=1))
            unit += 1
    for number in layers:
        out += layer_params(model, number, tp, ep, sp, unit)
        unit += 1
    if post:
        out += _norm(model, h, sp, unit)
        if not model.tie_embeddings:
            out.append(ParamSpec(vocab // tp * h, unit=unit))
        for k in range(model.mtp_depths):  # in the output unit: enorm, hnorm, eh_proj, layer, final norm
            out += [*_norm(model, h, sp, unit), *_norm(model, h, sp, unit),
                    ParamSpec(2 * h * h // tp, unit=unit, matrix=True, tp_split=True),
                    *layer_params(model, model.num_layers + k, tp, ep, sp, unit), *_norm(model, h, sp, unit)]
    return out


def count_parameters(model: ModelConfig) -> int:
    """Parameters of the whole model on one device (the padded vocabulary included)."""
    return sum(p.numel for p in chunk_params(model, 1, 1, 1, 1, False, 0, 0))
