"""Load a trained model onto one device and continue a prompt with it, token by token."""
from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import torch

from megatron_lite.checkpointing import read_checkpoint, resolve_load
from megatron_lite.checkpointing.reshard import load_weights
from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.data.documents import DocumentMasking
from megatron_lite.hf.convert import from_hf_state, load_safetensors
from megatron_lite.hf.families import model_config_from_hf
from megatron_lite.inference.sampling import SamplingParams, sample
from megatron_lite.model.gpt import GPTModel
from megatron_lite.model.kv_cache import InferenceParams


def load_model(path: str | Path, ckpt_step: int | None = None,
               device: torch.device = torch.device("cpu")) -> tuple[GPTModel, dict | None]:
    """The model of a checkpoint of any layout (reassembled from its shards) or of a Hugging Face
    folder (config.json and safetensors), on one device in eval mode; with it the run's saved
    training config (None for a Hugging Face folder), which names its tokenizer."""
    path = Path(path)
    if (path / "config.json").exists():
        model_config = model_config_from_hf(json.loads((path / "config.json").read_text()))
        weights, train = from_hf_state(load_safetensors(path), model_config), None
    else:
        iteration = resolve_load(path, ckpt_step)
        if iteration is None:
            raise ConfigError(f"--load={path} holds neither a checkpoint nor a Hugging Face config.json")
        full = read_checkpoint(path, iteration)
        model_config, weights, train = ModelConfig(**full.config["model"]), full.model, full.config["train"]
    # Generation predicts one token at a time: the multi-token prediction modules are left out.
    model = GPTModel(replace(model_config, mtp_num_layers=None))
    load_weights(weights, [model])
    return model.to(device).eval(), train


@torch.no_grad()
def generate(model: GPTModel, prompt: list[int], max_new_tokens: int, params: SamplingParams,
             eod: int | None = None, generator: torch.Generator | None = None,
             documents: DocumentMasking | None = None) -> list[int]:
    """The ids that follow `prompt`: at most max_new_tokens, ending early after `eod`.

    The prompt runs through the model once and fills the KV cache; every later step feeds
    the one token just chosen. The prompt and its continuation must fit the model's context.
    With `documents` (the masking the model trained with) a prompt holding eod tokens is
    packed documents as in training: the continuation attends to the last document only and
    its positions count from that document's start.
    """
    context = model.config.context_length
    if not prompt or len(prompt) + max_new_tokens > context:
        raise ValueError(f"the prompt's {len(prompt)} tokens + --max-new-tokens={max_new_tokens} must be between "
                         f"1 and the model's context of {context} positions")
    device = next(model.parameters()).device
    cache = InferenceParams(1, len(prompt) + max_new_tokens)
    tokens = torch.tensor([prompt], device=device)
    generated: list[int] = []
    while len(generated) < max_new_tokens:
        start = cache.sequence_len_offset
        masks = {} if documents is None else documents.prompt_inputs(prompt + generated, start)
        logits = model(tokens, inference_params=cache, **{k: v.to(device) for k, v in masks.items()})[:, -1]
        cache.sequence_len_offset += tokens.shape[1]
        token = int(sample(logits, params, generator))
        generated.append(token)
        if token == eod:
            break
        tokens = torch.tensor([[token]], device=device)
    return generated
