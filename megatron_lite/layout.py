"""A parallel layout in one value (and one short name): the size of every grid axis, the pipeline
schedule and chunks, sequence parallelism, optimizer sharding and the data-parallel mode. Tests and tools describe the
layouts they run with it; `apply` writes it into a ParallelConfig."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from megatron_lite.config import CP_COMM_TYPES, SCHEDULES, ConfigError, ParallelConfig

# A schedule as a part of a layout name, whose parts "-" separates.
_SCHEDULE_PARTS = {schedule.replace("-", ""): schedule for schedule in SCHEDULES}


@dataclass(frozen=True)
class Layout:
    tp: int = 1
    cp: int = 1
    cp_comm: str = "p2p"  # --cp-comm-type
    pp: int = 1
    dp: int = 1
    ep: int = 1  # expert parallelism, carved out of tp x dp x cp (not a factor of the world size)
    vpp: int = 1
    schedule: str | None = None  # default: ParallelConfig's (interleaved when vpp > 1, else 1f1b)
    sp: bool = False
    distopt: bool = False
    overlap: bool = False  # --overlap-param-gather (with distopt)
    zero: int = 0  # 2 or 3: --data-parallel-sharding-strategy optim_grads / optim_grads_params (ZeRO-1 is distopt)
    ps: bool = False  # --data-parallel-mode parameter-server (else all-reduce)

    @property
    def world_size(self) -> int:
        return self.tp * self.cp * self.pp * self.dp

    @property
    def name(self) -> str:
        """e.g. tp2-cp2-pp2-dp2-ep2-vpp2-sp-distopt-overlap, cp2-a2a, dp4-zero3, dp4-ps; "single" for one device."""
        parts = [f"{axis}{size}" for axis, size in (("tp", self.tp), ("cp", self.cp), ("pp", self.pp),
                                                    ("dp", self.dp), ("ep", self.ep), ("vpp", self.vpp)) if size > 1]
        parts += [self.cp_comm] if self.cp_comm != "p2p" else []
        parts += [self.schedule.replace("-", "")] if self.schedule else []  # zb-h1 as zbh1: "-" parts names
        parts += ["sp"] * self.sp + ["distopt"] * self.distopt + ["overlap"] * self.overlap
        parts += [f"zero{self.zero}"] if self.zero else []
        parts += ["ps"] * self.ps
        return "-".join(parts) or "single"

    @classmethod
    def parse(cls, name: str) -> Layout:
        """The inverse of `name`."""
        if name == "single":
            return cls()
        fields: dict = {}
        for part in name.split("-"):
            sized = re.fullmatch(r"(tp|cp|pp|dp|ep|vpp|zero)(\d+)", part)
            if sized:
                fields[sized.group(1)] = int(sized.group(2))
            elif part in CP_COMM_TYPES:
                fields["cp_comm"] = part
            elif part in _SCHEDULE_PARTS:
                fields["schedule"] = _SCHEDULE_PARTS[part]
            elif part in ("sp", "distopt", "overlap", "ps"):
                fields[part] = True
            else:
                raise ConfigError(f"layout {name!r}: {part!r} is not one of tpN, cpN, ppN, dpN, epN, vppN, "
                                  f"{', '.join(CP_COMM_TYPES + tuple(_SCHEDULE_PARTS))}, sp, distopt, overlap, zero2, zero3, ps "
                                  "(e.g. tp2-pp2-dp2-sp-distopt)")
        return cls(**fields)

    def apply(self, parallel: ParallelConfig) -> ParallelConfig:
        """`parallel` with this layout's fields set (dp is what the world leaves: it is not a field)."""
        return dataclasses.replace(parallel, tensor_model_parallel_size=self.tp, context_parallel_size=self.cp,
                                   cp_comm_type=self.cp_comm, pipeline_model_parallel_size=self.pp,
                                   data_parallel_size=self.dp, expert_model_parallel_size=self.ep,
                                   virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
                                   pipeline_schedule=self.schedule, sequence_parallel=self.sp,
                                   use_distributed_optimizer=self.distopt,
                                   overlap_param_gather=self.overlap,
                                   data_parallel_mode="parameter-server" if self.ps else "all-reduce",
                                   data_parallel_sharding_strategy={2: "optim_grads", 3: "optim_grads_params"}.get(self.zero))
