"""The order in which data-parallel ranks consume a dataset's samples, and their batches.

The loader's only state is the number of samples consumed so far: sample k of a dataset
(gpt_dataset.py) is always the same, so a resumed run continues exactly where the saved
one stopped.

With --num-workers N > 0, as Megatron does, worker processes of a torch DataLoader read the
coming microbatches' samples ahead of the step (`PrefetchedSamples`); the indices, and so the
batches, are those read in process.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator

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


def read_samples(dataset, indices: list[int]) -> np.ndarray:
    """The samples at `indices`, stacked [len(indices), seq + 1]."""
    return np.stack([dataset[i] for i in indices])


class PrefetchedSamples:
    """`read_samples` of each microbatch in `schedule` (its index lists, in the order the run will ask
    for them), read ahead by `num_workers` DataLoader worker processes, two microbatches each."""

    def __init__(self, dataset, schedule: Iterable[list[int]], num_workers: int) -> None:
        loader = torch.utils.data.DataLoader(_Indexed(dataset), batch_sampler=schedule, num_workers=num_workers,
                                             collate_fn=_stack)
        self.batches = iter(loader)

    def __call__(self, dataset, indices: list[int]) -> np.ndarray:
        read, samples = next(self.batches)
        if read != indices:  # the schedule must be the run's order: a mismatch is a bug, never a wrong batch
            raise RuntimeError(f"prefetched samples {read[:4]}... where the run reads {indices[:4]}...")
        return samples


class _Indexed(torch.utils.data.Dataset):
    """A dataset as a DataLoader reads it: each item (index, sample)."""

    def __init__(self, dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[int, np.ndarray]:
        return index, self.dataset[index]


def _stack(items: list[tuple[int, np.ndarray]]) -> tuple[list[int], np.ndarray]:
    return [index for index, _ in items], np.stack([sample for _, sample in items])


def collate(dataset, indices: list[int], device: torch.device, documents: DocumentMasking | None = None,
            read=read_samples) -> dict[str, torch.Tensor]:
    """tokens = sample[:-1], labels = sample[1:], and a loss mask of ones; with `documents`, what
    its flags add (documents.py). `read`: read_samples, or a PrefetchedSamples."""
    samples = torch.from_numpy(read(dataset, indices))
    tokens, labels = samples[:, :-1].contiguous(), samples[:, 1:].contiguous()
    batch = {"tokens": tokens.to(device), "labels": labels.to(device),
             "loss_mask": torch.ones(labels.shape, dtype=torch.float32, device=device)}
    return batch if documents is None else documents.apply(batch)


def global_batch(dataset, consumed_samples: int, micro_batch_size: int, global_batch_size: int,
                 device: torch.device, dp_rank: int = 0, dp_size: int = 1,
                 documents: DocumentMasking | None = None, read=read_samples) -> Iterator[dict[str, torch.Tensor]]:
    """This rank's microbatches of the next global batch."""
    for indices in microbatch_indices(consumed_samples, micro_batch_size, global_batch_size, dp_rank, dp_size):
        yield collate(dataset, indices, device, documents, read)
