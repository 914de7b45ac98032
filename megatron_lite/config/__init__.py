"""The run's configuration: one Config of the three dataclasses (model_config.py,
parallel_config.py, train_config.py), the checks that span them, and the two errors a run can
end with (checks.py). Everything a run's configuration is made of is importable from here;
layout.py names a parallel layout in one value, packages.py checks a flag's optional package.

Each field carries a one-line docstring (the string literal under it); `training/arguments.py` turns
those into `--help` text, so the CLI and the code never disagree on what a field means.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from megatron_lite.config.checks import ConfigError, TrainingError, require
from megatron_lite.config.model_config import (
    FAMILIES,
    RECOMPUTE_GRANULARITIES,
    RECOMPUTE_METHODS,
    RECOMPUTE_MODULES,
    ModelConfig,
)
from megatron_lite.config.moe_checks import MOE_DISPATCHERS, MOE_LOAD_BALANCING, MOE_SCORE_FUNCTIONS
from megatron_lite.config.optimizer_checks import MUON_COEFFICIENTS, MUON_SCALE_MODES, MUON_TP_MODES, OPTIMIZERS
from megatron_lite.config.parallel_config import (
    CP_COMM_TYPES,
    DATA_PARALLEL_MODES,
    SCHEDULES,
    SHARDING_STRATEGIES,
    ParallelConfig,
    interleaved_microbatches_problem,
)
from megatron_lite.config.rope_scaling import ROPE_SCALING_TYPES
from megatron_lite.config.schedule import LR_DECAY_STYLES, LR_WSD_DECAY_STYLES
from megatron_lite.config.train_config import (
    CKPT_FORMATS,
    EXIT_SIGNALS,
    TrainConfig,
)

__all__ = ["CKPT_FORMATS", "CP_COMM_TYPES", "DATA_PARALLEL_MODES", "EXIT_SIGNALS", "FAMILIES", "LR_DECAY_STYLES",
           "LR_WSD_DECAY_STYLES", "MOE_DISPATCHERS", "MOE_LOAD_BALANCING", "MOE_SCORE_FUNCTIONS", "MUON_COEFFICIENTS",
           "MUON_SCALE_MODES", "MUON_TP_MODES", "OPTIMIZERS", "RECOMPUTE_GRANULARITIES", "RECOMPUTE_METHODS",
           "RECOMPUTE_MODULES", "ROPE_SCALING_TYPES", "SCHEDULES", "SHARDING_STRATEGIES", "Config", "ConfigError",
           "ModelConfig", "ParallelConfig", "TrainConfig", "TrainingError", "field_docs"]


@dataclass(frozen=True)
class Config:
    """Everything one run needs; `arguments.parse_args` builds it.

    Immutable, and validated as a whole whenever one is made: a change (a value adopted from a
    checkpoint, the vocabulary taken from the tokenizer, a layout applied) is a new Config made
    by `updated`, which passes every check again, the cross-checks between the three parts too.
    """
    model: ModelConfig = field(default_factory=ModelConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    model_flags_given: tuple[str, ...] | None = None
    """ModelConfig fields the user set (a flag, or the --model preset named on the command line);
    None for a Config built in code, where every field counts as set. On --load, a field that is
    set must match the checkpoint and one that is not is taken from it."""

    def __post_init__(self) -> None:
        self.validate()

    def updated(self, *, model: dict | None = None, parallel: dict | None = None, train: dict | None = None,
                **fields: object) -> Config:
        """This Config with the given fields of its parts (and of its own) changed, validated whole."""
        return dataclasses.replace(self, model=dataclasses.replace(self.model, **(model or {})),
                                   parallel=dataclasses.replace(self.parallel, **(parallel or {})),
                                   train=dataclasses.replace(self.train, **(train or {})), **fields)

    def validate(self) -> None:
        self.model.validate()
        self.parallel.validate()
        self.parallel.validate_model(self.model)
        self.train.validate(self.parallel.data_parallel_size)
        require(not (self.train.compile and self.parallel.sharding == "optim_grads_params"),
                "--compile with --data-parallel-sharding-strategy=optim_grads_params is not supported (the "
                "parameters are gathered and freed around each layer, outside what a compiled layer may assume)")
        self._validate_parameter_server()
        require(self.parallel.schedule not in ("zb-h1", "zbv") or self.parallel.sharding in ("no_shard", "optim"),
                f"--pipeline-schedule={self.parallel.schedule} with "
                f"--data-parallel-sharding-strategy={self.parallel.sharding} is not "
                "supported yet (ZeRO-2/3 reduce-scatter per backward, not yet per W pass); use "
                "--use-distributed-optimizer (ZeRO-1) or another schedule")
        par = self.parallel
        for batch in self.train.global_batch_sizes:  # --rampup-batch-size's, each must suit the schedule
            m = self.train.num_microbatches(par.data_parallel_size, batch)
            if par.schedule == "interleaved":
                problem = interleaved_microbatches_problem(par.pipeline_model_parallel_size, m,
                                                           par.microbatch_group_size)
                require(problem is None, f"{problem}; {m} = global batch {batch} / (micro batch "
                                         f"{self.train.micro_batch_size} x dp {par.data_parallel_size})")
            if par.schedule == "zbv" and par.pipeline_model_parallel_size > 1:
                pp = par.pipeline_model_parallel_size
                require(m >= 2 * pp - 1, f"--pipeline-schedule=zbv needs at least 2 x pp - 1 = {2 * pp - 1} "
                                         f"microbatches to fill its V; it has {m} = global batch {batch} / (micro "
                                         f"batch {self.train.micro_batch_size} x dp {par.data_parallel_size})")

    def _validate_parameter_server(self) -> None:
        """What --data-parallel-mode parameter-server does not combine with, and why (its server
        averages one dense grad buffer over dp and holds the whole optimizer state)."""
        par = self.parallel
        if not par.parameter_server:
            return
        sharding = (f"--data-parallel-sharding-strategy={par.sharding}" if par.data_parallel_sharding_strategy
                    else "--use-distributed-optimizer")
        unsupported = [
            (par.sharded_optimizer, sharding, "the server holds the whole optimizer state, nothing is sharded"),
            (par.context_parallel_size > 1, f"--context-parallel-size={par.context_parallel_size}",
             "the server averages grads over dp only, not dp x cp"),
            (bool(self.model.num_experts), f"--num-experts={self.model.num_experts}",
             "expert grads are averaged over the expert-data-parallel group, which has no server"),
            (self.train.fp16, "--fp16", "loss scaling is not wired through the server; use --bf16"),
            (self.train.optimizer == "muon", "--optimizer muon", "Muon's tensor-parallel gathers are not wired "
                                                                 "through the server"),
        ]
        for given, what, why in unsupported:
            require(not given, f"--data-parallel-mode=parameter-server does not support {what} ({why}); drop it "
                               "or use --data-parallel-mode=all-reduce")


def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each dataclass field, read from the source, as one line (a long one is
    wrapped in the source)."""
    import ast
    import inspect
    import textwrap

    tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    body = tree.body[0].body
    docs = {}
    for node, nxt in zip(body, body[1:]):
        if isinstance(node, ast.AnnAssign) and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant):
            docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs
