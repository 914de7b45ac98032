"""The GPT model: embedding, transformer layers, final norm, output layer and loss."""
from __future__ import annotations

import math
import zlib

import torch
import torch.nn.functional as F
from torch import nn

from megatron_lite.config import ModelConfig
from megatron_lite.model.norms import build_norm
from megatron_lite.model.rope import rotary_angles
from megatron_lite.model.transformer import TransformerLayer


class GPTModel(nn.Module):
    """Decoder-only transformer of either family (see ModelConfig.family)."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        vocab = config.padded_vocab_size()
        self.word_embeddings = nn.Embedding(vocab, config.hidden_size)
        if config.family == "gpt2":
            self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
            self.rotary = None
        else:
            cos, sin = rotary_angles(max(config.seq_length, config.max_position_embeddings),
                                     config.head_dim, config.rotary_base)
            self.register_buffer("rotary_cos", cos, persistent=False)
            self.register_buffer("rotary_sin", sin, persistent=False)
        self.embedding_dropout = nn.Dropout(config.hidden_dropout)
        self.layers = nn.ModuleList(TransformerLayer(config) for _ in range(config.num_layers))
        self.final_layernorm = build_norm(config.family, config.hidden_size, config.norm_epsilon)
        if not config.tie_embeddings:
            self.output_layer = nn.Linear(config.hidden_size, vocab, bias=False)

    def forward(self, tokens: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits [b, s, vocab] without labels; per-token fp32 loss [b, s] with them."""
        x = self.word_embeddings(tokens)
        rotary = None
        if self.config.family == "gpt2":
            x = x + self.position_embeddings(torch.arange(tokens.shape[1], device=tokens.device))
        else:
            rotary = (self.rotary_cos, self.rotary_sin)
        x = self.embedding_dropout(x)
        for layer in self.layers:
            x = layer(x, rotary)
        x = self.final_layernorm(x)
        weight = self.word_embeddings.weight if self.config.tie_embeddings else self.output_layer.weight
        # The padded vocabulary entries are not tokens: drop their logits so they never
        # take probability mass in the loss or show up in generated text.
        logits = F.linear(x, weight[: self.config.vocab_size])
        if labels is None:
            return logits
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), reduction="none").view_as(labels)


def _is_output_projection(name: str) -> bool:
    return name.endswith(("linear_proj.weight", "linear_fc2.weight"))


def init_weights(model: nn.Module, config: ModelConfig, seed: int) -> None:
    """Megatron-style init, drawn per parameter from a generator seeded by its name.

    Normal(0, std) for weights, std/sqrt(2*num_layers) for the projections that write into
    the residual stream (the GPT-2 paper's scaled init), zero biases, unit norm weights.
    Seeding by name rather than by construction order makes the values independent of which
    layers or which shard a rank happens to build, so parallel layouts start from exactly
    the single-device weights.
    """
    scaled_std = config.init_method_std / math.sqrt(2.0 * config.num_layers)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif "layernorm" in name:
                param.fill_(1.0)
            else:
                gen = torch.Generator().manual_seed(zlib.crc32(f"{seed}:{name}".encode()))
                std = scaled_std if _is_output_projection(name) else config.init_method_std
                full = torch.empty(param.shape, dtype=torch.float32).normal_(0.0, std, generator=gen)
                param.copy_(full)
