"""The autograd mappings of Megatron's tensor and sequence parallelism, built on the collectives of comm.py.

Each mapping is a pair of conjugate operations: what forward does, and what backward must do
so that gradients are those of the unsharded model. From the Megatron-LM paper:

  copy_to_tensor_model_parallel_region       f: identity       / all-reduce   (input of a column-parallel linear)
  reduce_from_tensor_model_parallel_region   g: all-reduce     / identity     (output of a row-parallel linear)
  scatter_to_tensor_model_parallel_region       split last dim / all-gather
  gather_from_tensor_model_parallel_region      all-gather     / split last dim

and for sequence parallelism, where activations outside the tensor-parallel regions are
split along the sequence (dim 1 of our [batch, seq, hidden] tensors):

  gather_from_sequence_parallel_region          all-gather     / reduce-scatter
  reduce_scatter_to_sequence_parallel_region    reduce-scatter / all-gather
  scatter_to_sequence_parallel_region           split seq      / all-gather

The collectives themselves, and the meter that counts them, are in megatron_lite/comm.py.
An all-reduce is a reduce-scatter followed by an all-gather, which is why sequence
parallelism costs no more communication than the all-reduces it replaces.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from megatron_lite.comm import all_gather, all_reduce, reduce_scatter, split

SEQ_DIM = 1


class _Conjugate(torch.autograd.Function):
    """Apply `forward_fn` going forward and `backward_fn` to the gradient going back."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, forward_fn: Callable, backward_fn: Callable) -> torch.Tensor:
        ctx.backward_fn = backward_fn
        return forward_fn(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        return ctx.backward_fn(grad), None, None


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


def _all_reduce_copy(t: torch.Tensor) -> torch.Tensor:
    # Autograd must not see its input modified in place.
    return all_reduce(t.clone())


def _last(fn: Callable) -> Callable:
    return lambda t: fn(t, t.dim() - 1)


def _seq(fn: Callable) -> Callable:
    return lambda t: fn(t, SEQ_DIM)


def copy_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _identity, _all_reduce_copy)


def reduce_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _all_reduce_copy, _identity)


def scatter_to_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _last(split), _last(all_gather))


def gather_from_tensor_model_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _last(all_gather), _last(split))


def gather_from_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _seq(all_gather), _seq(reduce_scatter))


def reduce_scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _seq(reduce_scatter), _seq(all_gather))


def scatter_to_sequence_parallel_region(x: torch.Tensor) -> torch.Tensor:
    return _Conjugate.apply(x, _seq(split), _seq(all_gather))
