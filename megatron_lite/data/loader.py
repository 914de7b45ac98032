"""The order in which data-parallel ranks consume a dataset's samples, and their batches.

The loader's only state is the number of samples consumed so far: sample k of a dataset
(gpt_dataset.py) is always the same, so a resumed run continues exactly where the saved
one stopped.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from megatron_lite.data.documents import DocumentMasking


def microbatch_indices(consumed_samples: int, micro_batch_size: int, global_batch_size: int,
                       dp_rank: int = 0, dp_size: int = 1) -> list[list[int]]:
    """Sample indices of each of this rank's microbatches for the global batch starting at consumed_samples.

    As in Megatron's pretraining sampler, the global batch is cut into chunks of
    micro_batch_size * dp_size consecutive samples and rank r takes the r-th slice of each
    chunk; the union over ranks is exactly the single-device global batch.
    """
    chunk = micro_batch_size * dp_size
    return [list(range(start + dp_rank * micro_batch_size, start + (dp_rank + 1) * micro_batch_size))
            for start in range(consumed_samples, consumed_samples + global_batch_size, chunk)]


def collate(dataset, indices: list[int], device: torch.device,
            documents: DocumentMasking | None = None) -> dict[str, torch.Tensor]:
    """tokens = sample[:-1], labels = sample[1:], and a loss mask of ones; with `documents`, what
    its flags add (documents.py)."""
    samples = torch.from_numpy(np.stack([dataset[i] for i in indices]))
    tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
    batch = {"tokens": tokens.to(device), "labels": labels.to(device),
             "loss_mask": torch.ones(labels.shape, dtype=torch.float32, device=device)}
    return batch if documents is None else documents.apply(batch)


def global_batch(dataset, consumed_samples: int, micro_batch_size: int, global_batch_size: int,
                 device: torch.device, dp_rank: int = 0, dp_size: int = 1,
                 documents: DocumentMasking | None = None) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's microbatches of the next global batch."""
    for indices in microbatch_indices(consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp_size):
        yield collate(dataset, indices, device, documents)
