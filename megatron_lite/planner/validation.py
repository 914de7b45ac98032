"""The published runs (planner/published.py) rebuilt as our configs and predicted, and the best
published MFU of a model's size class on a GPU, which a prediction above is flagged against.

A published row is rebuilt as a Config that validates like a command line: each is a run this
trainer accepts (torchtitan's FSDP with selective checkpointing is ZeRO-3 with recomputation;
the replay runs after the layer's backward gather, so it gathers nothing more).
"""
from __future__ import annotations

import bisect
import functools
from dataclasses import dataclass

from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.planner.hardware import GPU, GPUS
from megatron_lite.planner.parameters import count_parameters
from megatron_lite.planner.published import PUBLISHED, PUBLISHED_MFU_FACTS, PublishedRun
from megatron_lite.planner.step_time import StepEstimate, estimate

PICOTRON_PEAK = 989.5e12  # the peak picotron's get_mfu divides by (picotron/utils.py)
SIZE_CLASSES = (3e9, 30e9, 300e9)  # parameters: below 3B, 3-30B, 30-300B, 300B and more
CLASS_NAMES = ("< 3B", "3B-30B", "30B-300B", ">= 300B")


def published_config(run: PublishedRun) -> Config:
    """The run of a published row as our Config (bf16, on GPUs)."""
    layout = dict(run.layout)
    model_parallel = (layout.get("tensor_model_parallel_size", 1) * layout.get("pipeline_model_parallel_size", 1)
                      * layout.get("context_parallel_size", 1))
    return Config(model=ModelConfig(**run.model, **run.recompute),
                  parallel=ParallelConfig(**layout, data_parallel_size=run.gpus // model_parallel),
                  train=TrainConfig(micro_batch_size=run.micro_batch, global_batch_size=run.global_batch,
                                    bf16=True, device="cuda"))


def six_n_flops(model: ModelConfig) -> float:
    """FLOPs per token by picotron's formula: 6 per parameter, 12·L·h·s for attention."""
    return 6 * count_parameters(model) + 12 * model.num_layers * model.hidden_size * model.seq_length


def predicted_value(run: PublishedRun, model: ModelConfig, est: StepEstimate) -> float:
    """The prediction `est` for the row's `model`, in the row's own metric."""
    if run.metric == "tflops":
        return est.hardware_tflops
    if run.metric == "tokens":
        return est.tokens_per_s / run.gpus
    if run.mfu_formula == "6N":
        return 100 * est.tokens_per_s / run.gpus * six_n_flops(model) / PICOTRON_PEAK
    return 100 * est.mfu


def published_mfu(run: PublishedRun) -> float:
    """The row's measurement as MFU in % by flops.py's formula over its GPU's datasheet peak."""
    config = published_config(run)
    model, tokens = config.model, config.train.global_batch_size * config.model.seq_length
    per_token = flops_per_step(model, config.train.global_batch_size) / tokens
    peak = GPUS[run.gpu].peak_tflops * 1e12
    if run.metric == "mfu" and run.mfu_formula == "megatron":
        return run.value
    if run.metric == "mfu":
        tokens_per_gpu = run.value / 100 * PICOTRON_PEAK / six_n_flops(model)
    elif run.metric == "tokens":
        tokens_per_gpu = run.value
    else:  # hardware TFLOP/s: the model's FLOPs are their share without the replayed forward
        est = estimate(config, GPUS[run.gpu], run.software)
        tokens_per_gpu = run.value / est.hardware_tflops * est.tokens_per_s / run.gpus
    return 100 * tokens_per_gpu * per_token / peak


def validate() -> list[dict]:
    """Each published row beside the planner's prediction for it."""
    rows = []
    for run in PUBLISHED:
        config = published_config(run)
        predicted = predicted_value(run, config.model, estimate(config, GPUS[run.gpu], run.software))
        par = config.parallel
        rows.append({"source": run.source, "model": run.label, "gpu": run.gpu, "gpus": run.gpus,
                     "tp": par.tensor_model_parallel_size, "pp": par.pipeline_model_parallel_size,
                     "dp": par.data_parallel_size, "sharding": par.sharding, "software": run.software.name,
                     "metric": {"tflops": "TFLOP/s per GPU", "mfu": "MFU %", "tokens": "tokens/s per GPU"}[run.metric],
                     "published": run.value, "predicted": predicted, "error": predicted / run.value - 1,
                     "fitted": run.fitted})
    return rows


@dataclass(frozen=True)
class Ceiling:
    mfu: float  # %
    size_class: str
    label: str  # the run that measured it
    source: str


def size_class(parameters: float) -> int:
    """The index of the size class (SIZE_CLASSES, CLASS_NAMES) of a model of `parameters`."""
    return bisect.bisect_right(SIZE_CLASSES, parameters)


@functools.cache
def _ceilings() -> dict[tuple[str, int], Ceiling]:
    """The best published MFU per (architecture, size class)."""
    best: dict[tuple[str, int], Ceiling] = {}
    facts = [(GPUS[run.gpu].architecture, count_parameters(published_config(run).model), published_mfu(run),
              run.label, run.source) for run in PUBLISHED]
    facts += [(GPUS[gpu].architecture, params, mfu, label, source) for gpu, params, mfu, label, source
              in PUBLISHED_MFU_FACTS]
    for arch, params, mfu, label, source in facts:
        key = (arch, size_class(params))
        if key not in best or mfu > best[key].mfu:
            best[key] = Ceiling(mfu, CLASS_NAMES[key[1]], label, source)
    return best


def mfu_ceiling(gpu: GPU, parameters: float) -> Ceiling | None:
    """The best published MFU for a model of `parameters` on `gpu`'s architecture: of its size
    class, or (no row in that class) of any size; None where nothing was published for the GPU."""
    own = _ceilings().get((gpu.architecture, size_class(parameters)))
    if own is not None:
        return own
    others = [c for (arch, _), c in _ceilings().items() if arch == gpu.architecture]
    return max(others, key=lambda c: c.mfu, default=None)
