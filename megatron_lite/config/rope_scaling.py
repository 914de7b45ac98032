"""RoPE scaling's flags (linear, llama3, yarn) and their checks: a base of ModelConfig, which holds the fields."""
from __future__ import annotations

from megatron_lite.config.checks import ConfigError, flag, require, require_positive

ROPE_SCALING_TYPES = ("none", "linear", "llama3", "yarn")
# The --rope-scaling-* fields only yarn reads; unset (None) under the other types.
YARN_ONLY = ("rope_scaling_beta_fast", "rope_scaling_beta_slow", "rope_scaling_mscale", "rope_scaling_mscale_all_dim",
             "rope_scaling_attention_factor")


class RopeScalingChecks:
    """The --rope-scaling-* checks and yarn's derived betas, on ModelConfig's fields."""

    @property
    def rope_scaling_betas(self) -> tuple[float, float]:
        """yarn's (beta_fast, beta_slow), an unset one at YaRN's default (32, 1), as transformers does."""
        return self.rope_scaling_beta_fast or 32.0, self.rope_scaling_beta_slow or 1.0

    def _first_set(self, names: tuple[str, ...]) -> str | None:
        """The first of these optional fields that is set, if any."""
        return next((name for name in names if getattr(self, name) is not None), None)

    def _validate_rope_scaling(self) -> None:
        kind = self.rope_scaling_type
        require(kind in ROPE_SCALING_TYPES, f"--rope-scaling-type={kind} is unknown; allowed: "
                f"{', '.join(ROPE_SCALING_TYPES)}")
        if kind == "none":
            given = self._first_set(("rope_scaling_factor", "rope_scaling_original_max_position_embeddings",
                                     *YARN_ONLY))
            if given:
                raise ConfigError(f"{flag(given)} needs --rope-scaling-type")
            return
        require(self.family == "llama", f"--rope-scaling-type={kind} is for the llama family (gpt2 learns its "
                "positions)")
        require_positive(self, "rope_scaling_factor")
        if kind == "linear":
            require(self.rope_scaling_original_max_position_embeddings is None,
                    "--rope-scaling-original-max-position-embeddings is for --rope-scaling-type llama3 or yarn")
        else:
            require_positive(self, "rope_scaling_original_max_position_embeddings")
        if kind == "llama3":
            require_positive(self, "rope_scaling_low_freq_factor", "rope_scaling_high_freq_factor")
            require(self.rope_scaling_high_freq_factor > self.rope_scaling_low_freq_factor,
                    f"--rope-scaling-high-freq-factor={self.rope_scaling_high_freq_factor} must exceed "
                    f"--rope-scaling-low-freq-factor={self.rope_scaling_low_freq_factor}")
        if kind != "yarn":
            given = self._first_set(YARN_ONLY)
            if given:
                raise ConfigError(f"{flag(given)} is for --rope-scaling-type yarn")
            return
        for name in YARN_ONLY:
            value = getattr(self, name)
            if name in ("rope_scaling_mscale", "rope_scaling_mscale_all_dim"):  # 0: the term is 1 (Megatron's default)
                require(value is None or value >= 0, f"{flag(name)}={value} must be >= 0")
            elif value is not None:
                require_positive(self, name)
        require((self.rope_scaling_mscale is None) == (self.rope_scaling_mscale_all_dim is None),
                "--rope-scaling-mscale and --rope-scaling-mscale-all-dim go together")
        fast, slow = self.rope_scaling_betas
        require(fast > slow, f"--rope-scaling-beta-fast={fast} must exceed --rope-scaling-beta-slow={slow}")
