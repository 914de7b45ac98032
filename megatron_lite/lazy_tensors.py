"""A mapping of names to tensors, each read (or computed) only when asked for: what the checkpoint
readers and the Hugging Face conversion stream through, one tensor in memory at a time."""
from __future__ import annotations

from abc import abstractmethod
from collections.abc import Collection, Iterator, Mapping, Sequence

import torch


class LazyTensors(Mapping[str, torch.Tensor]):
    """Subclasses set `names` (the keys) and define __getitem__; membership, iteration and length
    come from the names alone, never reading a tensor."""

    names: Collection[str]  # __getitem__ stays Mapping's abstract method: each subclass reads its own way

    def __contains__(self, name: object) -> bool:
        return name in self.names

    def __iter__(self) -> Iterator[str]:
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


class IndexedTensors(LazyTensors):
    """LazyTensors that can also read part of a tensor without the rest: a rank's shard, whose
    positions along each dim placement.local_indices gives (checkpointing/reshard.py's load_weights
    asks for it so)."""

    @abstractmethod
    def select(self, name: str, index: Sequence[torch.Tensor]) -> torch.Tensor:
        """The tensor's elements at the positions index[d] along each dim d (ascending), i.e.
        `self[name][numpy.ix_(*index)]`, reading no more of it than that."""
