"""Train a few steps under any layout and collect what parity tests compare with one device.

The same function runs in the test process (one device) and on every spawned rank; what it
returns is gathered to full tensors, so results compare name by name.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.distributed as dist

from megatron_lite import parallel_state
from megatron_lite.config import Config
from megatron_lite.tensor_parallel.utils import gather_full
from megatron_lite.training import (TrainingModel, rank_microbatches, set_seed, setup_model_and_optimizer,
                                   train_step)


class RandomTokens:
    """Sample i is a fixed random token sequence, whatever rank asks for it."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0) -> None:
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.RandomState((self.seed * 1_000_003 + index) % 2**32)
        return rng.randint(0, self.vocab_size, self.seq_length + 1).astype(np.int64)


def setup_rank(config: Config) -> TrainingModel:
    """This rank's groups (for config's layout), seed, and model and optimizer on CPU."""
    par = config.parallel
    parallel_state.initialize_model_parallel(par.tensor_model_parallel_size, par.pipeline_model_parallel_size,
                                             par.distributed_timeout_minutes)
    set_seed(config.train.seed)
    return setup_model_and_optimizer(config, torch.device("cpu"))


def run_steps(config: Config, steps: int) -> dict:
    """losses per step, and of the parameters this rank holds (full over tp, keyed by their global
    names): grads after step 1 and weights after the last step."""
    par = config.parallel
    device = torch.device("cpu")
    model = setup_rank(config)
    named = [(n, p) for chunk in model.chunks for n, p in chunk.named_parameters()]
    dataset = RandomTokens(config.model.vocab_size, config.model.seq_length)
    losses, grads = [], {}
    for iteration in range(1, steps + 1):
        batches = rank_microbatches(dataset, (iteration - 1) * config.train.global_batch_size, config, device)
        losses.append(train_step(model, batches, iteration, config, device)[0])
        if iteration == 1 and par.use_distributed_optimizer:
            for buf in model.grad_buffers:
                _gather_grad_shards(buf)
        if iteration == 1:
            grads = {n: gather_full(p, p.grad) for n, p in named}
    weights = {n: gather_full(p) for n, p in named}
    return {"losses": losses, "grads": grads, "weights": weights}


def _gather_grad_shards(buf) -> None:
    """The distributed optimizer leaves only this rank's shard of the grad buffer reduced and
    clipped; assemble the full grads from every rank's shard to compare them."""
    grid = parallel_state.get_grid()
    for bucket in buf.buckets:
        shards = list(buf.grad_data[bucket.start:bucket.end].chunk(grid.dp))
        dist.all_gather(shards, shards[grid.dp_rank].clone(), group=parallel_state.get_group("dp"))


def merge_ranks(results: list[dict]) -> dict:
    """One result from every rank's: rank 0's losses, and the union of the parameters the ranks hold.

    A parameter held by several ranks (replicated over dp or tp, or the tied embedding on the
    first and last stage) must be identical on all of them.
    """
    merged = {"losses": results[0]["losses"], "grads": {}, "weights": {}}
    for result in results:
        assert result["losses"] == merged["losses"]
        for kind in ("grads", "weights"):
            for name, tensor in result[kind].items():
                if name in merged[kind]:
                    torch.testing.assert_close(tensor, merged[kind][name], rtol=0, atol=1e-6)
                merged[kind][name] = tensor
    return merged


def max_differences(reference: dict, result: dict, vocab_size: int) -> dict[str, float]:
    """Largest relative loss difference and largest absolute grad / weight differences."""
    def worst(a: dict, b: dict) -> float:
        assert a.keys() == b.keys(), set(a) ^ set(b)
        # Vocabulary tables are padded differently per tp size; pad rows are not compared.
        return max((a[n][:vocab_size] - b[n][:vocab_size]).abs().max().item() for n in a)
    loss = max(abs(x - y) / abs(x) for x, y in zip(reference["losses"], result["losses"]))
    return {"loss": loss, "grad": worst(reference["grads"], result["grads"]),
            "weight": worst(reference["weights"], result["weights"])}
