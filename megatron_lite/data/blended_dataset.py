"""Several datasets mixed by weight, as `--data-path 0.7 a 0.3 b` asks."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def build_blending_indices(weights: Sequence[float], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(dataset_index, dataset_sample_index) for `size` samples, Megatron's greedy rule.

    Each step takes from the dataset furthest behind its share (largest weight * step -
    samples taken so far), so after any prefix of n samples every dataset has within one
    sample of weight * n: the ratios hold over short runs too, not just on average.
    """
    weights = [w / sum(weights) for w in weights]
    taken = [0] * len(weights)
    dataset_index = np.empty(size, dtype=np.int32)
    dataset_sample_index = np.empty(size, dtype=np.int64)
    for step in range(size):
        target = max(step, 1)  # Megatron's: at step 0 the errors are weighted as at step 1
        errors = [w * target - t for w, t in zip(weights, taken)]
        chosen = errors.index(max(errors))
        dataset_index[step] = chosen
        dataset_sample_index[step] = taken[chosen]
        taken[chosen] += 1
    return dataset_index, dataset_sample_index


class BlendedDataset:
    """`size` samples drawn from `datasets` in the proportions of `weights`."""

    def __init__(self, datasets: Sequence, weights: Sequence[float], size: int) -> None:
        if len(datasets) != len(weights):
            raise ValueError(f"{len(datasets)} datasets but {len(weights)} weights")
        self.datasets = list(datasets)
        self.dataset_index, self.dataset_sample_index = build_blending_indices(weights, size)
        needed = np.bincount(self.dataset_index, minlength=len(datasets))
        for dataset, count in zip(self.datasets, needed):
            if count > len(dataset):
                raise ValueError(f"the blend takes {count} samples from a dataset of {len(dataset)}")

    def __len__(self) -> int:
        return len(self.dataset_index)

    def __getitem__(self, idx: int) -> np.ndarray:
        return self.datasets[self.dataset_index[idx]][int(self.dataset_sample_index[idx])]
