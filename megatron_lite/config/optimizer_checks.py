"""The optimizer's choices (AdamW or Muon) and Muon's flags: a base of TrainConfig, which holds the fields."""
from __future__ import annotations

from megatron_lite.config.checks import require

OPTIMIZERS = ("adam", "muon")
# Newton-Schulz coefficients (a, b, c) per step, cycled over --muon-num-ns-steps (optimizer/muon.py).
# "simple": Keller Jordan's Muon, one triple every step; "quintic": the per-step set Megatron-Core defaults to.
MUON_COEFFICIENTS = {
    "quintic": ((4.0848, -6.8946, 2.9270), (3.9505, -6.3029, 2.6377), (3.7418, -5.5913, 2.3037),
                (2.8769, -3.1427, 1.2046), (2.8366, -3.0525, 1.2012)),
    "simple": ((3.4445, -4.7750, 2.0315),),
}
MUON_SCALE_MODES = ("spectral", "unit_rms_norm", "shape_scaling")
MUON_TP_MODES = ("blockwise", "duplicated", "distributed")  # Megatron's; only duplicated runs here


class OptimizerChecks:
    """The --optimizer and --muon-* checks, on TrainConfig's fields."""

    def _validate_muon(self) -> None:
        require(self.optimizer in OPTIMIZERS,
                f"--optimizer={self.optimizer} is unknown; allowed: {', '.join(OPTIMIZERS)}")
        require(0 <= self.muon_momentum < 1, f"--muon-momentum={self.muon_momentum} must be in [0, 1)")
        require(self.muon_num_ns_steps >= 1, f"--muon-num-ns-steps={self.muon_num_ns_steps} must be at least 1")
        require(self.muon_extra_scale_factor > 0,
                f"--muon-extra-scale-factor={self.muon_extra_scale_factor} must be positive")
        require(self.muon_tp_mode == "duplicated",
                f"--muon-tp-mode={self.muon_tp_mode} is not implemented; allowed: duplicated (each tensor-parallel "
                "matrix is gathered and orthogonalised whole)")
        require(not (self.optimizer == "muon" and self.optimizer_cpu_offload),
                "--optimizer muon with --optimizer-cpu-offload is not supported (Muon gathers its updates where the "
                "model is); drop one of them")
