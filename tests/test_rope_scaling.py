"""RoPE scaling (linear, llama3, yarn) as transformers computes it: our tables equal its rotary
embedding's, a Llama checkpoint of each type imports with its logits at every position (past the
original context too) and exports back bit for bit, and what we do not compute is refused with
one line."""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from helpers.tiny import tiny_model
from megatron_lite.checkpointing import read_checkpoint
from megatron_lite.checkpointing.reshard import load_weights
from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.hf.convert import load_safetensors
from megatron_lite.hf.families import hf_config, model_config_from_hf
from megatron_lite.model.gpt import GPTModel
from megatron_lite.model.rope import inverse_frequencies, rotary_tables

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402

CONTEXT, ORIGINAL = 64, 16  # positions 16..63 lie past the original context
# Each type's parameters chosen so every regime shows in 8 pairs: pairs kept, ramped and slowed.
ROPE = {"linear": {"rope_type": "linear", "rope_theta": 10000.0, "factor": 4.0},
        "llama3": {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                   "original_max_position_embeddings": ORIGINAL, "low_freq_factor": 0.5, "high_freq_factor": 2.0},
        "yarn": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                 "original_max_position_embeddings": ORIGINAL, "beta_fast": 8.0, "beta_slow": 0.5}}
# Shapes of released models, where the frequencies span far more pairs than the tiny ones.
RELEASED = {"llama-3.1": ({"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0,
                           "original_max_position_embeddings": 8192, "low_freq_factor": 1.0,
                           "high_freq_factor": 4.0}, 131072),
            "qwen2.5-yarn": ({"rope_type": "yarn", "rope_theta": 1e6, "factor": 4.0,
                              "original_max_position_embeddings": 32768}, 131072),
            "yarn-mscale": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0,
                             "original_max_position_embeddings": 4096, "mscale": 0.707, "mscale_all_dim": 1.0,
                             "beta_fast": 32.0, "beta_slow": 1.0}, 163840),
            "yarn-attention-factor": ({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 2.0,
                                       "original_max_position_embeddings": 4096, "attention_factor": 0.9}, 8192),
            "linear": ({"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0}, 8192)}


def _hf_config(rope: dict, context: int = CONTEXT, head_dim: int = 16) -> transformers.LlamaConfig:
    return transformers.LlamaConfig(vocab_size=258, hidden_size=4 * head_dim, intermediate_size=128,
                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                    max_position_embeddings=context, rope_parameters=dict(rope),
                                    tie_word_embeddings=False, initializer_range=0.2)


@pytest.mark.parametrize("name", RELEASED)
def test_frequencies_equal_transformers_at_released_shapes(name: str) -> None:
    """Head dim 128 at the released contexts: each pair's frequency (fp32 there, 1e-5) and the attention factor."""
    rope, context = RELEASED[name]
    hf = _hf_config(rope, context, head_dim=128)
    theirs, their_factor = ROPE_INIT_FUNCTIONS[rope["rope_type"]](hf)
    ours, our_factor = inverse_frequencies(model_config_from_hf(hf.to_dict()))
    torch.testing.assert_close(ours.float(), theirs, rtol=1e-5, atol=0)
    assert our_factor == pytest.approx(their_factor, rel=1e-12)


@pytest.mark.parametrize("kind", ROPE)
def test_tables_equal_transformers_rotary_embedding(kind: str) -> None:
    """cos and sin at every position, the attention factor applied, against LlamaRotaryEmbedding; and
    the scaling changes them (the tiny shape's regimes are not all of one kind)."""
    hf = _hf_config(ROPE[kind])
    model = model_config_from_hf(hf.to_dict())
    cos, sin = LlamaRotaryEmbedding(hf)(torch.zeros(1), torch.arange(CONTEXT)[None])
    ours = rotary_tables(model)
    half = model.head_dim // 2
    torch.testing.assert_close(ours[0], cos[0, :, :half], rtol=0, atol=1e-5)
    torch.testing.assert_close(ours[1], sin[0, :, :half], rtol=0, atol=1e-5)
    plain = inverse_frequencies(ModelConfig(**{**vars(model), "rope_scaling_type": "none"}))[0]
    ratio = inverse_frequencies(model)[0] / plain
    assert (ratio < 1 - 1e-3).any() and (kind == "linear" or (ratio > 1 - 1e-9).any())


def _our_logits(load: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the single-device model holding an imported checkpoint's weights."""
    full = read_checkpoint(load, 0)
    model = GPTModel(ModelConfig(**full.config["model"]))
    load_weights(full.model, [model])
    with torch.no_grad():
        return model.eval()(tokens)


@pytest.mark.parametrize("kind, tp, pp", [("linear", 1, 1), ("llama3", 1, 1), ("yarn", 1, 1), ("llama3", 2, 2)])
def test_import_computes_transformers_logits_and_exports_bit_exactly(tmp_path: Path, kind: str, tp: int,
                                                                     pp: int) -> None:
    """A random Llama saved by save_pretrained, imported (tp x pp): its logits at all 64 positions
    (fp32, 1e-4), which plain RoPE would not give; to-hf of the import: the same tensors and config."""
    hf_dir, ours, again = tmp_path / "hf", tmp_path / "ours", tmp_path / "again"
    torch.manual_seed(0)
    hf = transformers.LlamaForCausalLM(_hf_config(ROPE[kind])).eval()
    hf.save_pretrained(hf_dir)
    assert convert_checkpoint.main(["from-hf", str(hf_dir), "--out", str(ours), "--tp", str(tp), "--pp", str(pp),
                                    "--make-vocab-size-divisible-by", "8"]) == 0
    tokens = torch.randint(0, 258, (2, CONTEXT), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(tokens).logits
        plain = transformers.LlamaForCausalLM(_hf_config({"rope_type": "default", "rope_theta": 10000.0})).eval()
        plain.load_state_dict(hf.state_dict())
        assert (plain(tokens).logits - theirs).abs().max() > 1e-2
    torch.testing.assert_close(_our_logits(ours, tokens), theirs, rtol=0, atol=1e-4)
    if (tp, pp) != (1, 1):
        return  # the round trip below does not depend on the layout
    assert convert_checkpoint.main(["to-hf", "--load", str(ours), "--out", str(again)]) == 0
    first, second = load_safetensors(hf_dir), load_safetensors(again)
    assert first.keys() == second.keys()
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)
    rope = [json.loads((folder / "config.json").read_text())["rope_parameters"] for folder in (hf_dir, again)]
    assert rope[0] == rope[1] == ROPE[kind]


def test_the_older_rope_scaling_dict_maps_and_wins_over_rope_parameters() -> None:
    """Hub configs from before transformers 5: rope_scaling with `type` and a top-level rope_theta."""
    hf = {**hf_config(tiny_model("llama")), "rope_theta": 500000.0,
          "rope_scaling": {"type": "linear", "factor": 2.0}, "rope_parameters": {"rope_type": "default"}}
    model = model_config_from_hf(hf)
    assert (model.rope_scaling_type, model.rope_scaling_factor, model.rotary_base) == ("linear", 2.0, 500000.0)


@pytest.mark.parametrize("rope, message", [
    ({"rope_type": "dynamic", "factor": 2.0}, "rope_type='dynamic' is not supported; allowed: 'default', 'linear', "
                                              "'llama3', 'yarn'"),
    ({"rope_type": "longrope", "short_factor": [1.0], "long_factor": [2.0]}, "rope_type='longrope' is not supported"),
    ({**ROPE["yarn"], "truncate": False}, "truncate=False is not supported"),
    ({**ROPE["linear"], "partial_rotary_factor": 0.5}, "partial_rotary_factor=0.5 is not supported"),
    ({**ROPE["llama3"], "mscale": 1.0}, "rope_parameters mscale=1.0 is not supported with rope_type='llama3'"),
])
def test_from_hf_refuses_rope_it_does_not_compute_with_one_line(tmp_path: Path, capsys, rope: dict,
                                                                message: str) -> None:
    config = {**hf_config(tiny_model("llama")), "rope_parameters": {"rope_theta": 10000.0, **rope}}
    tmp_path.joinpath("config.json").write_text(json.dumps(config))
    assert convert_checkpoint.main(["from-hf", str(tmp_path), "--out", str(tmp_path / "out")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines


@pytest.mark.parametrize("fields, message", [
    ({"rope_scaling_type": "dynamic"}, "--rope-scaling-type=dynamic is unknown; allowed: none, linear, llama3, yarn"),
    ({"rope_scaling_type": "linear", "rope_scaling_factor": 0.0}, "--rope-scaling-factor=0.0 must be a positive"),
    ({"rope_scaling_type": "llama3", "rope_scaling_factor": 8.0},
     "--rope-scaling-original-max-position-embeddings=None must be a positive"),
    ({"family": "gpt2", "rope_scaling_type": "linear", "rope_scaling_factor": 2.0},
     "--rope-scaling-type=linear is for the llama family (gpt2 learns its positions)"),
    ({"rope_scaling_factor": 2.0}, "--rope-scaling-factor needs --rope-scaling-type"),
    ({"rope_scaling_type": "linear", "rope_scaling_factor": 2.0, "rope_scaling_original_max_position_embeddings": 8},
     "--rope-scaling-original-max-position-embeddings is for --rope-scaling-type llama3 or yarn"),
    ({"rope_scaling_type": "llama3", "rope_scaling_factor": 8.0, "rope_scaling_original_max_position_embeddings": 8,
      "rope_scaling_high_freq_factor": 1.0}, "--rope-scaling-high-freq-factor=1.0 must exceed"),
    ({"rope_scaling_type": "llama3", "rope_scaling_factor": 8.0, "rope_scaling_original_max_position_embeddings": 8,
      "rope_scaling_beta_fast": 8.0}, "--rope-scaling-beta-fast is for --rope-scaling-type yarn"),
    ({"rope_scaling_type": "yarn", "rope_scaling_factor": 8.0, "rope_scaling_original_max_position_embeddings": 8,
      "rope_scaling_mscale": 1.0}, "--rope-scaling-mscale and --rope-scaling-mscale-all-dim go together"),
    ({"rope_scaling_type": "yarn", "rope_scaling_factor": 8.0, "rope_scaling_original_max_position_embeddings": 8,
      "rope_scaling_beta_slow": 40.0}, "--rope-scaling-beta-fast=32.0 must exceed --rope-scaling-beta-slow=40.0"),
])
def test_bad_rope_scaling_flags_are_one_line_errors(fields: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(message)) as error:
        tiny_model(**fields).validate()
    assert "\n" not in str(error.value)
