"""Published training throughputs the planner is checked against (tools/plan_parallelism.py
--validate, planner/validation.py), each row with its source, the layout and batch it states,
and what had to be assumed where it does not.

A100 (A100 80GB SXM, Selene; Megatron-LM of 2021-22, whose attention materialised the s x s
scores for a fused masked softmax, no flash attention):
- Narayanan et al. 2021, "Efficient Large-Scale Language Model Training on GPU Clusters Using
  Megatron-LM", Table 1 (weak scaling, GPT, vocabulary 51,200, sequence 2048, full activation
  recomputation): achieved TFLOP/s per GPU counting the recomputed forward (their
  96·B·s·l·h²·(1 + s/6h + V/16lh)). Assumed: micro batch 1, plain 1F1B.
- Korthikanti et al. 2022, "Reducing Activation Recomputation in Large Transformer Models",
  Table 3 (tensor + sequence parallelism, selective recomputation, data-parallel size 1): model
  FLOPs utilisation. Assumed: micro batch 1, plain 1F1B.

H100, other frameworks (what a well-implemented framework achieves; each row is predicted with
the code that ran it, planner/software.py):
- torchtitan: pytorch/torchtitan, benchmarks/llama3_h100_202412_torchtitan.md, Tables 1 and 3:
  Llama 3.1 8B, FSDP (ZeRO-3), bf16, local batch 2, selective activation checkpointing, on
  8 and 128 H100s of 96 GB HBM2e at a 500 W limit (planner/hardware.py: H100-HBM2E), tokens/s
  per GPU without and with torch.compile. Its sequence is 8192 (train_configs/llama3_8b.toml
  at the benchmark's commit 9dec370), its shape that of torchtitan/models/llama/__init__.py
  ("8B": dim 4096, 32 layers, 32 heads, 8 kv heads, FFN 14336 after its multiplier), its
  vocabulary Llama 3's 128,256. Its selective checkpointing is its op policy (every other matmul
  and every op but attention recomputed: torchtitan/parallelisms/parallelize_llama.py's
  _save_list), which software.py's TORCHTITAN models.
- picotron: huggingface/picotron, README.md: "38% MFU on a LLaMA-2-7B model using 64 H100 GPUs
  and nearly 50% MFU on the SmolLM-1.7B model with 8 H100 GPUs", MFU by its
  picotron/utils.py: get_mfu (6·N + 12·L·h·s FLOPs per token over 989.5 TFLOPS). Its layouts
  are not stated; assumed: its README's own commands, sequence 1024, micro batch 4, 32
  gradient-accumulation steps; SmolLM-1.7B on dp 8 (the "DP=8" command), Llama-2-7B on tp 2,
  pp 2 (1F1B) and dp 16 (the "3D Parallelism" command's tp and pp on 64 GPUs). Shapes:
  Llama-2-7B as transformers' LlamaConfig defaults (huggingface/transformers,
  src/transformers/models/llama/configuration_llama.py), SmolLM-1.7B as huggingface/smollm,
  text/pretraining/smollm1/config_smollm1_1B.yaml (24 layers, hidden 2048, FFN 8192, 32 heads,
  vocabulary 49,152, tied).
- Megatron-Core: NVIDIA/Megatron-LM, README.md, strong scaling of "the standard GPT-3 model"
  (Korthikanti's 175B shape below, vocabulary 131,072, sequence 4096) at 1152 sequences per
  batch from 96 to 4608 H100s: MFU "from 47% to 42%". Its layout is not stated; assumed: NeMo's
  published GPT3-175B H100 layout (NVIDIA/NeMo, docs/source/performance/performance_summary.md:
  TP 4, PP 8, VP 6, MBS 1), the distributed optimizer and selective recomputation.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from megatron_lite.planner.software import (
    MEGATRON_2021,
    MEGATRON_CORE,
    PICOTRON,
    TORCHTITAN,
    TORCHTITAN_COMPILED,
    Software,
)


@dataclass(frozen=True)
class PublishedRun:
    source: str
    label: str
    model: dict  # ModelConfig fields
    layout: dict  # ParallelConfig fields (data_parallel_size from the GPUs)
    gpus: int
    micro_batch: int
    global_batch: int
    value: float
    metric: str  # "tflops": TFLOP/s per GPU, recomputation counted; "mfu": % of peak; "tokens": tokens/s per GPU
    software: Software
    gpu: str = "A100"  # planner/hardware.py's key
    mfu_formula: str = "megatron"  # "megatron" (flops.py) or "6N" (6·params + 12·L·h·s per token)
    fitted: bool = False  # the calibration was fitted on this row (docs/planner.md)
    recompute: dict = field(default_factory=dict)  # ModelConfig's recompute fields


NARAYANAN_2021 = "Narayanan et al. 2021, Table 1"
KORTHIKANTI_2022 = "Korthikanti et al. 2022, Table 3"
TORCHTITAN_FILE = "pytorch/torchtitan benchmarks/llama3_h100_202412_torchtitan.md"
PICOTRON_FILE = "huggingface/picotron README.md"
MEGATRON_FILE = "NVIDIA/Megatron-LM README.md"

FULL = {"recompute_granularity": "full", "recompute_method": "uniform"}
SELECTIVE = {"recompute_granularity": "selective"}
LLAMA31_8B = dict(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32, num_query_groups=8,
                  ffn_hidden_size=14336, vocab_size=128256, seq_length=8192)
LLAMA2_7B = dict(family="llama", num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008,
                 vocab_size=32000, seq_length=1024)
SMOLLM_1_7B = dict(family="llama", num_layers=24, hidden_size=2048, num_attention_heads=32, ffn_hidden_size=8192,
                   vocab_size=49152, seq_length=1024, untie_embeddings_and_output_weights=False)
GPT3_175B = dict(family="gpt2", num_layers=96, hidden_size=12288, num_attention_heads=96, vocab_size=131072,
                 seq_length=4096)


def _gpt(heads: int, hidden: int, layers: int) -> dict:
    return dict(family="gpt2", num_layers=layers, hidden_size=hidden, num_attention_heads=heads, vocab_size=51200,
                seq_length=2048)


PUBLISHED = [
    *(PublishedRun(NARAYANAN_2021, label, _gpt(heads, hidden, layers),
                   dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp), gpus, 1, batch, tflops,
                   "tflops", MEGATRON_2021, fitted=True, recompute=FULL)
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
    *(PublishedRun(KORTHIKANTI_2022, label, _gpt(heads, hidden, layers),
                   dict(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp, sequence_parallel=True), gpus,
                   1, batch, mfu, "mfu", MEGATRON_2021, fitted=True, recompute=SELECTIVE)
      for label, heads, hidden, layers, tp, pp, gpus, batch, mfu in (
          ("22B", 64, 6144, 48, 8, 1, 8, 4, 41.5),
          ("175B", 96, 12288, 96, 8, 8, 64, 64, 51.4),
          ("530B", 128, 20480, 105, 8, 35, 280, 280, 56.0),
          ("1T", 160, 25600, 128, 8, 64, 512, 512, 56.3))),
    *(PublishedRun(TORCHTITAN_FILE, f"Llama-3.1-8B{' compile' if software.fused_elementwise else ''}", LLAMA31_8B,
                   dict(data_parallel_sharding_strategy="optim_grads_params"), gpus, 2, 2 * gpus, tokens, "tokens",
                   software, gpu="H100-HBM2E", fitted=fitted, recompute=SELECTIVE)
      for gpus, software, tokens, fitted in (
          (8, TORCHTITAN, 5762, True),
          (8, TORCHTITAN_COMPILED, 6667, True),
          (128, TORCHTITAN, 5605, False),
          (128, TORCHTITAN_COMPILED, 6514, False))),
    PublishedRun(PICOTRON_FILE, "Llama-2-7B", LLAMA2_7B,
                 dict(tensor_model_parallel_size=2, pipeline_model_parallel_size=2), 64, 4, 16 * 4 * 32, 38, "mfu",
                 PICOTRON, gpu="H100", mfu_formula="6N"),
    PublishedRun(PICOTRON_FILE, "SmolLM-1.7B", SMOLLM_1_7B, {}, 8, 4, 8 * 4 * 32, 50, "mfu", PICOTRON, gpu="H100",
                 mfu_formula="6N", fitted=True),
    *(PublishedRun(MEGATRON_FILE, "GPT-3 175B", GPT3_175B,
                   dict(tensor_model_parallel_size=4, pipeline_model_parallel_size=8,
                        virtual_pipeline_model_parallel_size=6, sequence_parallel=True, use_distributed_optimizer=True,
                        overlap_param_gather=True), gpus, 1, 1152, mfu, "mfu", MEGATRON_CORE, gpu="H100",
                   fitted=fitted, recompute=SELECTIVE)
      for gpus, mfu, fitted in ((96, 47, True), (4608, 42, False))),
]

# MFU figures without a layout or shape in text (the model table is an image): they only bound
# what the planner may predict unflagged (validation.mfu_ceiling). (GPU, parameters, MFU %, what, source.)
PUBLISHED_MFU_FACTS = [
    ("H100", 2e9, 41, "Megatron-Core's smallest (2B) weak-scaling model", MEGATRON_FILE),
    ("H100", 462e9, 48, "Megatron-Core's largest (462B) weak-scaling model (47-48 %)", MEGATRON_FILE),
]
