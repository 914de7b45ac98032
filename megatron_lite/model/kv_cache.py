"""The keys and values of the tokens generated so far, so each new token attends to them
without the model recomputing them (Megatron calls this object InferenceParams)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from megatron_lite.kernels.reference import visible_keys


class InferenceParams:
    """One model's KV cache for a batch of sequences decoded together.

    Every attention layer stores its keys and values (after RoPE) under its layer number, in
    buffers allocated once for `max_sequence_length` positions. A forward holds the tokens at
    positions sequence_len_offset onwards; the caller moves the offset on after it.
    """

    def __init__(self, max_batch_size: int, max_sequence_length: int) -> None:
        self.max_batch_size, self.max_sequence_length = max_batch_size, max_sequence_length
        self.sequence_len_offset = 0
        self.key_value_memory_dict: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def attend(self, layer_number: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               window: int | None = None, doc_start: torch.Tensor | None = None) -> torch.Tensor:
        """Causal attention of the new tokens' q [b, heads, s, d] over every cached token and the
        new ones, whose k, v [b, groups, s, d] are stored first; `window` and `doc_start` (the new
        tokens' document starts, [b, s], in the cache's positions) as in the model."""
        b, groups, s, d = k.shape
        start, end = self.sequence_len_offset, self.sequence_len_offset + s
        if end > self.max_sequence_length or b > self.max_batch_size:
            raise ValueError(f"the KV cache holds {self.max_batch_size} sequences of {self.max_sequence_length} "
                             f"tokens; this forward needs {b} of {end}")
        if layer_number not in self.key_value_memory_dict:
            shape = (self.max_batch_size, groups, self.max_sequence_length, d)
            self.key_value_memory_dict[layer_number] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = self.key_value_memory_dict[layer_number]
        keys[:b, :, start:end], values[:b, :, start:end] = k, v
        keys, values = keys[:b, :, :end], values[:b, :, :end]
        # Query i sits at position start + i and sees the keys up to it: the causal mask shifted
        # by the cached tokens (with nothing cached, plain causal attention).
        visible = visible_keys(s, end, window, offset=start, device=q.device, doc_start=doc_start)
        per_group = q.shape[1] // groups
        return F.scaled_dot_product_attention(q, keys.repeat_interleave(per_group, dim=1),
                                              values.repeat_interleave(per_group, dim=1), attn_mask=visible)
