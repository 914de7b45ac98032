"""Megatron's tensor-parallel layers: each rank holds a slice of the weight and the mappings
insert the collectives that make the result equal to the unsharded layer.

A column-parallel linear splits the output features (no communication forward; the input
grad is all-reduced), a row-parallel linear splits the input features (its partial outputs
are all-reduced). Column then row, as in attention (QKV -> projection) and the MLP
(fc1 -> fc2), costs one all-reduce forward and one backward per pair. With sequence
parallelism those all-reduces become all-gather (entering the pair) and reduce-scatter
(leaving it), and the tensors between pairs hold seq/tp tokens.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.placement import Placement, place, place_module, sharded
from megatron_lite.tensor_parallel.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_sequence_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    reduce_scatter_to_sequence_parallel_region,
    scatter_to_tensor_model_parallel_region,
)


def _divide(numerator: int, denominator: int, what: str) -> int:
    if numerator % denominator:
        raise ValueError(f"{what}={numerator} is not divisible by tensor-model-parallel size {denominator}")
    return numerator // denominator


def enter_tensor_parallel_region(x: torch.Tensor, sequence_parallel: bool) -> torch.Tensor:
    """The input side of a column-parallel op: all-gather the sequence (SP) or the f mapping."""
    if sequence_parallel:
        return gather_from_sequence_parallel_region(x)
    return copy_to_tensor_model_parallel_region(x)


def mark_sequence_parallel(module: nn.Module, enabled: bool = True) -> None:
    """Place the params of a module that is replicated across tp: under SP each rank's copy sees
    only this rank's tokens, so its grad is a partial sum over tp."""
    place_module(module, Placement(partial_grads=("tp",) if enabled else ()))


class ColumnParallelLinear(nn.Module):
    """y = x W^T + b with W split along its output rows; output stays split unless gather_output."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, gather_output: bool = False,
                 sequence_parallel: bool = False, stride: int = 1) -> None:
        super().__init__()
        tp = parallel_state.get_grid().size("tp")
        local = _divide(out_features, tp, "output features")
        self.gather_output = gather_output
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(local, in_features))
        place(self.weight, sharded(0, stride))
        self.bias = nn.Parameter(torch.empty(local)) if bias else None
        if bias:
            place(self.bias, sharded(0, stride))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(enter_tensor_parallel_region(x, self.sequence_parallel), self.weight, self.bias)
        return gather_from_tensor_model_parallel_region(y) if self.gather_output else y


class RowParallelLinear(nn.Module):
    """y = x W^T + b with W split along its input columns; partial outputs summed across tp."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, input_is_parallel: bool = True,
                 sequence_parallel: bool = False) -> None:
        super().__init__()
        if sequence_parallel and not input_is_parallel:
            raise ValueError("a row-parallel linear under sequence parallelism needs input_is_parallel=True")
        tp = parallel_state.get_grid().size("tp")
        self.input_is_parallel = input_is_parallel
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(out_features, _divide(in_features, tp, "input features")))
        place(self.weight, sharded(1))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        if bias:
            # Added after the reduction, so replicated; under SP each rank adds it to its own tokens.
            place(self.bias, Placement(partial_grads=("tp",) if sequence_parallel else ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.input_is_parallel:
            x = scatter_to_tensor_model_parallel_region(x)
        y = F.linear(x, self.weight)
        if self.sequence_parallel:
            y = reduce_scatter_to_sequence_parallel_region(y)
        else:
            y = reduce_from_tensor_model_parallel_region(y)
        # Bias after the reduction: it must be added once, not once per rank.
        return y if self.bias is None else y + self.bias


class DuplicatedLinear(nn.Module):
    """y = x W^T with the whole W on every tp rank (Megatron's "duplicated" linear): a projection too
    narrow to split, such as multi-latent attention's down-projections. Under SP each rank projects
    its own tokens, so its grad is a partial sum over tp; otherwise every rank computes the same grad."""

    def __init__(self, in_features: int, out_features: int, sequence_parallel: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        place(self.weight, Placement(partial_grads=("tp",) if sequence_parallel else ()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight)


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; each rank looks up the tokens it owns and
    the partial results are summed (or reduce-scattered along the sequence under SP)."""

    def __init__(self, num_embeddings: int, embedding_dim: int, sequence_parallel: bool = False) -> None:
        super().__init__()
        tp = parallel_state.get_grid().size("tp")
        local = _divide(num_embeddings, tp, "padded vocabulary size")
        self.vocab_start = parallel_state.get_grid().coord("tp") * local
        self.sequence_parallel = sequence_parallel
        self.weight = nn.Parameter(torch.empty(local, embedding_dim))
        place(self.weight, sharded(0))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        local = tokens - self.vocab_start
        outside = (local < 0) | (local >= self.weight.shape[0])
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        if self.sequence_parallel:
            return reduce_scatter_to_sequence_parallel_region(out)
        return reduce_from_tensor_model_parallel_region(out)
