"""The loader over a GPTDataset: data-parallel ranks split each global batch, and a resumed run
continues with exactly the batches the interrupted one would have read next."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from megatron_lite.data.gpt_dataset import build_train_valid_test_datasets
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder
from megatron_lite.data.loader import global_batch

SEQ, MICRO, GLOBAL, STEPS = 8, 2, 16, 6
CPU = torch.device("cpu")


@pytest.fixture
def prefix(tmp_path) -> str:
    """A corpus of 100 documents of random length and random tokens."""
    rng = np.random.default_rng(0)
    prefix = str(tmp_path / "corpus_text_document")
    builder = IndexedDatasetBuilder(prefix + ".bin", np.uint16)
    for length in rng.integers(1, 50, 100):
        builder.add_document(rng.integers(0, 1000, length))
    builder.finalize(prefix + ".idx")
    return prefix


def train_dataset(prefix: str, cache_dir: str):
    train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, 1234, (STEPS * GLOBAL, 0, 0), cache_dir)
    return train


def rank_batches(dataset, consumed: int, dp_rank: int = 0, dp_size: int = 1) -> list[torch.Tensor]:
    """The tokens of each of a rank's microbatches of the global batch starting at `consumed`."""
    return [b["tokens"] for b in global_batch(dataset, consumed, MICRO, GLOBAL, CPU, dp_rank, dp_size)]


@pytest.mark.parametrize("dp_size", [2, 4, 8])
def test_union_over_data_parallel_ranks_is_the_single_rank_batch(prefix, tmp_path, dp_size):
    dataset = train_dataset(prefix, str(tmp_path / "cache"))
    for step in range(STEPS):
        single = torch.cat(rank_batches(dataset, step * GLOBAL))
        per_rank = [rank_batches(dataset, step * GLOBAL, rank, dp_size) for rank in range(dp_size)]
        # Microbatch j of every rank, in rank order, is the j-th chunk of the single-rank batch.
        union = torch.cat([per_rank[rank][j] for j in range(len(per_rank[0])) for rank in range(dp_size)])
        torch.testing.assert_close(union, single, rtol=0, atol=0)
    assert len(torch.cat(rank_batches(dataset, 0)).unique(dim=0)) == GLOBAL  # distinct samples, not one repeated


def test_resume_from_consumed_samples_gives_the_same_next_batches(prefix, tmp_path):
    dp_size, stop = 2, 3
    straight = train_dataset(prefix, str(tmp_path / "cache"))
    expected = [rank_batches(straight, step * GLOBAL, rank, dp_size)
                for step in range(STEPS) for rank in range(dp_size)]
    # The resumed run rebuilds its indices from the seed (another cache), and its only state is
    # the number of samples the interrupted run consumed.
    resumed = train_dataset(prefix, str(tmp_path / "other_cache"))
    consumed = stop * GLOBAL
    got = [rank_batches(resumed, consumed + step * GLOBAL, rank, dp_size)
           for step in range(STEPS - stop) for rank in range(dp_size)]
    for want, have in zip(expected[stop * dp_size:], got, strict=True):
        torch.testing.assert_close(torch.stack(have), torch.stack(want), rtol=0, atol=0)
