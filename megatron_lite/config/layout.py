"""A parallel layout in one value (and one short name): the size of every grid axis, the pipeline
schedule and chunks, sequence parallelism, optimizer sharding and the data-parallel mode. Tests and
tools describe the layouts they run with it; `apply` writes it into a ParallelConfig, `of` reads
it back, and `name` is the one way a layout is printed (the start-up line, the planner's rows,
a checkpoint's resharding line)."""
from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass

from megatron_lite.config.checks import ConfigError
from megatron_lite.config.parallel_config import CP_COMM_TYPES, SCHEDULES, ZERO_STAGES, ParallelConfig

_STRATEGY = {stage: strategy for strategy, stage in ZERO_STAGES.items()}
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

    def flags(self) -> list[str]:
        """pretrain_gpt.py's flags for this layout (dp is what the world leaves: no flag)."""
        sizes = [[flag, str(size)] for flag, size in (("--tp", self.tp), ("--cp", self.cp), ("--pp", self.pp),
                                                     ("--ep", self.ep), ("--vpp", self.vpp)) if size > 1]
        flags = [token for pair in sizes for token in pair]
        flags += ["--cp-comm-type", self.cp_comm] if self.cp_comm != "p2p" else []
        flags += ["--pipeline-schedule", self.schedule] if self.schedule else []
        flags += ["--sp"] * self.sp + ["--use-distributed-optimizer"] * self.distopt
        flags += ["--overlap-param-gather"] * self.overlap
        flags += ["--data-parallel-sharding-strategy", _STRATEGY[self.zero]] if self.zero else []
        flags += ["--data-parallel-mode", "parameter-server"] if self.ps else []
        return flags

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
                                  f"{', '.join(CP_COMM_TYPES + tuple(_SCHEDULE_PARTS))}, "
                                  "sp, distopt, overlap, zero2, zero3, ps "
                                  "(e.g. tp2-pp2-dp2-sp-distopt)")
        return cls(**fields)

    def fields(self) -> dict:
        """The ParallelConfig fields this layout sets, for `Config.updated(parallel=...)`."""
        return dict(tensor_model_parallel_size=self.tp, context_parallel_size=self.cp, cp_comm_type=self.cp_comm,
                    pipeline_model_parallel_size=self.pp, data_parallel_size=self.dp,
                    expert_model_parallel_size=self.ep,
                    virtual_pipeline_model_parallel_size=self.vpp if self.vpp > 1 else None,
                    pipeline_schedule=self.schedule, sequence_parallel=self.sp, use_distributed_optimizer=self.distopt,
                    overlap_param_gather=self.overlap,
                    data_parallel_mode="parameter-server" if self.ps else "all-reduce",
                    data_parallel_sharding_strategy=_STRATEGY[self.zero] if self.zero > 1 else None)

    def apply(self, parallel: ParallelConfig) -> ParallelConfig:
        """`parallel` with this layout's fields set."""
        return dataclasses.replace(parallel, **self.fields())

    @classmethod
    def of(cls, parallel: ParallelConfig) -> Layout:
        """The layout of a ParallelConfig (the inverse of `apply`)."""
        return cls(tp=parallel.tensor_model_parallel_size, cp=parallel.context_parallel_size,
                   cp_comm=parallel.cp_comm_type,
                   pp=parallel.pipeline_model_parallel_size, dp=parallel.data_parallel_size,
                   ep=parallel.expert_model_parallel_size, vpp=parallel.vpp, schedule=parallel.pipeline_schedule,
                   sp=parallel.sequence_parallel, distopt=parallel.zero_stage == 1,
                   overlap=parallel.overlap_param_gather,
                   zero=parallel.zero_stage if parallel.zero_stage > 1 else 0, ps=parallel.parameter_server)

    @classmethod
    def from_checkpoint(cls, record: dict) -> Layout:
        """The layout a checkpoint records (checkpointing/save.py's current_layout; older
        checkpoints lack cp, ep and sharding)."""
        stage = ZERO_STAGES[record.get("sharding") or ("optim" if record["distributed_optimizer"] else "no_shard")]
        schedule = "zbv" if record.get("pipeline_placement") == "v" else None
        return cls(tp=record["tp"], cp=record.get("cp", 1), pp=record["pp"], dp=record["dp"], ep=record.get("ep", 1),
                   vpp=record["vpp"], schedule=schedule, distopt=stage == 1, zero=stage if stage > 1 else 0)
