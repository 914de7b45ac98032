"""The mixture of experts' flags: which layers are MoE, the router's options and their checks; a base of
ModelConfig, which holds the fields."""
from __future__ import annotations

from megatron_lite.config.checks import require, require_positive

MOE_SCORE_FUNCTIONS = ("softmax", "sigmoid")
MOE_LOAD_BALANCING = ("aux_loss", "seq_aux_loss", "none")
MOE_DISPATCHERS = ("alltoall", "allgather")


class MoEChecks:
    """MoE layer placement, expert widths and the --moe-* checks, on ModelConfig's fields."""

    @property
    def expert_ffn_hidden_size(self) -> int:
        return self.moe_ffn_hidden_size or self.ffn_hidden_size

    def is_moe_layer(self, number: int) -> bool:
        """Whether layer `number` (0-based, global) is a mixture of experts (Megatron's freq: layers freq-1, 2*freq-1,
        ..., or the list's entry). A multi-token prediction layer (numbered after the list) is what the last layer is:
        Megatron builds its spec from the decoder's last layer (DeepSeek-V3's MTP layer is MoE)."""
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            return bool(self.num_experts) and freq[min(number, len(freq) - 1)] == 1
        return bool(self.num_experts) and (number + 1) % freq == 0

    def _validate_moe(self) -> None:
        require_positive(self, "num_experts", "moe_router_topk")
        freq = self.moe_layer_freq
        if isinstance(freq, list):
            require(len(freq) == self.num_layers and set(freq) <= {0, 1}, f"--moe-layer-freq={freq} must give each of "
                    f"the --num-layers={self.num_layers} layers 1 (MoE) or 0 (dense)")
        else:
            require_positive(self, "moe_layer_freq")
        self._validate_router_groups()
        require(self.moe_router_topk <= self.num_experts,
                f"--moe-router-topk={self.moe_router_topk} exceeds --num-experts={self.num_experts}")
        require(self.moe_router_score_function in MOE_SCORE_FUNCTIONS,
                f"--moe-router-score-function={self.moe_router_score_function} is unknown; allowed: "
                f"{', '.join(MOE_SCORE_FUNCTIONS)}")
        require(self.moe_router_load_balancing_type in MOE_LOAD_BALANCING,
                f"--moe-router-load-balancing-type={self.moe_router_load_balancing_type} is unknown; allowed: "
                f"{', '.join(MOE_LOAD_BALANCING)}")
        require(self.moe_token_dispatcher_type in MOE_DISPATCHERS,
                f"--moe-token-dispatcher-type={self.moe_token_dispatcher_type} is unknown; allowed: "
                f"{', '.join(MOE_DISPATCHERS)}")
        require(self.moe_aux_loss_coeff >= 0 and (self.moe_z_loss_coeff or 0) >= 0,
                f"--moe-aux-loss-coeff={self.moe_aux_loss_coeff} and --moe-z-loss-coeff={self.moe_z_loss_coeff} "
                "must be >= 0")
        if self.moe_expert_capacity_factor is not None:
            require(self.moe_expert_capacity_factor > 0,
                    f"--moe-expert-capacity-factor={self.moe_expert_capacity_factor} must be > 0 (leave it unset "
                    "for dropless routing)")
        require(self.moe_expert_capacity_factor is not None or not self.moe_pad_expert_input_to_capacity,
                "--moe-pad-expert-input-to-capacity needs --moe-expert-capacity-factor")
        require(not self.moe_shared_expert_gate or self.moe_shared_expert_intermediate_size,
                "--moe-shared-expert-gate needs --moe-shared-expert-intermediate-size")
        for name in ("moe_ffn_hidden_size", "moe_shared_expert_intermediate_size"):
            if getattr(self, name) is not None:
                require_positive(self, name)

    def _validate_router_groups(self) -> None:
        groups, group_topk = self.moe_router_num_groups, self.moe_router_group_topk
        if self.moe_router_topk_scaling_factor is not None:
            require_positive(self, "moe_router_topk_scaling_factor")
        require((groups is None) == (group_topk is None),
                "--moe-router-num-groups and --moe-router-group-topk go together")
        if groups is None:
            return
        require_positive(self, "moe_router_num_groups", "moe_router_group_topk")
        per_group = self.num_experts // groups
        require(self.num_experts % groups == 0 and group_topk <= groups and self.moe_router_topk % group_topk == 0
                and self.moe_router_topk // group_topk <= per_group,
                f"--moe-router-num-groups={groups} must divide --num-experts={self.num_experts}, and "
                f"--moe-router-group-topk={group_topk} be at most the groups and divide --moe-router-topk="
                f"{self.moe_router_topk} into at most {per_group} experts per group")
