"""Where the logged metrics go besides the log line and metrics.jsonl: TensorBoard event files
(--tensorboard-dir) and Weights & Biases (--wandb-project).

Both packages are optional, so nothing here imports them until a writer is opened, and
config/packages.py refuses a flag whose package is missing before any work starts.
MetricsLogger (metrics.py) stays the one place records pass through: it turns each record into
{tag: value} with `train_scalars` / `validation_scalars` and hands that to every writer, so
TensorBoard and wandb always receive the same numbers under the same tags.
"""
from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from megatron_lite.config import Config

# metrics.jsonl field -> tag. Megatron-LM's tag where it has one ("throughput" is its name for
# TFLOP/s/GPU), so dashboards built for Megatron runs read these too.
TRAIN_TAGS = {
    "lm_loss": "lm loss",
    "lr": "learning-rate",
    "grad_norm": "grad-norm",
    "loss_scale": "loss-scale",
    "skipped_iterations": "skipped-iterations",
    "tokens_per_s": "tokens-per-second",
    "tflops_per_gpu": "throughput",
    "mfu": "mfu",
    "peak_memory_gb": "peak-memory-gb",
    "consumed_samples": "consumed-samples",
    "global_batch_size": "batch-size",
    "load_balancing_loss": "load_balancing_loss",
    "expert_load_max_over_mean": "expert_load_max_over_mean",
    "params_norm": "params-norm",
    "num_zeros": "num-zeros",
}

# The flag that opens a writer -> (the module its writer imports, how to install it).


def train_scalars(record: dict) -> dict[str, float]:
    """The tags of one training record of MetricsLogger.training. Fields a run does not have
    (mfu without a known peak, the MoE fields of a dense model) are left out."""
    scalars = {tag: float(record[key]) for key, tag in TRAIN_TAGS.items() if record.get(key) is not None}
    scalars["iteration-time"] = record["elapsed_ms"] / 1e3  # seconds, as Megatron logs it
    scalars.update(record.get("timers", {}))  # --log-timers-to-tensorboard: Megatron's "<phase>-time", seconds
    for depth, loss in enumerate(record.get("mtp_losses", ()), 1):
        scalars[f"mtp_{depth} loss"] = float(loss)
    # One scalar per expert rather than a histogram: a histogram hides which expert starves.
    for layer, loads in enumerate(record.get("tokens_per_expert", [])):
        for expert, tokens in enumerate(loads):
            scalars[f"moe/tokens_per_expert_layer_{layer}/expert_{expert}"] = float(tokens)
    return scalars


def validation_scalars(loss: float, ppl: float) -> dict[str, float]:
    return {"lm loss validation": loss, "lm loss validation ppl": ppl}


class ScalarWriter(Protocol):
    description: str  # where the scalars go, for the run's opening lines

    def write(self, scalars: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardWriter:
    def __init__(self, log_dir: str) -> None:
        from torch.utils.tensorboard import SummaryWriter  # optional: imported only when asked for

        self._writer = SummaryWriter(log_dir=log_dir)
        self.description = f"TensorBoard events in {log_dir}"

    def write(self, scalars: dict[str, float], step: int) -> None:
        for tag, value in scalars.items():
            self._writer.add_scalar(tag, value, step)

    def close(self) -> None:
        self._writer.close()  # flushes the queued events to the file


class WandbWriter:
    def __init__(self, config: Config) -> None:
        import wandb  # optional: imported only when asked for

        cfg = config.train
        # Megatron's default: beside the checkpoints; without --save, wandb's own ./wandb.
        save_dir = cfg.wandb_save_dir or (os.path.join(cfg.save, "wandb") if cfg.save else None)
        if save_dir is not None:
            os.makedirs(save_dir, exist_ok=True)
        # No mode argument: wandb.init reads WANDB_MODE itself (offline keeps the run in save_dir
        # for a later `wandb sync`, disabled logs nothing), and its settings file stays respected.
        self._run = wandb.init(project=cfg.wandb_project, name=cfg.wandb_exp_name, dir=save_dir,
                               config=dataclasses.asdict(config))
        self.description = f"wandb project {cfg.wandb_project}" + (f", run {cfg.wandb_exp_name}"
                                                                   if cfg.wandb_exp_name else "")

    def write(self, scalars: dict[str, float], step: int) -> None:
        self._run.log(scalars, step=step)

    def close(self) -> None:
        self._run.finish()


def open_writers(config: Config) -> list[ScalarWriter]:
    """The writers the flags ask for (none without --tensorboard-dir and --wandb-project)."""
    cfg = config.train
    writers: list[ScalarWriter] = []
    if cfg.tensorboard_dir is not None:
        writers.append(TensorBoardWriter(cfg.tensorboard_dir))
    if cfg.wandb_project is not None:
        writers.append(WandbWriter(config))
    return writers
