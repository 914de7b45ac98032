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


def describe_plan(config: Config, allocated: dict[str, int]) -> str:
    """The planner's view of rank 0 at start-up: its state against what was allocated (the memory
    line lists those bytes), its peak activations, and what a step will send by group."""
    predicted = state_memory(config)
    state = ("state as allocated" if predicted == allocated else
             "state (MB) " + ", ".join(f"{name} {nbytes / MB:.2f}" for name, nbytes in predicted.items())
             + ", not as allocated")
    return (f"> planner: rank 0's {state}, activations {activation_memory(config) / MB:.2f} MB at the peak; a step "
            f"sends (MB, logical volume) {_traffic_mb(step_traffic(config))}{_exact(config)}")


def describe_measured(config: Config, traffic: dict[tuple[str, str], float]) -> str:
    """Rank 0's last step's metered traffic, beside the prediction."""
    predicted = step_traffic(config)
    same = {k: float(v) for k, v in traffic.items()} == predicted
    return (f"> measured: rank 0's last step sent (MB) {_traffic_mb(traffic)}{_exact(config)}: "
            + ("as predicted" if same else f"predicted {_traffic_mb(predicted)}"))
