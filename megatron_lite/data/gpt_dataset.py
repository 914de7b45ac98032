"""Megatron's GPT dataset: samples of seq_length + 1 tokens cut across documents, in a seeded order.

Three index arrays say where each sample comes from, all fixed by (documents,
seq_length, num_samples, seed):
- document_index: the split's documents, once per epoch, each epoch in its own shuffled
  order, for as many epochs as num_samples needs;
- sample_index: row i is (position in document_index, token offset) where sample i starts.
  Sample i is tokens [i * seq_length, (i + 1) * seq_length] of the documents laid end to
  end, so consecutive samples share one token: the last label of one is the first input
  of the next, and no token is lost as an input;
- shuffle_index: the order in which samples are served. When the last epoch is only
  partly used (under 80%), its samples are shuffled apart and served after the full
  epochs (Megatron's separate_final_epoch), so the samples a run consumes cover whole
  epochs evenly.
As in Megatron, a "document" here is a sequence of the IndexedDataset.
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable

import numpy as np

from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.indexed_dataset import IndexedDataset

# Bump when the index construction changes, so that old caches are not reused.
INDEX_FORMAT_VERSION = 1
# Megatron's threshold: a final epoch used less than this much is kept apart in the shuffle.
SEPARATE_FINAL_EPOCH_THRESHOLD = 0.80


def _num_epochs(tokens_per_epoch: int, seq_length: int, num_samples: int) -> int:
    # n samples read tokens [0, n * seq_length], so they need n * seq_length + 1 tokens.
    return max(1, -(-(num_samples * seq_length + 1) // tokens_per_epoch))


def _build_document_index(documents: np.ndarray, num_epochs: int, rng: np.random.Generator) -> np.ndarray:
    return np.concatenate([rng.permutation(documents) for _ in range(num_epochs)]).astype(np.int64)


def _build_sample_index(sizes: np.ndarray, seq_length: int, num_samples: int) -> np.ndarray:
    """(document position, offset) of the token at i * seq_length, for i = 0..num_samples.

    Row num_samples marks where the last sample ends. The search finds the first document
    that ends after a position, which steps over zero-length documents.
    """
    ends = np.cumsum(sizes, dtype=np.int64)
    positions = np.arange(num_samples + 1, dtype=np.int64) * seq_length
    documents = np.searchsorted(ends, positions, side="right")
    offsets = positions - (ends[documents] - sizes[documents])
    return np.stack([documents, offsets], axis=1)


def _build_shuffle_index(num_first: int, total: int, rng: np.random.Generator) -> np.ndarray:
    """A permutation of 0..total-1 that keeps 0..num_first-1 ahead of the rest."""
    return np.concatenate([rng.permutation(num_first), num_first + rng.permutation(total - num_first)])


def _build_indices(documents: np.ndarray, sizes: np.ndarray, seq_length: int, num_samples: int,
                   seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(document_index, sample_index, shuffle_index) for `documents` of `sizes` tokens."""
    tokens_per_epoch = int(sizes[documents].sum())
    num_epochs = _num_epochs(tokens_per_epoch, seq_length, num_samples)
    samples_per_epoch = (tokens_per_epoch - 1) // seq_length
    samples_before_final = ((num_epochs - 1) * tokens_per_epoch - 1) // seq_length
    final_epoch_used = num_samples - samples_before_final
    separate_final_epoch = (num_epochs > 1
                            and final_epoch_used < int(SEPARATE_FINAL_EPOCH_THRESHOLD * samples_per_epoch))
    rng = np.random.default_rng(seed)
    document_index = _build_document_index(documents, num_epochs, rng)
    total_samples = (num_epochs * tokens_per_epoch - 1) // seq_length
    sample_index = _build_sample_index(sizes[document_index], seq_length, total_samples)
    shuffle_index = _build_shuffle_index(samples_before_final if separate_final_epoch else total_samples,
                                         total_samples, rng)
    return document_index, sample_index, shuffle_index


def _save_atomically(path: str, array: np.ndarray) -> None:
    # Ranks building the same indices at once each write a whole file and rename it into
    # place; a reader never sees half of one.
    temporary = f"{path}.tmp{os.getpid()}"
    with open(temporary, "wb") as f:
        np.save(f, array)
    os.replace(temporary, path)


def _cached(stem: str, description: dict, build: Callable[[], tuple[np.ndarray, ...]]) -> list[np.ndarray]:
    """The index arrays saved under `stem`, or build() them and save them there."""
    paths = [f"{stem}-{name}.npy" for name in ("document_index", "sample_index", "shuffle_index")]
    if all(os.path.isfile(path) for path in paths):
        return [np.load(path, mmap_mode="r") for path in paths]
    arrays = build()
    try:
        os.makedirs(os.path.dirname(stem), exist_ok=True)
        with open(f"{stem}-description.json", "w") as f:  # for people: what the hash stands for
            json.dump(description, f, indent=2)
        for path, array in zip(paths, arrays):
            _save_atomically(path, array)
    except OSError as e:  # a read-only data folder: train anyway, rebuild next time
        warnings.warn(f"cannot cache dataset indices at {stem}: {e}", stacklevel=3)
    return list(arrays)


class GPTDataset:
    """Samples of seq_length + 1 int64 tokens from documents [start, end) of an IndexedDataset.

    The index arrays are cached as .npy in cache_dir (default: a `cache` folder beside the
    data) under a hash of everything they depend on, the document sizes included, so a
    changed corpus or setting never reuses a stale cache.
    """

    def __init__(self, indexed_dataset: IndexedDataset, split_name: str, document_range: tuple[int, int],
                 num_samples: int, seq_length: int, seed: int, cache_dir: str | None = None) -> None:
        self.indexed_dataset = indexed_dataset
        self.seq_length = seq_length
        start, end = document_range
        prefix = indexed_dataset.path_prefix
        sizes = indexed_dataset.sequence_lengths.astype(np.int64)
        tokens = int(sizes[start:end].sum())
        if tokens < seq_length + 1:
            raise ValueError(f"{prefix}: the {split_name} split has {tokens} tokens in {end - start} documents, "
                             f"fewer than one sample of seq_length+1 = {seq_length + 1} tokens")
        description = {
            "class": "GPTDataset", "format": INDEX_FORMAT_VERSION, "path_prefix": os.path.abspath(prefix),
            "split": split_name, "documents": [start, end], "num_samples": num_samples,
            "seq_length": seq_length, "seed": seed,
            "sizes_md5": hashlib.md5(indexed_dataset.sequence_lengths[start:end].tobytes()).hexdigest(),
        }
        key = hashlib.md5(json.dumps(description, sort_keys=True).encode()).hexdigest()
        cache_dir = cache_dir or os.path.join(os.path.dirname(os.path.abspath(prefix)), "cache")
        arrays = _cached(os.path.join(cache_dir, f"{key}-GPTDataset-{split_name}"), description,
                         lambda: _build_indices(np.arange(start, end), sizes, seq_length, num_samples, seed))
        self.document_index, self.sample_index, self.shuffle_index = arrays

    def __len__(self) -> int:
        return len(self.shuffle_index)

    def __getitem__(self, idx: int) -> np.ndarray:
        if not 0 <= idx < len(self):
            raise IndexError(f"sample {idx} out of range ({len(self)} samples)")
        i = int(self.shuffle_index[idx])
        (first, first_offset), (last, last_offset) = self.sample_index[i].tolist(), self.sample_index[i + 1].tolist()
        get = self.indexed_dataset.get
        if first == last:
            pieces = [get(int(self.document_index[first]), first_offset, last_offset - first_offset + 1)]
        else:
            pieces = [get(int(self.document_index[first]), first_offset)]
            pieces += [get(int(d)) for d in self.document_index[first + 1:last]]
            pieces.append(get(int(self.document_index[last]), 0, last_offset + 1))
        return np.concatenate(pieces).astype(np.int64)


SPLIT_NAMES = ("train", "valid", "test")
# Megatron's margin: each blended component gets 0.5% more samples than its share needs.
BLEND_MARGIN = 1.005


def parse_split(split: str) -> list[float]:
    """The three normalised weights of a split like "949,50,1" or "949/50/1"; missing ones are 0."""
    try:
        weights = [float(w) for w in split.replace("/", ",").split(",")]
    except ValueError:
        raise ValueError(f"split {split!r} is not numbers like 949,50,1") from None
    if len(weights) > 3 or min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"split {split!r} must be up to three non-negative weights with a positive sum")
    weights += [0.0] * (3 - len(weights))
    return [w / sum(weights) for w in weights]


def split_boundaries(split: str, count: int) -> list[int]:
    """Megatron's rule: [0, a, b, count] cutting `count` documents by the split's weights.

    Each range is rounded; the rounding error of the total is taken off every boundary
    but the first, exactly as Megatron does, so both cut a corpus into the same splits.
    """
    bounds = [0]
    for weight in parse_split(split):
        bounds.append(bounds[-1] + int(round(weight * count)))
    excess = bounds[-1] - count
    return [0] + [min(max(b - excess, 0), count) for b in bounds[1:]]


def parse_data_path(data_path: list[str]) -> tuple[list[str], list[float]]:
    """Megatron's --data-path: ["prefix"], or ["0.7", "a", "0.3", "b"]; (prefixes, normalised weights)."""
    if len(data_path) == 1:
        return list(data_path), [1.0]
    if len(data_path) % 2:
        raise ValueError(f"--data-path {' '.join(data_path)}: give one prefix, or weight-prefix pairs")
    try:
        weights = [float(w) for w in data_path[0::2]]
    except ValueError:
        raise ValueError(f"--data-path {' '.join(data_path)}: weights must be numbers, as in 0.7 a 0.3 b") from None
    if min(weights) < 0 or sum(weights) <= 0:
        raise ValueError(f"--data-path {' '.join(data_path)}: weights must be non-negative with a positive sum")
    return list(data_path[1::2]), [w / sum(weights) for w in weights]


def build_train_valid_test_datasets(data_path: list[str], split: str, seq_length: int, seed: int,
                                    num_samples: tuple[int, int, int], cache_dir: str | None = None
                                    ) -> tuple[GPTDataset | BlendedDataset | None, ...]:
    """The train, valid and test datasets of Megatron's --data-path and --split.

    Each dataset's documents are cut into the three splits; a split gets None when its
    weight is 0 or no samples are asked of it. Several datasets are blended by weight,
    split by split. Each dataset has at least num_samples[i] samples (whole epochs, so
    often more), each an int64 array of seq_length + 1 tokens.
    """
    prefixes, weights = parse_data_path(data_path)
    indexed = [IndexedDataset(prefix) for prefix in prefixes]
    split_weights = parse_split(split)
    result = []
    for i, (name, size) in enumerate(zip(SPLIT_NAMES, num_samples)):
        if split_weights[i] == 0 or size == 0:
            result.append(None)
            continue
        parts = []
        for dataset, weight in zip(indexed, weights):
            bounds = split_boundaries(split, len(dataset))
            if bounds[i] == bounds[i + 1]:
                raise ValueError(f"{dataset.path_prefix}: the {name} split of --split {split} gets no documents "
                                 f"(the dataset has {len(dataset)})")
            part_size = size if len(indexed) == 1 else int(np.ceil(np.ceil(size * weight) * BLEND_MARGIN))
            parts.append(GPTDataset(dataset, name, (bounds[i], bounds[i + 1]), part_size, seq_length, seed,
                                    cache_dir))
        result.append(parts[0] if len(parts) == 1 else BlendedDataset(parts, weights, size))
    return tuple(result)
