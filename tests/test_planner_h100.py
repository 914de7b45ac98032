"""The planner's H100 calibration (megatron_lite/planner/calibration.py) and what it is held to:
torchtitan's FSDP setting (ZeRO-3 with recomputation, which the trainer runs too) predicted within
20 %, GEMMs of small shapes reaching less than large ones, the best published MFU per
size class that a prediction is flagged against, and the communication the code cannot hide
(ZeRO-3's first gather and last reduce-scatter, the last grad bucket)."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.planner.calibration import calibration
from megatron_lite.planner.hardware import GPUS
from megatron_lite.planner.published import PUBLISHED, TORCHTITAN_FILE
from megatron_lite.planner.software import TORCHTITAN
from megatron_lite.planner.step_time import estimate
from megatron_lite.planner.validation import mfu_ceiling, published_config


def test_torchtitan_fsdp_setting_within_twenty_percent() -> None:
    """8 H100s, ZeRO-3, local batch 2, selective recomputation: 5,762 tokens/s per GPU published."""
    (run,) = [r for r in PUBLISHED if r.source == TORCHTITAN_FILE and r.gpus == 8 and r.software == TORCHTITAN]
    config = published_config(run)
    par = config.parallel
    assert (par.data_parallel_size, par.sharding, config.train.micro_batch_size) == (8, "optim_grads_params", 2)
    assert config.model.recompute_granularity == "selective"  # published_config validates it: the trainer runs it
    per_gpu = estimate(config, GPUS["H100-HBM2E"], TORCHTITAN).tokens_per_s / 8
    assert per_gpu == pytest.approx(5762, rel=0.20)


def test_small_gemms_reach_less_of_the_peak() -> None:
    hopper = calibration(GPUS["H100"])
    efficiencies = [hopper.gemm_efficiency(GPUS["H100"], m * k * n / (m * k + k * n + m * n))
                    for m, k, n in ((1024, 576, 576), (4096, 2048, 2048), (16384, 4096, 14336))]
    assert efficiencies == sorted(efficiencies) and efficiencies[-1] < hopper.gemm_ceiling
    assert calibration(GPUS["H200"]) == hopper
    assert calibration(GPUS["H100-HBM2E"]).gemm_ceiling < hopper.gemm_ceiling  # its 500 W limit


@pytest.mark.parametrize("parameters, mfu, run", [
    (1.1e9, 50.0, "SmolLM-1.7B"), (8e9, 39.0, "Llama-3.1-8B compile"), (175e9, 47, "GPT-3 175B"),
    (462e9, 48, "Megatron-Core's largest (462B) weak-scaling model (47-48 %)"),
])
def test_best_published_mfu_per_size_class(parameters: float, mfu: float, run: str) -> None:
    for gpu in ("H100", "H200", "H100-HBM2E"):
        ceiling = mfu_ceiling(GPUS[gpu], parameters)
        assert ceiling.mfu == pytest.approx(mfu, abs=0.05) and ceiling.label == run
    assert mfu_ceiling(GPUS["B200"], parameters) is None  # nothing published on B200


def _llama_8b(**parallel) -> Config:
    return Config(model=ModelConfig(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32,
                                    num_query_groups=8, ffn_hidden_size=14336, seq_length=8192, vocab_size=128256),
                  parallel=ParallelConfig(**parallel),
                  train=TrainConfig(micro_batch_size=1, global_batch_size=64, bf16=True, device="cuda"))


def test_zero3_waits_for_its_first_gather_and_last_reduce_scatter() -> None:
    """Compute dwarfs the gathers on NVLink, yet the first layer's gathers and the last
    reduce-scatter of each microbatch have nothing to hide behind."""
    est = estimate(_llama_8b(data_parallel_size=8, data_parallel_sharding_strategy="optim_grads_params"), GPUS["H100"])
    assert est.comm_s["dp-cp"] < est.compute_s / 4
    assert 0 < est.exposed_comm_s < est.comm_s["dp-cp"] / 4


def test_last_bucket_waits_and_interleaving_hides_more() -> None:
    """Plain DP over 16 ranks across nodes reduces its buckets during the last backward, but the
    bucket completed last waits; under the interleaved schedule each chunk's reduction starts
    chunks earlier. (Pipeline sends and the small scalars wait whole in both.)"""
    flat = _llama_8b(data_parallel_size=16, pipeline_model_parallel_size=4)
    interleaved = dataclasses.replace(flat, parallel=dataclasses.replace(
        flat.parallel, virtual_pipeline_model_parallel_size=2))
    waits = []
    for config in (flat, interleaved):
        est = estimate(config, GPUS["H100"])
        others = est.comm_s["pp"] + est.comm_s["mp"] + est.comm_s["dp"]
        assert 0 < est.exposed_comm_s - others < est.comm_s["dp-cp"]
        waits.append(est.exposed_comm_s - others)
    assert waits[1] < waits[0] / 2
