"""Data: tokenizers, the built-in corpus, datasets of fixed-length samples, and their order."""
from __future__ import annotations

from megatron_lite.config import TrainConfig
from megatron_lite.data.default_corpus import load_default_corpus
from megatron_lite.data.loader import TokenWindowDataset


def split_boundaries(split: str, count: int) -> list[int]:
    """Megatron's rule: cut `count` documents into train/valid/test by normalised weights."""
    weights = [float(w) for w in split.replace("/", ",").split(",")]
    total = sum(weights)
    bounds = [0]
    for w in weights:
        bounds.append(bounds[-1] + int(round(w / total * count)))
    diff = bounds[-1] - count
    return [b - diff if i > 0 else b for i, b in enumerate(bounds)]


def build_train_valid_datasets(cfg: TrainConfig, seq_length: int) -> tuple[TokenWindowDataset,
                                                                          TokenWindowDataset | None, str]:
    """Datasets of the built-in corpus split by documents, and a description for the log."""
    tokens, doc_starts, description = load_default_corpus(cfg.data_cache_dir)
    bounds = split_boundaries(cfg.split, len(doc_starts))
    offsets = doc_starts + [len(tokens)]
    splits = [tokens[offsets[a]:offsets[b]] for a, b in zip(bounds, bounds[1:])]
    train = TokenWindowDataset(splits[0], seq_length, cfg.seed)
    valid = TokenWindowDataset(splits[1], seq_length, cfg.seed, shuffle=False) if len(splits[1]) > seq_length else None
    return train, valid, description
