"""Multi-token prediction: DeepSeek-V3's sequential modules, laid out as Megatron-Core builds them.

Module k (1..N) sits after the main model on the last pipeline stage. At position i it takes
module k-1's output there (k = 1: the main model's output after its final norm, Megatron's
decoder output) and the shared embedding of the token k positions ahead, normalises each
(enorm, hnorm), concatenates [embedding; hidden], projects 2h -> h (eh_proj), runs its own
transformer layer and final norm, and scores the token k+1 positions ahead with the shared
output layer. Its loss is masked and averaged like the lm loss; the step's objective is
lm loss + mtp_loss_scaling_factor / N * (sum of the N modules' losses).

What each module reads and predicts (`add_mtp_targets`) is cut from the whole sequence before
context parallelism splits it, so a rank whose zigzag chunk ends where another rank's begins
already holds the tokens after its edge: the shift needs no communication, and the pipeline's
last stage finds them in the same batch as the first.
"""
from __future__ import annotations

import torch
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model.norms import build_norm
from megatron_lite.model.ops import Ops
from megatron_lite.model.transformer import TransformerLayer
from megatron_lite.tensor_parallel import ColumnParallelLinear
from megatron_lite.tensor_parallel.mappings import (
    gather_from_tensor_model_parallel_region,
    scatter_to_sequence_parallel_region,
)

# The batch entries add_mtp_targets writes, each [batch, seq, N]: the tokens module k embeds, the
# tokens it predicts, and which of its positions count.
MTP_KEYS = ("mtp_tokens", "mtp_labels", "mtp_loss_mask")


def _shift_left(t: torch.Tensor, k: int) -> torch.Tensor:
    """t[:, i + k] at position i, zero past the end (Megatron's roll by -k with zero fill)."""
    out = torch.zeros_like(t)
    out[:, :-k] = t[:, k:]
    return out


def add_mtp_targets(batch: dict[str, torch.Tensor], depths: int) -> dict[str, torch.Tensor]:
    """The microbatch (whole sequences) with MTP_KEYS added: module k reads the tokens k ahead and
    predicts the labels k ahead (the token k+1 ahead); its last k positions have none and are masked."""
    def stacked(name: str) -> torch.Tensor:
        return torch.stack([_shift_left(batch[name], k) for k in range(1, depths + 1)], dim=-1)
    return {**batch, **{key: stacked(name) for key, name in zip(MTP_KEYS, ("tokens", "labels", "loss_mask"))}}


def mtp_loss_weights(config: ModelConfig, device: torch.device) -> torch.Tensor:
    """Weight of the lm loss and of each module's loss in the objective: [1, f/N, ..., f/N]."""
    depths = config.mtp_depths
    return torch.tensor([1.0] + [config.mtp_loss_scaling_factor / depths] * depths, device=device)


class MTPLayer(nn.Module):
    """One prediction depth (Megatron's parameter names: enorm, hnorm, eh_proj, final_layernorm)."""

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool, number: int) -> None:
        """`number`: the layer number its transformer layer takes (after the main model's), for
        which layers are MoE and slide (ModelConfig.is_moe_layer, layer_window)."""
        super().__init__()
        self.sequence_parallel = sequence_parallel
        self.enorm = build_norm(config, ops, sequence_parallel)
        self.hnorm = build_norm(config, ops, sequence_parallel)
        # Column-parallel over its output, whose slices are gathered back to the whole width: the
        # transformer layer takes the replicated (or, under SP, sequence-split) residual stream.
        self.eh_proj = ColumnParallelLinear(2 * config.hidden_size, config.hidden_size, bias=False,
                                            sequence_parallel=sequence_parallel)
        self.transformer_layer = TransformerLayer(config, ops, sequence_parallel, number)
        self.final_layernorm = build_norm(config, ops, sequence_parallel)

    def forward(self, hidden: torch.Tensor, embedded: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None,
                doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """`doc_start`: the document mask of the main model's layers (model/gpt.py), kept here too."""
        x = gather_from_tensor_model_parallel_region(self.eh_proj(torch.cat([self.enorm(embedded),
                                                                             self.hnorm(hidden)], dim=-1)))
        if self.sequence_parallel:  # eh_proj gathered the sequence: back to this rank's tokens
            x = scatter_to_sequence_parallel_region(x)
        return self.final_layernorm(self.transformer_layer(x, rotary, doc_start=doc_start))


class MultiTokenPrediction(nn.Module):
    """The N modules, numbered after the main model's layers (`mtp.layers.K` in checkpoints)."""

    def __init__(self, config: ModelConfig, ops: Ops, sequence_parallel: bool) -> None:
        super().__init__()
        self.layers = nn.ModuleList(MTPLayer(config, ops, sequence_parallel, config.num_layers + k)
                                    for k in range(config.mtp_depths))
