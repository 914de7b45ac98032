"""The planner's H100 calibration (megatron_lite/planner/calibration.py) and what it is held to:
torchtitan's FSDP setting (ZeRO-3 with recomputation, which the trainer runs too) predicted within
20 %, eager and compiled, GEMMs of small shapes reaching less than large ones, the memory-bound ops
at the HBM bandwidth a streaming kernel reaches, a cost per kernel that grows with the layers and
shrinks with fused kernels, the best published MFU per size class that a prediction is flagged
against, and the communication the code cannot hide (ZeRO-3's first gather and last
reduce-scatter, the last grad bucket)."""
from __future__ import annotations

import dataclasses

import pytest

from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.planner.calibration import calibration
from megatron_lite.planner.compute import stage_compute
from megatron_lite.planner.hardware import GPUS
from megatron_lite.planner.published import PUBLISHED, TORCHTITAN_FILE
from megatron_lite.planner.software import THIS_CODE, TORCHTITAN, TORCHTITAN_COMPILED
from megatron_lite.planner.step_time import estimate
from megatron_lite.planner.validation import mfu_ceiling, published_config


@pytest.mark.parametrize("software, published", [(TORCHTITAN, 5762), (TORCHTITAN_COMPILED, 6667)])
def test_torchtitan_fsdp_setting_within_twenty_percent(software, published) -> None:
    """8 H100s, ZeRO-3, local batch 2, selective recomputation: 5,762 tokens/s per GPU published
    (6,667 with torch.compile)."""
    (run,) = [r for r in PUBLISHED if r.source == TORCHTITAN_FILE and r.gpus == 8 and r.software == software]
    config = published_config(run)
    par = config.parallel
    assert (par.data_parallel_size, par.sharding, config.train.micro_batch_size) == (8, "optim_grads_params", 2)
    assert config.model.recompute_granularity == "selective"  # published_config validates it: the trainer runs it
    per_gpu = estimate(config, GPUS["H100-HBM2E"], software).tokens_per_s / 8
    assert per_gpu == pytest.approx(published, rel=0.20)


def test_small_gemms_reach_less_of_the_peak() -> None:
    hopper = calibration(GPUS["H100"])
    efficiencies = [hopper.gemm_efficiency(GPUS["H100"], m * k * n / (m * k + k * n + m * n))
                    for m, k, n in ((1024, 576, 576), (4096, 2048, 2048), (16384, 4096, 14336))]
    assert efficiencies == sorted(efficiencies) and efficiencies[-1] < hopper.gemm_ceiling
    assert dataclasses.replace(calibration(GPUS["H200"]), memory=hopper.memory) == hopper  # the H100's chip
    assert calibration(GPUS["H100-HBM2E"]).gemm_ceiling < hopper.gemm_ceiling  # its 500 W limit


@pytest.mark.parametrize("gpu, measured", [("A100", 1.70e12), ("H100", 2.97e12), ("H200", 4.15e12)])
def test_memory_bound_ops_move_at_the_measured_streaming_bandwidth(gpu: str, measured: float) -> None:
    """BabelStream's Triad on each GPU (calibration.py): a memory-bound op's time is its bytes over
    the datasheet bandwidth times that fraction, and so is the optimizer step's."""
    cal = calibration(GPUS[gpu])
    assert cal.hbm_bandwidth(GPUS[gpu]) == pytest.approx(measured)
    assert 0.8 < cal.memory < 0.9
    config = _llama_8b()
    at_datasheet = stage_compute(config, GPUS[gpu], dataclasses.replace(cal, memory=1.0), THIS_CODE)
    reached = stage_compute(config, GPUS[gpu], cal, THIS_CODE)
    assert reached.parts["memory"] == pytest.approx(at_datasheet.parts["memory"] / cal.memory)
    assert reached.optimizer_s == pytest.approx(at_datasheet.optimizer_s / cal.memory)
    assert calibration(GPUS["H100-HBM2E"]).memory == calibration(GPUS["H100"]).memory  # nothing measured: the H100's


def test_kernel_overhead_grows_with_layers_and_shrinks_when_fused() -> None:
    """A fixed cost per kernel (1.3 us on an H100): twice the layers, twice the kernels; the
    same layer fused (--fused-kernels, --compile) runs fewer than eager."""
    cal = calibration(GPUS["H100"])

    def stage(layers: int, fused_kernels: bool = False, compile: bool = False):
        config = _llama_8b()
        config = dataclasses.replace(config, model=dataclasses.replace(config.model, num_layers=layers,
                                                                         fused_kernels=fused_kernels),
                                     train=dataclasses.replace(config.train, compile=compile))
        return stage_compute(config, GPUS["H100"], cal, THIS_CODE)

    eager = stage(4)
    assert stage(8).kernels == 2 * eager.kernels
    assert eager.parts["kernels"] == pytest.approx(eager.kernels * cal.kernel_overhead)
    for fused in (stage(4, compile=True), stage(4, fused_kernels=True)):
        assert fused.kernels < eager.kernels / 2 and fused.parts["kernels"] < eager.parts["kernels"]
    # Eager torchtitan launches its separate q, k, v, gate and up projections and its unfused
    # norms, RoPE and SwiGLU: more kernels than compiled.
    run = published_config(next(r for r in PUBLISHED if r.source == TORCHTITAN_FILE and r.gpus == 8))
    titan = [stage_compute(run, GPUS["H100-HBM2E"], calibration(GPUS["H100-HBM2E"]), software)
             for software in (TORCHTITAN, TORCHTITAN_COMPILED)]
    assert titan[0].kernels > titan[1].kernels


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


def test_multi_latent_attention_runs_its_kernel_at_the_padded_width() -> None:
    """MLA's attention kernel takes q, k and v at one width, the wider of its query/key heads (qk + pos channels)
    and its value heads: it takes as long as standard attention's at that head width (MFU counts the narrower
    values' math only: planner/flops.py), while its low-rank projections are cheaper GEMMs than a full QKV's."""
    shape = dict(family="llama", num_layers=4, hidden_size=2048, num_attention_heads=16, num_query_groups=16,
                 ffn_hidden_size=8192, seq_length=4096, max_position_embeddings=4096, vocab_size=32000)
    mla = ModelConfig(**shape, multi_latent_attention=True, kv_lora_rank=512, qk_head_dim=128, qk_pos_emb_head_dim=64,
                      v_head_dim=128, qk_layernorm=True)
    standard = ModelConfig(**shape, kv_channels=mla.attention_padded_head_dim)
    parts = [stage_compute(Config(model=model, parallel=ParallelConfig(tensor_model_parallel_size=2,
                                                                       sequence_parallel=True),
                                  train=TrainConfig(micro_batch_size=1, global_batch_size=8, bf16=True)),
                           GPUS["H100"], calibration(GPUS["H100"]), THIS_CODE).parts for model in (mla, standard)]
    assert parts[0]["attention"] == parts[1]["attention"]
    assert parts[0]["gemm"] < parts[1]["gemm"]
