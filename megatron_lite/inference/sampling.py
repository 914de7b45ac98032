"""The next token from the logits: greedy, or sampled with temperature, top-k and top-p."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """greedy (or temperature 0, the limit it tends to, as Megatron's and vLLM's tools read it)
    takes the most likely token; otherwise the logits are divided by temperature, cut to the
    top_k most likely (0: no cut) and to the smallest set whose probability reaches top_p (0 or
    1: no cut), then sampled (Megatron's and transformers' order of the steps)."""
    greedy: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 0.0

    def validate(self) -> None:
        """ValueError naming the first value out of range."""
        if not self.temperature >= 0:
            raise ValueError(f"--temperature={self.temperature} must be positive, or 0 for the most likely token")
        if self.top_k < 0:
            raise ValueError(f"--top-k={self.top_k} must be 0 (no cut) or positive")
        if not 0 <= self.top_p <= 1:
            raise ValueError(f"--top-p={self.top_p} must be within [0, 1] (0: no cut)")


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token id per row of logits [b, vocab]."""
    if params.greedy or params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / params.temperature
    if params.top_k:
        kth = torch.topk(logits, min(params.top_k, logits.shape[-1]), dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if 0 < params.top_p < 1:
        ordered, order = logits.sort(dim=-1, descending=True)
        probs = ordered.softmax(dim=-1)
        # Drop a token when the ones more likely than it already reach top_p; the first always stays.
        drop = probs.cumsum(dim=-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)
