"""The planner's prediction for the run being started, and at the end the measurement beside it
(pretrain_gpt.py's start-up and closing lines, rank 0's view)."""
from __future__ import annotations

from megatron_lite.config import Config
from megatron_lite.planner.memory import activation_memory, state_memory
from megatron_lite.planner.traffic import step_traffic

MB = 2**20


def _traffic_mb(traffic: dict[tuple[str, str], float]) -> str:
    groups: dict[str, float] = {}
    for (_, group), nbytes in traffic.items():
        groups[group] = groups.get(group, 0.0) + nbytes
    return ", ".join(f"{group} {nbytes / MB:.2f}" for group, nbytes in sorted(groups.items())) or "none"


def _exact(config: Config) -> str:
    return " (MoE token exchange: the expectation of balanced routing)" if config.model.num_experts else ""


def describe_plan(config: Config) -> str:
    """Rank 0's predicted state bytes, peak activations and bytes per step by group."""
    state = state_memory(config)
    parts = ", ".join(f"{name} {nbytes / MB:.2f}" for name, nbytes in state.items())
    return (f"> planner: rank 0 will hold (MB) {parts}, activations {activation_memory(config) / MB:.2f} at the "
            f"peak; a step sends (MB, logical volume) {_traffic_mb(step_traffic(config))}{_exact(config)}")


def describe_measured(config: Config, allocated: dict[str, int], traffic: dict[tuple[str, str], float]) -> str:
    """Rank 0's allocated state bytes and last step's metered traffic, beside the prediction."""
    predicted, predicted_traffic = state_memory(config), step_traffic(config)
    same = allocated == predicted and {k: float(v) for k, v in traffic.items()} == predicted_traffic
    parts = ", ".join(f"{name} {nbytes / MB:.2f}" for name, nbytes in allocated.items())
    verdict = "as predicted" if same else (f"predicted {', '.join(f'{n} {b / MB:.2f}' for n, b in predicted.items())}; "
                                           f"traffic {_traffic_mb(predicted_traffic)}")
    return (f"> measured: rank 0 holds (MB) {parts}; its last step sent (MB) {_traffic_mb(traffic)}{_exact(config)}: "
            f"{verdict}")
