"""The planner's prediction for the run being started, and at the end the measurement beside it
(pretrain_gpt.py's start-up and closing lines, rank 0's view)."""
from __future__ import annotations

from megatron_lite.config import Config
from megatron_lite.planner.hardware import GPU
from megatron_lite.planner.memory import RankCoords, activation_memory, state_memory
from megatron_lite.planner.step_time import estimate
from megatron_lite.planner.traffic import step_traffic

MB = 2**20


def _traffic_mb(traffic: dict[tuple[str, str], float]) -> str:
    groups: dict[str, float] = {}
    for (_, group), nbytes in traffic.items():
        groups[group] = groups.get(group, 0.0) + nbytes
    return ", ".join(f"{group} {nbytes / MB:.2f}" for group, nbytes in sorted(groups.items())) or "none"


def _exact(config: Config) -> str:
    return " (MoE token exchange: the expectation of balanced routing)" if config.model.num_experts else ""


def describe_plan(config: Config, allocated: dict[str, int]) -> str:
    """The planner's view of rank 0 at start-up: its state against what was allocated (the memory
    line lists those bytes), its peak activations, and what a step will send by group."""
    predicted = state_memory(config)
    state = ("state as allocated" if predicted == allocated else
             "state (MB) " + ", ".join(f"{name} {nbytes / MB:.2f}" for name, nbytes in predicted.items())
             + ", not as allocated")
    return (f"> planner: rank 0's {state}, activations {activation_memory(config) / MB:.2f} MB at the peak; "
            + describe_traffic(config))


def describe_traffic(config: Config) -> str:
    """What one step of rank 0 sends, by group."""
    return f"a step sends (MB, logical volume) {_traffic_mb(step_traffic(config))}{_exact(config)}"


def describe_stage_memory(config: Config) -> list[str]:
    """Each pipeline stage's ranks' bytes by the planner's formulas (a stage's ranks hold the same,
    but for a few bytes of bucket padding on the last data-parallel shard)."""
    lines = []
    for pp_rank in range(config.parallel.pipeline_model_parallel_size):
        parts = {**state_memory(config, RankCoords(pp=pp_rank)), "activations": activation_memory(config, pp_rank)}
        lines.append(f"> memory per rank of pipeline stage {pp_rank} (planner, MB): "
                     + " + ".join(f"{name} {nbytes / MB:.2f}" for name, nbytes in parts.items() if nbytes)
                     + f" = {sum(parts.values()) / MB:.2f}")
    return lines


def describe_step_time(config: Config, gpu: GPU) -> str:
    """The planner's step on `gpu`s (step_time.py's model: bf16 GEMMs at its calibrated share of peak)."""
    est = estimate(config, gpu)
    par = config.parallel
    world = (par.tensor_model_parallel_size * par.context_parallel_size * par.pipeline_model_parallel_size
             * par.data_parallel_size)
    return (f"> planner on {world} x {gpu.name}: step {est.step_s:.4g} s (compute {est.compute_s:.4g}, exposed "
            f"communication {est.exposed_comm_s:.4g}, bubble {est.bubble_s:.4g}), {est.tokens_per_s:,.0f} tokens/s, "
            f"MFU {100 * est.mfu:.1f}%, peak memory {est.peak_memory / 1e9:.1f} GB of {gpu.memory_gb:.0f}: "
            + ("fits" if est.fits else "does not fit (95% of the GPU's memory at most)"))



def describe_measured(config: Config, traffic: dict[tuple[str, str], float]) -> str:
    """Rank 0's last step's metered traffic, beside the prediction."""
    predicted = step_traffic(config)
    same = {k: float(v) for k, v in traffic.items()} == predicted
    return (f"> measured: rank 0's last step sent (MB) {_traffic_mb(traffic)}{_exact(config)}: "
            + ("as predicted" if same else f"predicted {_traffic_mb(predicted)}"))
