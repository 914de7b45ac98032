"""Published training throughputs the planner is checked against (tools/plan_parallelism.py
--validate), each row with the layout and batch its paper states.

Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
Megatron-LM", Table 1 (weak scaling, GPT, vocabulary 51,200, sequence 2048, A100 80GB on
Selene, mixed precision, full activation recomputation): achieved TFLOP/s per GPU counting the
recomputed forward (their 96·B·s·l·h²·(1 + s/6h + V/16lh)). Not stated per row, so assumed
here: micro batch 1 and the plain 1F1B schedule.

Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
Table 3 (A100, tensor + sequence parallelism, selective recomputation, data-parallel size 1):
model FLOPs utilisation. Assumed: micro batch 1, plain 1F1B.

Both ran Megatron's 2021-22 kernels: attention materialised the s x s scores (fused masked
softmax, no flash attention), so the planner models their attention as "unfused".
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PublishedRun:
    source: str
    label: str
    heads: int
    hidden: int
    layers: int
    tp: int
    pp: int
    gpus: int
    global_batch: int
    value: float  # achieved TFLOP/s per GPU (metric "tflops") or MFU in % (metric "mfu")
    metric: str
    recompute: str  # "full" or "selective"
    sequence_parallel: bool
    gpu: str = "A100"
    seq_length: int = 2048
    vocab_size: int = 51200


NARAYANAN_2021 = "Narayanan et al. 2021, Table 1"
KORTHIKANTI_2022 = "Korthikanti et al. 2022, Table 3"

PUBLISHED = [
    *(PublishedRun(NARAYANAN_2021, label, heads, hidden, layers, tp, pp, gpus, batch, tflops, "tflops", "full", False)
      for label, heads, hidden, layers, tp, pp, gpus, batch, tflops in (
          ("1.7B", 24, 2304, 24, 1, 1, 32, 512, 137),
          ("3.6B", 32, 3072, 30, 2, 1, 64, 512, 138),
          ("7.5B", 32, 4096, 36, 4, 1, 128, 512, 142),
          ("18.4B", 48, 6144, 40, 8, 1, 256, 1024, 135),
          ("39.1B", 64, 8192, 48, 8, 2, 512, 1536, 138),
          ("76.1B", 80, 10240, 60, 8, 4, 1024, 1792, 140),
          ("145.6B", 96, 12288, 80, 8, 8, 1536, 2304, 148),
          ("310.1B", 128, 16384, 96, 8, 16, 1920, 2160, 155),
          ("529.6B", 128, 20480, 105, 8, 35, 2520, 2520, 163),
          ("1008.0B", 160, 25600, 128, 8, 64, 3072, 3072, 163))),
    *(PublishedRun(KORTHIKANTI_2022, label, heads, hidden, layers, tp, pp, gpus, batch, mfu, "mfu", "selective", True)
      for label, heads, hidden, layers, tp, pp, gpus, batch, mfu in (
          ("22B", 64, 6144, 48, 8, 1, 8, 4, 41.5),
          ("175B", 96, 12288, 96, 8, 8, 64, 64, 51.4),
          ("530B", 128, 20480, 105, 8, 35, 280, 280, 56.0),
          ("1T", 160, 25600, 128, 8, 64, 512, 512, 56.3))),
]
