"""Train, save and resume under any layout, for the checkpoint tests (spawned ranks or one process)."""
from __future__ import annotations

import torch

from helpers.parity import setup_rank
from helpers.tiny import tiny_config
from megatron_lite.checkpointing import load_checkpoint, save_checkpoint
from megatron_lite.config import Config
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.training.loop import rank_microbatches, train_step

GLOBAL_BATCH = 8


def layout_config(family: str = "llama", layout: Layout = Layout(), dropout: float = 0.0) -> Config:
    """4 layers with GQA (8 heads, 4 groups) so that tp 1, 2 and 4 and pp*vpp up to 4 all divide it."""
    config = tiny_config(family, model=dict(num_layers=4, num_attention_heads=8,
                                            num_query_groups=4 if family == "llama" else 8,
                                            hidden_dropout=dropout, attention_dropout=dropout),
                         micro_batch_size=1, global_batch_size=GLOBAL_BATCH, train_iters=6, clip_grad=0.5)
    config = config.updated(parallel={**layout.fields(), "ddp_bucket_size": 3000})  # several buckets
    return config


def train(config: Config, steps: int, load: str | None = None, save: str | None = None) -> list[float]:
    """Build this rank's model, resume from `load` if given, train `steps` steps, then save to `save` if given."""
    device = torch.device("cpu")
    model = setup_rank(config)
    iteration = load_checkpoint(load, model.chunks, model.optimizer, config)[0] if load else 0
    dataset = RandomTokens(config.model.vocab_size, config.model.seq_length)
    losses = []
    for _ in range(steps):
        iteration += 1
        batches = rank_microbatches(dataset, (iteration - 1) * GLOBAL_BATCH, config, device)
        losses.append(train_step(model, batches, iteration, config, device)[0])
    if save:
        save_checkpoint(save, iteration, iteration * GLOBAL_BATCH, model.chunks, model.optimizer, config)
    return losses


def train_jobs(jobs: list[tuple]) -> list[list[float]]:
    """Spawned worker: train(*job) for each job in turn (each job builds its own groups)."""
    return [train(*job) for job in jobs]
