"""The per-interval log line (Megatron's shape), its JSON twin in metrics.jsonl, and the same
records handed to the optional TensorBoard / wandb writers (metric_writers.py)."""
from __future__ import annotations

import json
import math
import resource
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from megatron_lite.training.metric_writers import ScalarWriter, train_scalars, validation_scalars


def peak_memory_gb(device: torch.device) -> float:
    """Peak allocated accelerator memory; on CPU the process's peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / 2**20 if sys.platform != "darwin" else kb / 2**30


class MetricsLogger:
    """Prints Megatron-shaped lines on the logging rank, appends records to metrics.jsonl and
    sends them to `writers`: the training records of iterations that are multiples of
    `writer_interval` (--tensorboard-log-interval), and every validation record."""

    def __init__(self, log_dir: str | None, enabled: bool = True, writers: Sequence[ScalarWriter] = (),
                 writer_interval: int = 1, log_throughput: bool = False) -> None:
        self.enabled, self.log_throughput = enabled, log_throughput
        self.path = Path(log_dir) / "metrics.jsonl" if log_dir and enabled else None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self.writers = list(writers) if enabled else []
        self.writer_interval = writer_interval

    def destinations(self) -> list[str]:
        """Where the records go besides stdout, for the run's opening lines."""
        return ([] if self.path is None else [f"appended to {self.path}"]) + [w.description for w in self.writers]

    def close(self) -> None:
        """Flush and close the writers (at the end of training, and when it fails)."""
        for writer in self.writers:
            writer.close()
        self.writers = []

    def _write(self, record: dict) -> None:
        if self.path is not None:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")

    def training(self, record: dict) -> None:
        """record holds iteration, train_iters, consumed_samples, elapsed_ms, lr, global_batch_size,
        lm_loss, loss_scale, grad_norm, skipped_iterations (--fp16 overflows in the interval),
        with --mtp-num-layers mtp_losses (each multi-token prediction module's loss, Megatron's "mtp_K loss"),
        tokens_per_s, tflops_per_gpu, mfu (None without a known peak), peak_memory_gb; with mixture-of-
        experts layers load_balancing_loss, expert_load_max_over_mean and tokens_per_expert (the
        last step's routed tokens per expert of each MoE layer on this stage); num_zeros and params_norm
        under --log-num-zeros-in-grad and --log-params-norm (the interval's last step's); timers under
        --log-timers-to-tensorboard ({"<phase>-time": seconds per step}, step_timers.py)."""
        if not self.enabled:
            return
        mfu = "n/a" if record["mfu"] is None else f"{100 * record['mfu']:.2f}%"
        # --log-throughput: Megatron's own field, where its log parsers look for it.
        throughput = (f" throughput per GPU (TFLOP/s/GPU): {record['tflops_per_gpu']:.1f} |" if self.log_throughput
                      else "")
        print(f" iteration {record['iteration']:8d}/{record['train_iters']:8d} |"
              f" consumed samples: {record['consumed_samples']:12d} |"
              f" elapsed time per iteration (ms): {record['elapsed_ms']:.1f} |"
              + throughput +
              f" learning rate: {record['lr']:.6E} |"
              f" global batch size: {record['global_batch_size']:5d} |"
              f" lm loss: {record['lm_loss']:.6E} |"
              + "".join(f" mtp_{k} loss: {loss:.6E} |" for k, loss in enumerate(record.get("mtp_losses", ()), 1)) +
              f" loss scale: {record['loss_scale']:.1f} |"
              f" grad norm: {record['grad_norm']:.3f} |"
              + ("" if "num_zeros" not in record else f" num zeros: {record['num_zeros']:d} |")
              + ("" if "params_norm" not in record else f" params norm: {record['params_norm']:.3f} |") +
              f" number of skipped iterations: {record['skipped_iterations']:3d} |"
              + ("" if "load_balancing_loss" not in record else
                 f" load balancing loss: {record['load_balancing_loss']:.6E} |"
                 f" expert load max/mean: {record['expert_load_max_over_mean']:.3f} |") +
              f" tokens/s: {record['tokens_per_s']:.0f} |"
              f" TFLOP/s/GPU: {record['tflops_per_gpu']:.3f} |"
              f" MFU: {mfu} |"
              f" peak memory (GB): {record['peak_memory_gb']:.3f} |", flush=True)
        self._write({"kind": "train", **record})
        if self.writers and record["iteration"] % self.writer_interval == 0:
            scalars = train_scalars(record)
            for writer in self.writers:
                writer.write(scalars, record["iteration"])

    def validation(self, iteration: int, loss: float) -> None:
        if not self.enabled:
            return
        ppl = math.exp(min(20.0, loss))
        print(f" validation loss at iteration {iteration} | lm loss value: {loss:.6E} |"
              f" lm loss PPL: {ppl:.6E} |", flush=True)
        self._write({"kind": "validation", "iteration": iteration, "lm_loss": loss, "lm_loss_ppl": ppl})
        for writer in self.writers:
            writer.write(validation_scalars(loss, ppl), iteration)
