"""The activation formula (megatron_lite/planner/activation_memory.py) against the tensors the layers
actually save for backward, counted by saved-tensor hooks (each storage once, parameters not):
every recomputation setting, both families, on one device and at tp 2 + SP (one spawn)."""
from __future__ import annotations

import functools
import itertools

import pytest
import torch

from helpers.tiny import tiny_model
from megatron_lite import parallel_state
from megatron_lite.config import ParallelConfig
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.planner.activation_memory import describe_activation_memory, stage_bytes

MICRO_BATCH = 3
SETTINGS = {  # name: model fields
    "none": {},
    "core_attn": {"recompute_granularity": "selective"},
    "mlp": {"recompute_granularity": "selective", "recompute_modules": ["mlp"]},
    "layernorm": {"recompute_granularity": "selective", "recompute_modules": ["layernorm"]},
    "selective-all": {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp", "layernorm"]},
    "full-uniform-1": {"recompute_granularity": "full", "recompute_method": "uniform"},
    "full-uniform-2": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
    "full-block-2": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 2},
}
CASES = list(itertools.product(("llama", "gpt2"), SETTINGS))
# Multi-latent attention (llama): name -> (setting, model fields). Its latents, their norms, the duplicated
# down-projections' and the gathered up-projections' inputs, q, k and v padded to one width.
MLA = {"multi_latent_attention": True, "num_query_groups": 4, "q_lora_rank": 16, "kv_lora_rank": 8, "qk_head_dim": 8,
       "qk_pos_emb_head_dim": 4, "v_head_dim": 6, "qk_layernorm": True}
UP_PROJ = {"recompute_granularity": "selective", "recompute_modules": ["mla_up_proj"]}
MLA_CASES = {
    "mla": ("none", MLA),
    "mla-direct-queries": ("core_attn", {**MLA, "q_lora_rank": None, "qk_layernorm": False}),
    "mla-wide-values": ("selective-all", {**MLA, "v_head_dim": 14}),  # q and k padded, not v
    "mla-up-proj": ("none", {**MLA, **UP_PROJ}),
    "mla-up-proj-direct-queries": ("none", {**MLA, **UP_PROJ, "q_lora_rank": None, "qk_layernorm": False}),
}


def model_config(family: str, setting: str, **model):
    return tiny_model(family, num_layers=4, hidden_size=64, num_attention_heads=4, ffn_hidden_size=192,
                      seq_length=32, **SETTINGS[setting], **model)


def saved_bytes(family: str, setting: str, sequence_parallel: bool = False, **model) -> int:
    """Bytes of the tensors the layers keep for backward in one training forward of a microbatch."""
    config = model_config(family, setting, **model)
    model = GPTModel(config, sequence_parallel)
    init_weights(model, config, seed=0)
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen, active, total = set(), [False], [0]

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if active[0] and storage.data_ptr() not in params and storage.data_ptr() not in seen:
            seen.add(storage.data_ptr())
            total[0] += storage.nbytes()
        return t
    run_layers = model._run_layers

    def layers_only(*args):
        active[0] = True
        try:
            return run_layers(*args)
        finally:
            active[0] = False
    model._run_layers = layers_only
    tokens = torch.randint(0, config.vocab_size, (MICRO_BATCH, config.seq_length),
                           generator=torch.Generator().manual_seed(0))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.train()(tokens, tokens)
    return total[0]


def tp_worker() -> dict:
    parallel_state.initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=2, sequence_parallel=True))
    return {**{case: saved_bytes(*case, sequence_parallel=True) for case in CASES},
            **{name: saved_bytes("llama", setting, True, **model) for name, (setting, model) in MLA_CASES.items()}}


@functools.cache
def spawned() -> list[dict]:
    return run_on_ranks(tp_worker, 2)


@pytest.mark.parametrize("family, setting", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_formula_is_what_the_layers_save_on_one_device(family: str, setting: str) -> None:
    expected = stage_bytes(model_config(family, setting), 4, MICRO_BATCH)
    assert saved_bytes(family, setting) == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("family, setting", CASES, ids=[f"{f}-{s}" for f, s in CASES])
def test_formula_is_what_the_layers_save_at_tp2_with_sp(family: str, setting: str) -> None:
    expected = stage_bytes(model_config(family, setting), 4, MICRO_BATCH, tp=2, sequence_parallel=True)
    for rank in spawned():
        assert rank[(family, setting)] == pytest.approx(expected, rel=0.05)


@pytest.mark.parametrize("name", MLA_CASES)
def test_multi_latent_attention_formula_is_exact(name: str) -> None:
    """Tensor by tensor, on one device and at tp 2 + SP (the down-projections and latent norms on this
    rank's tokens, the up-projections' inputs gathered unless mla_up_proj replays the gathers)."""
    setting, model = MLA_CASES[name]
    config = model_config("llama", setting, **model)
    assert saved_bytes("llama", setting, **model) == stage_bytes(config, 4, MICRO_BATCH)
    for rank in spawned():
        assert rank[name] == stage_bytes(config, 4, MICRO_BATCH, tp=2, sequence_parallel=True)


def test_partial_rope_keeps_tables_of_the_rotated_channels_only() -> None:
    """--rotary-percent 0.5: the RoPE tables the formula counts are half as wide, as the layers keep them."""
    expected = stage_bytes(model_config("llama", "none", rotary_percent=0.5), 4, MICRO_BATCH)
    assert saved_bytes("llama", "none", rotary_percent=0.5) == expected < stage_bytes(model_config("llama", "none"),
                                                                                         4, MICRO_BATCH)


def test_recomputation_saves_what_it_should() -> None:
    """Measured: full recomputation keeps one h-vector per token per layer (4 layers, fp32);
    selective of the MLP removes more than half; with flash-style attention core_attn saves
    little (under a tenth), and the settings order as the formula says."""
    measured = {s: saved_bytes("llama", s) for s in ("none", "core_attn", "mlp", "full-uniform-1")}
    assert measured["full-uniform-1"] == 4 * 4 * 32 * MICRO_BATCH * 64
    assert measured["mlp"] < 0.5 * measured["none"]
    assert 0.9 * measured["none"] < measured["core_attn"] < measured["none"]


def test_start_up_line_states_the_bytes_and_what_it_leaves_out() -> None:
    line = describe_activation_memory(model_config("llama", "full-block-2"), 4, 2, MICRO_BATCH, 1, False)
    expected = 2 * stage_bytes(model_config("llama", "full-block-2"), 4, MICRO_BATCH) / 2**20
    assert line.startswith(f"> activations: {expected:.2f} MB per microbatch on this rank (2 x 4 layers, full "
                           "(block, 2) recomputation")
    moe = tiny_model("llama", num_experts=4, hidden_dropout=0.1)
    assert "not counting MoE layers and dropout" in describe_activation_memory(moe, 2, 1, 1, 1, False)
