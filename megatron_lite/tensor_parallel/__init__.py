"""Megatron tensor parallelism: the f/g mappings, parallel layers, vocab-parallel loss."""
from megatron_lite.tensor_parallel.cross_entropy import vocab_parallel_cross_entropy
from megatron_lite.tensor_parallel.layers import (
                                                  ColumnParallelLinear,
                                                  DuplicatedLinear,
                                                  RowParallelLinear,
                                                  VocabParallelEmbedding,
                                                  enter_tensor_parallel_region,
                                                  mark_sequence_parallel,
)

__all__ = ["ColumnParallelLinear", "DuplicatedLinear", "RowParallelLinear", "VocabParallelEmbedding",
           "vocab_parallel_cross_entropy", "enter_tensor_parallel_region", "mark_sequence_parallel"]
