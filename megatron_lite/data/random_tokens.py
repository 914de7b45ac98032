"""A dataset of random token sequences that is the same for every rank, layout and run."""
from __future__ import annotations

import numpy as np


class RandomTokens:
    """Sample i is a fixed random token sequence (seq_length + 1 ids: inputs and next-token labels),
    whichever rank asks for it: the data of parity tests and layout comparisons, cheap and identical
    under any layout."""

    def __init__(self, vocab_size: int, seq_length: int, seed: int = 0) -> None:
        self.vocab_size, self.seq_length, self.seed = vocab_size, seq_length, seed

    def __len__(self) -> int:
        return 1 << 30

    def __getitem__(self, index: int) -> np.ndarray:
        rng = np.random.RandomState((self.seed * 1_000_003 + index) % 2**32)
        return rng.randint(0, self.vocab_size, self.seq_length + 1).astype(np.int64)
