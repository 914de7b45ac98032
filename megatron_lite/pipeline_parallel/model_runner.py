"""The stage runner that drives real model chunks through a schedule."""
from __future__ import annotations

import contextlib
import time
from collections.abc import Callable

import torch
from torch import nn

from megatron_lite import parallel_state
from megatron_lite.comm import all_reduce
from megatron_lite.model.moe import AuxLoss
from megatron_lite.model.mtp import mtp_loss_weights
from megatron_lite.pipeline_parallel.split_backward import WeightGradients, backward_input
from megatron_lite.pipeline_parallel.trace import Trace


def autocast(device: torch.device, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """Autocast to the half dtype the weights are in (matmuls in it, softmax-like ops kept in
    fp32, no weight re-cast since the weights are half already), or nothing in fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def microbatch_loss(per_token: torch.Tensor, loss_mask: torch.Tensor,
                    weights: torch.Tensor | None = None, token_weight: float | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """(what to differentiate, the mean loss over the unmasked tokens of one microbatch).

    Under context parallelism each cp rank holds part of every sequence: the sum and the count
    of the loss terms are reduced over cp, so every rank reports the whole microbatch's mean.
    Each rank differentiates cp times its own share of that mean: the gradient reduction
    averages over dp x cp, and the average of cp times the shares is their sum, the gradient
    of the mean.

    With multi-token prediction per_token and loss_mask are [b, s, 1 + N] (the lm loss, then
    each module's): each is averaged over its own unmasked tokens, the means are reported, and
    what is differentiated is their sum weighted by `weights` (model/mtp.py's mtp_loss_weights).
    --calculate-per-token-loss gives `token_weight` (see per_token_weight): the loss sum times it,
    in place of the mean, makes the step's objective the sum over the global batch's unmasked
    tokens divided by their number. With multi-token prediction each module's loss sum is divided by
    that same number, the lm loss's tokens (Megatron's), before the weighting.
    """
    total, count = (per_token * loss_mask).sum((0, 1)), loss_mask.sum((0, 1))
    cp = parallel_state.get_grid().size("cp")
    if token_weight is not None:
        reported = all_reduce(total.detach().clone(), group="cp") * (token_weight / cp)
        objective = total * token_weight
        return (objective if weights is None else (objective * weights).sum()), reported
    if cp == 1:
        loss = total / count
        objective, mean = loss, loss.detach()
    else:
        sums = all_reduce(torch.stack([total.detach(), count]), group="cp")
        objective, mean = total * (cp / sums[1]), sums[0] / sums[1]
    return (objective if weights is None else (objective * weights).sum()), mean


def per_token_weight(microbatches: list[dict[str, torch.Tensor]], num_microbatches: int) -> float:
    """The factor that turns a microbatch's loss sum into its share of the global batch's per-token
    mean: the reductions after it divide by the microbatches and average over dp x cp, which this
    factor undoes, and it divides by the unmasked tokens of the whole global batch (every rank
    holds its microbatches' masks, so every stage counts them alike)."""
    count = torch.stack([batch["loss_mask"].sum() for batch in microbatches]).sum().double()
    all_reduce(count, group="dp-cp")
    return num_microbatches * parallel_state.get_grid().size("dp-cp") / max(count.item(), 1.0)


class ModelRunner:
    """Forward and backward passes of this rank's model chunks on the step's microbatches.

    The last stage divides each microbatch's loss by the number of microbatches before its
    backward, so the accumulated gradient is that of the mean loss over the global batch and
    k microbatches of size b give the step of one batch of k*b; under --fp16 it multiplies by
    the loss scale too.
    """

    def __init__(self, chunks: list[nn.Module], microbatches: list[dict[str, torch.Tensor]], num_microbatches: int,
                 tensor_shape: tuple[int, ...], device: torch.device, dtype: torch.dtype = torch.float32,
                 trace: Trace | None = None, before_last_backward: Callable[[int], None] | None = None,
                 loss_scale: float = 1.0, after_backward: Callable[[int], None] | None = None,
                 per_token_loss: bool = False) -> None:
        """`dtype`: the weights' dtype, which is also that of the residual stream passed between
        stages (bf16 activations under --bf16: half the pipeline traffic of fp32).
        before_last_backward(chunk) runs before each chunk's backward of the last microbatch:
        every schedule runs a chunk's backwards in microbatch order, so that one makes its grads final.
        after_backward(chunk) runs after each of a chunk's backwards (ZeRO-2/3 reduce then).
        per_token_loss: --calculate-per-token-loss (microbatch_loss)."""
        self.chunks, self.microbatches, self.num_microbatches = chunks, microbatches, num_microbatches
        self.tensor_shape, self.device, self.dtype, self.trace = tensor_shape, device, dtype, trace
        self.loss_scale = loss_scale
        self.token_weight = per_token_weight(microbatches, num_microbatches) if per_token_loss else None
        # The balancing losses of MoE layers enter the objective with the lm loss's weight.
        AuxLoss.scale = loss_scale * parallel_state.get_grid().size("cp") / num_microbatches
        self.before_last_backward, self.after_backward = before_last_backward, after_backward
        # Detached device scalars: reading them (a host sync) waits for the end of the step.
        self.losses: list[torch.Tensor] = []
        self.mtp_losses: list[torch.Tensor] = []  # [N] per microbatch, with multi-token prediction
        self.pending: dict[tuple[int, int], WeightGradients] = {}  # B done, W not yet

    def _record(self, chunk: int, microbatch: int, kind: str, start: float) -> None:
        if self.trace is not None:
            self.trace.record(chunk, microbatch, kind, start, time.perf_counter())

    def forward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None) -> torch.Tensor:
        start = time.perf_counter()
        model, batch = self.chunks[chunk], self.microbatches[microbatch]
        if input_tensor is not None:
            input_tensor.requires_grad_()
        mtp = model.post_process and "mtp_tokens" in batch
        with autocast(self.device, self.dtype):
            output = model(tokens=batch["tokens"], labels=batch["labels"] if model.post_process else None,
                           hidden=input_tensor, positions=batch.get("position_ids"), doc_start=batch.get("doc_start"),
                           **({"mtp_tokens": batch["mtp_tokens"], "mtp_labels": batch["mtp_labels"]} if mtp else {}))
        if model.post_process:
            if mtp:
                masks = torch.cat([batch["loss_mask"].unsqueeze(-1), batch["mtp_loss_mask"]], dim=-1)
                objective, losses = microbatch_loss(output, masks, mtp_loss_weights(model.config, output.device),
                                                    self.token_weight)
                loss = losses[0]
                self.mtp_losses.append(losses[1:])
            else:
                objective, loss = microbatch_loss(output, batch["loss_mask"], token_weight=self.token_weight)
            self.losses.append(loss)
            output = objective / self.num_microbatches
            if self.loss_scale != 1.0:
                output = output * self.loss_scale
        self._record(chunk, microbatch, "F", start)
        return output

    def backward(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None, output_tensor: torch.Tensor,
                 output_grad: torch.Tensor | None) -> torch.Tensor | None:
        start = time.perf_counter()
        if self.before_last_backward is not None and microbatch == self.num_microbatches - 1:
            self.before_last_backward(chunk)
        torch.autograd.backward(output_tensor, grad_tensors=output_grad)
        if self.after_backward is not None:
            self.after_backward(chunk)
        self._record(chunk, microbatch, "B", start)
        return None if input_tensor is None else input_tensor.grad

    def backward_input(self, chunk: int, microbatch: int, input_tensor: torch.Tensor | None,
                       output_tensor: torch.Tensor, output_grad: torch.Tensor | None) -> torch.Tensor | None:
        """The zero-bubble schedules' B: the input's gradient only; backward_weight finishes it."""
        start = time.perf_counter()
        grad, self.pending[chunk, microbatch] = backward_input(output_tensor, output_grad, input_tensor,
                                                               list(self.chunks[chunk].parameters()))
        self._record(chunk, microbatch, "B", start)
        return grad

    def backward_weight(self, chunk: int, microbatch: int) -> None:
        """The zero-bubble schedules' W: the weights' gradients of a microbatch backward_input ran.
        A chunk's W passes run in microbatch order, so the last one makes its grads final."""
        start = time.perf_counter()
        if self.before_last_backward is not None and microbatch == self.num_microbatches - 1:
            self.before_last_backward(chunk)
        self.pending.pop((chunk, microbatch)).run()
        if self.after_backward is not None:
            self.after_backward(chunk)
        self._record(chunk, microbatch, "W", start)
