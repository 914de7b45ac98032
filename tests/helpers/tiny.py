"""Tiny configurations shared by the tests (hidden 32-64, 2 layers, seq 16-32), as Configs and as flags."""
from __future__ import annotations

from megatron_lite.config import Config, ModelConfig, ParallelConfig, TrainConfig


def tiny_model(family: str = "llama", **overrides) -> ModelConfig:
    base = dict(family=family, num_layers=2, hidden_size=32, num_attention_heads=4,
                num_query_groups=2 if family == "llama" else 4, seq_length=16, vocab_size=258,
                make_vocab_size_divisible_by=8)
    base.update(overrides)
    return ModelConfig(**base)


def tiny_config(family: str = "llama", model: dict | None = None, **train) -> Config:
    base = dict(micro_batch_size=2, global_batch_size=4, train_iters=3, lr=1e-3, min_lr=1e-4,
                lr_warmup_iters=1, log_interval=1, eval_interval=0, device="cpu")
    base.update(train)
    return Config(model=tiny_model(family, **(model or {})), parallel=ParallelConfig(), train=TrainConfig(**base))


# The tiny shape as pretrain_gpt.py flags (one microbatch per step), for runs of the CLI in process.
TINY_FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
              "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "2", "--device", "cpu"]
