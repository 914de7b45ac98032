"""Every valid layout of a model on N GPUs, ranked by predicted throughput among those that fit.

A layout is (tp, cp, pp, vpp, ep, dp, pipeline schedule, data-parallel sharding, recomputation,
micro batch; the schedules: 1F1B or ZB-H1 with one chunk per rank, interleaved or ZB-V with two); each
candidate is a Config that passes the same validation as pretrain_gpt.py (so the search never
proposes what the code refuses), estimated by planner/step_time.py. Sequence parallelism is on
whenever tp > 1 (it only saves memory and moves the same bytes), tp stays inside a node.
"""
from __future__ import annotations

import dataclasses
import itertools
from collections.abc import Iterator
from dataclasses import dataclass

from megatron_lite.config import SHARDING_STRATEGIES, Config, ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.planner.hardware import GPU
from megatron_lite.planner.step_time import StepEstimate, estimate

RECOMPUTE = {"none": {}, "selective": {"recompute_granularity": "selective"},
             "full": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1}}


@dataclass
class Candidate:
    config: Config
    estimate: StepEstimate

    @property
    def name(self) -> str:
        """The layout's name, micro batch and recomputation, e.g.
        tp8-pp4-dp16-vpp2-sp-distopt mbs1 recompute=selective."""
        recompute = self.config.model.recompute_granularity or "none"
        return f"{Layout.of(self.config.parallel).name} mbs{self.config.train.micro_batch_size} recompute={recompute}"


def _powers_of_two(limit: int) -> list[int]:
    return [2**i for i in range(limit.bit_length()) if 2**i <= limit]


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _schedules(pp: int) -> Iterator[tuple[int, str | None]]:
    """(vpp, schedule) of a pipeline of pp stages (None: the default, 1F1B or interleaved)."""
    if pp == 1:
        yield 1, None
        return
    yield from ((1, None), (1, "zb-h1"), (2, None), (2, "zbv"), (4, None))


def _grids(num_gpus: int, gpu: GPU, experts: int) -> Iterator[tuple[int, int, int, int, int, str | None, int]]:
    """(tp, cp, pp, dp, vpp, schedule, ep) whose product tp x cp x pp x dp is `num_gpus`, tp inside a node."""
    for tp in _powers_of_two(min(gpu.gpus_per_node, num_gpus)):
        for cp in _powers_of_two(num_gpus // tp):
            for pp in _divisors(num_gpus // (tp * cp)):
                dp = num_gpus // (tp * cp * pp)
                for (vpp, schedule), ep in itertools.product(_schedules(pp), _divisors(experts)):
                    if ep <= tp * cp * dp:
                        yield tp, cp, pp, dp, vpp, schedule, ep


def candidates(base: Config, num_gpus: int, gpu: GPU) -> Iterator[Config]:
    """Every layout of `base`'s model and batch on `num_gpus` GPUs that validates."""
    model, train = base.model, base.train
    choices = itertools.product(_grids(num_gpus, gpu, model.num_experts or 1), (1, 2, 4, 8), SHARDING_STRATEGIES,
                                RECOMPUTE.values())
    for (tp, cp, pp, dp, vpp, schedule, ep), mbs, sharding, recompute in choices:
        parallel = dataclasses.replace(
            base.parallel, tensor_model_parallel_size=tp, context_parallel_size=cp, pipeline_model_parallel_size=pp,
            data_parallel_size=dp, virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None,
            pipeline_schedule=schedule, expert_model_parallel_size=ep, sequence_parallel=tp > 1,
            data_parallel_sharding_strategy=sharding, use_distributed_optimizer=sharding != "no_shard")
        try:  # a Config validates as it is made
            yield Config(model=dataclasses.replace(model, **{**_no_recompute(), **recompute}), parallel=parallel,
                         train=dataclasses.replace(train, micro_batch_size=mbs))
        except (ConfigError, ValueError):
            continue


def _no_recompute() -> dict:
    return {"recompute_granularity": None, "recompute_method": None, "recompute_num_layers": None,
            "recompute_modules": None}


def plan(base: Config, num_gpus: int, gpu: GPU, top: int = 5,
         mean_document_length: float | None = None) -> tuple[list[Candidate], int]:
    """The `top` fitting layouts by predicted tokens/s, and how many valid layouts there were
    (`mean_document_length`: as in estimate)."""
    ranked, count = [], 0
    for config in candidates(base, num_gpus, gpu):
        count += 1
        result = estimate(config, gpu, mean_document_length=mean_document_length)
        if result.fits:
            ranked.append(Candidate(config, result))
    ranked.sort(key=lambda c: -c.estimate.tokens_per_s)
    return ranked[:top], count
