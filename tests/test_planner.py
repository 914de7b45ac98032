"""The planner's formulas (megatron_lite/planner/) against what a layout really allocates, saves
and sends, on CPU ranks: for every layout of the matrix, per rank, the bytes of weights, grads,
main weights and Adam state equal the allocated tensors exactly, the activation peak is within
5 % of the saved tensors' (measured with saved-tensor hooks; dense fp32 layouts), and the traffic
per (op, group) equals the communication meter exactly (MoE's token exchange: summed over the
ranks). One spawn of 4 ranks runs the whole matrix."""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from helpers.tiny import tiny_model
from megatron_lite import parallel_state
from megatron_lite.comm import METER
from megatron_lite.config import Config, ParallelConfig, TrainConfig
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.optimizer.muon import uses_muon
from megatron_lite.optimizer.optimizer import state_bytes
from megatron_lite.planner.activation_memory import SavedTensorMeter
from megatron_lite.planner.memory import RankCoords, activation_memory, rank_params, state_memory
from megatron_lite.planner.traffic import step_traffic
from megatron_lite.training.loop import rank_microbatches, set_seed, train_step
from megatron_lite.training.parallelize import parallelize
from megatron_lite.training.report import memory_parts

FULL = {"recompute_granularity": "full", "recompute_method": "uniform"}
MOE = {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32}
SELECTIVE = {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp"]}
# Multi-latent attention's widths (left out of the test ids): values narrower than the query/key heads.
MLA_SHAPE = {"num_query_groups": 4, "kv_lora_rank": 8, "qk_head_dim": 8, "qk_pos_emb_head_dim": 4, "v_head_dim": 6}
MLA = {"multi_latent_attention": True, **MLA_SHAPE}
# (layout name, family, model overrides, train overrides): every parallelism, sharding and
# schedule, both families (gpt2: tied embeddings, biases, LayerNorm), recomputation, bf16, the
# parameter server, mixture of experts (ep over dp, tp and with pp; shared expert; balancing losses),
# multi-latent attention (its latents gathered under SP, duplicated down-projections, padded heads).
MATRIX = [
    ("single", "llama", {}, {}),
    ("single", "gpt2", FULL, {}),
    ("single", "llama", {"mtp_num_layers": 2}, {}),  # multi-token prediction: its layers, norms and logits
    ("single", "llama", {**MLA, "q_lora_rank": 16, "qk_layernorm": True}, {}),
    ("dp4", "llama", {}, {}),
    ("dp4-distopt", "gpt2", {}, {}),
    ("dp4-distopt", "llama", {}, {"bf16": True}),
    ("dp4-zero2", "llama", {}, {}),
    ("dp4-zero3", "gpt2", {}, {}),
    ("tp4-sp", "gpt2", {}, {}),
    ("tp2-dp2", "llama", SELECTIVE, {}),
    ("tp2-dp2-sp", "llama", {"qk_layernorm": True}, {}),
    ("tp2-pp2-sp", "llama", FULL, {}),
    ("tp2-dp2-sp-distopt", "gpt2", {}, {}),
    ("pp2-vpp2-dp2", "llama", {}, {}),
    ("pp4", "gpt2", {}, {}),
    ("pp2-dp2-gpipe", "llama", {}, {}),
    ("pp2-dp2-zbh1-distopt", "llama", {}, {}),
    ("pp2-dp2", "llama", {"untie_embeddings_and_output_weights": False}, {}),  # tied: an embedding group
    ("tp2-pp2-sp", "llama", {"mtp_num_layers": 1}, {}),  # multi-token prediction: an embedding group too
    ("cp2-dp2", "llama", {"mtp_num_layers": 2}, {}),
    ("pp2-vpp2-dp2-zbv", "gpt2", {}, {"global_batch_size": 16}),  # ZB-V fills its V with 2 x pp - 1
    ("dp4-ps", "llama", {}, {}),
    ("tp2-dp2-ps", "gpt2", {}, {"bf16": True}),
    ("cp2-dp2", "llama", SELECTIVE, {}),
    ("cp2-tp2-sp", "llama", {**FULL, "recompute_num_layers": 2}, {}),
    ("cp4-allgather", "gpt2", {}, {}),
    ("tp2-cp2-a2a", "gpt2", {}, {}),
    ("cp2-pp2", "llama", {"qk_layernorm": True, "add_qkv_bias": True}, {}),
    ("dp4-ep4", "llama", {**MOE, "moe_aux_loss_coeff": 0.01}, {}),
    ("pp2-dp2-ep2-distopt", "llama", MOE, {}),
    ("tp2-dp2-ep4-sp", "llama", {**MOE, "moe_shared_expert_intermediate_size": 32}, {}),
    ("tp2-dp2-ep2", "llama", {**MOE, "moe_aux_loss_coeff": 0.01, "moe_router_load_balancing_type": "seq_aux_loss"}, {}),
    ("tp2-dp2-sp", "llama", {**MLA, "q_lora_rank": 16, "qk_layernorm": True, "recompute_granularity": "selective",
                             "recompute_modules": ["mla_up_proj", "mlp"]}, {}),
    ("tp2-pp2", "llama", {**MLA, "mtp_num_layers": 1}, {}),  # queries projected directly, no latent norms
    ("tp2-cp2-a2a", "llama", {**MLA, "v_head_dim": 14, "qk_layernorm": True}, {}),  # values wider: q, k padded
]
EXCHANGE = ("all_to_all", "ep")  # MoE: what a rank receives depends on the router


def matrix_config(name: str, family: str, model: dict, train: dict) -> Config:
    layout = Layout.parse(name)
    return Config(model=tiny_model(family, num_layers=4, fused_kernels=False, **model),
                  parallel=layout.apply(ParallelConfig()),
                  train=TrainConfig(**{"micro_batch_size": 2, "global_batch_size": 8, "train_iters": 2, "device": "cpu",
                                     **train}))


def measure(config: Config) -> dict:
    """What this rank allocates, saves at its peak and sends in one step (the second)."""
    parallel_state.initialize_model_parallel(config.parallel)
    set_seed(0)
    model = parallelize(config, torch.device("cpu"))
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    for iteration in (1, 2):
        batches = rank_microbatches(data, (iteration - 1) * config.train.global_batch_size, config, torch.device("cpu"))
        METER.reset()
        meter = SavedTensorMeter([p for c in model.chunks for p in c.parameters()])
        with torch.autograd.graph.saved_tensors_hooks(meter.pack, meter.unpack):
            train_step(model, batches, iteration, config, torch.device("cpu"))
    grid = parallel_state.get_grid()
    coords = RankCoords(grid.coord("pp"), grid.index("dp-cp"), grid.index("edp") if config.model.num_experts else 0)
    numels = [[p.numel() for p in chunk.parameters()] for chunk in model.chunks]
    matrices = [[uses_muon(p) for p in chunk.parameters()] for chunk in model.chunks]
    return {"coords": coords, "memory": memory_parts(model), "adam": state_bytes(model.optimizer.optimizer),
            "activations": meter.peak, "traffic": {k: float(v) for k, v in METER.bytes.items()}, "numels": numels,
            "matrices": matrices}


CASES = [case for case in MATRIX if case[0] != "single"]  # every one on 4 ranks
IDS = [f"{name}-{family}" + "".join(f"-{k}" for k in {**model, **train} if k not in ("recompute_method", *MLA_SHAPE))
       for name, family, model, train in CASES]


def matrix_worker() -> list[dict]:
    return [measure(matrix_config(*case)) for case in CASES]


@functools.cache
def spawned() -> list[list[dict]]:
    return run_on_ranks(matrix_worker, 4)


def results(case) -> list[dict]:
    """Every rank's measurements of one case."""
    return [rank[CASES.index(case)] for rank in spawned()]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_parameter_list_is_the_models(case) -> None:
    config = matrix_config(*case)
    for rank in results(case):
        predicted = rank_params(config, rank["coords"].pp)
        assert [[p.numel for p in chunk] for chunk in predicted] == rank["numels"]
        assert [[p.matrix for p in chunk] for chunk in predicted] == rank["matrices"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_state_bytes_equal_the_allocated_tensors(case) -> None:
    config = matrix_config(*case)
    for rank in results(case):
        predicted = state_memory(config, rank["coords"])
        assert predicted == rank["memory"]
        assert predicted["optimizer state"] == rank["adam"]


# The activation formula counts fp32 tensors, of dense layers.
FP32 = [case for case in CASES if not case[3].get("bf16") and "num_experts" not in case[2]]


@pytest.mark.parametrize("case", FP32, ids=[IDS[CASES.index(c)] for c in FP32])
def test_activation_peak_within_five_percent_of_the_saved_tensors(case) -> None:
    config = matrix_config(*case)
    for rank in results(case):
        predicted = activation_memory(config, rank["coords"].pp)
        assert predicted == pytest.approx(rank["activations"], rel=0.05), rank["coords"]


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_traffic_per_group_equals_the_meter(case) -> None:
    """Every (op, group) on every rank; the MoE token exchange summed over the ranks (each rank's
    share is the expectation of balanced routing)."""
    config = matrix_config(*case)
    predicted = [step_traffic(config, rank["coords"]) for rank in results(case)]
    for rank, mine in zip(results(case), predicted):
        measured = dict(rank["traffic"])
        assert {k: v for k, v in mine.items() if k != EXCHANGE} == \
            {k: v for k, v in measured.items() if k != EXCHANGE}, rank["coords"]
    assert sum(p.get(EXCHANGE, 0.0) for p in predicted) == sum(r["traffic"].get(EXCHANGE, 0.0)
                                                               for r in results(case))


def test_single_device_prediction_is_exact() -> None:
    for case in [c for c in MATRIX if c[0] == "single"]:
        config = dataclasses.replace(matrix_config(*case), parallel=ParallelConfig())
        measured = measure(config)
        assert state_memory(config) == measured["memory"]
        assert activation_memory(config) == pytest.approx(measured["activations"], rel=0.05)
        assert step_traffic(config) == measured["traffic"] == {}
