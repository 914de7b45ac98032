"""Document boundaries in packed samples, from the end-of-document token (Megatron's
--reset-position-ids, --reset-attention-mask, --eod-mask-loss); the .bin/.idx files are unchanged.

A sample cuts across documents laid end to end, each ending with the eod token, which belongs
to the document it ends: the token after an eod starts a new document. For each token the
batch then carries, as Megatron's get_ltor_masks_and_position_ids derives them:
- "doc_start" (--reset-attention-mask): where in the sequence its document starts; attention
  hides every key before it (the model's attention paths take it as `doc_start`);
- "position_ids" (--reset-position-ids): its position within its document;
- "loss_mask" (--eod-mask-loss): 0 where the input token is the eod, whose target is the first
  token of the next document, unpredictable from the one the eod ends.
With --reset-attention-mask also "document_keys" [b]: per sample, the keys a query attends to
by the FLOPs count's convention (planner/flops.py), its document's length on average over the
sample's queries (sum of squared document lengths / s), so the logged FLOPs count the batch's
own documents.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from megatron_lite.config import ConfigError


def document_starts(tokens: torch.Tensor, eod: int) -> torch.Tensor:
    """[b, s] int64: the position in its sample where each token's document starts."""
    positions = torch.arange(tokens.shape[-1], device=tokens.device).expand_as(tokens)
    after_eod = torch.zeros_like(tokens, dtype=torch.bool)
    after_eod[..., 1:] = tokens[..., :-1] == eod
    return torch.where(after_eod, positions, 0).cummax(dim=-1).values


@dataclass(frozen=True)
class DocumentMasking:
    """Which of the three document treatments a run applies, and its eod token."""
    eod: int
    reset_position_ids: bool = False
    reset_attention_mask: bool = False
    eod_mask_loss: bool = False

    @classmethod
    def of(cls, flags: Mapping[str, object], eod: int | None) -> DocumentMasking | None:
        """The masking the flags ask for (TrainConfig's fields by name: a run's, or the one saved in
        a checkpoint); None when none of them is on."""
        reset_position_ids, reset_attention_mask, eod_mask_loss = (
            bool(flags.get(name)) for name in ("reset_position_ids", "reset_attention_mask", "eod_mask_loss"))
        if not (reset_position_ids or reset_attention_mask or eod_mask_loss):
            return None
        if eod is None:
            raise ConfigError("--reset-position-ids, --reset-attention-mask and --eod-mask-loss need a tokenizer "
                             "with an end-of-document token")
        return cls(eod, reset_position_ids, reset_attention_mask, eod_mask_loss)

    def describe(self) -> str:
        """For the start-up log."""
        on = [name for name, flag in (("attention within documents", self.reset_attention_mask),
                                      ("positions restart per document", self.reset_position_ids),
                                      ("no loss on end-of-document inputs", self.eod_mask_loss)) if flag]
        return f"document masking at eod id {self.eod}: {', '.join(on)}"

    def prompt_inputs(self, ids: list[int], start: int) -> dict[str, torch.Tensor]:
        """What generation gives the model for the tokens ids[start:] of a prompt and its
        continuation (ids[:start] are in the KV cache): the same document starts and positions
        as training would give them, so that a prompt holding eod tokens is continued as the last
        of its documents (the tokens before that document out of its sight, positions from its
        start)."""
        tokens = torch.tensor([ids])
        starts = document_starts(tokens, self.eod)[:, start:]
        inputs = {}
        if self.reset_attention_mask:
            inputs["doc_start"] = starts
        if self.reset_position_ids:
            inputs["positions"] = torch.arange(start, len(ids)) - starts
        return inputs

    def apply(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The batch (tokens, labels, loss_mask [b, s]) with what the flags add or change."""
        tokens, batch = batch["tokens"], dict(batch)
        starts = document_starts(tokens, self.eod)
        if self.reset_attention_mask:
            batch["doc_start"] = starts
            # sum over documents of L^2 = 2 * sum over tokens of (keys it sees causally) - s.
            seen = (torch.arange(tokens.shape[-1], device=tokens.device) - starts + 1).sum(-1)
            batch["document_keys"] = (2 * seen - tokens.shape[-1]).double() / tokens.shape[-1]
        if self.reset_position_ids:
            batch["position_ids"] = torch.arange(tokens.shape[-1], device=tokens.device) - starts
        if self.eod_mask_loss:
            batch["loss_mask"] = batch["loss_mask"].masked_fill(tokens == self.eod, 0.0)
        return batch
