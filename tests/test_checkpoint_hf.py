"""Hugging Face export and import: a model trained at tp2 x pp2 loads in `transformers` with our
logits, and importing it back reproduces them; one spawn (4 ranks) trains both families."""
from __future__ import annotations

import dataclasses
import json
import re
import sys
from pathlib import Path

import pytest
import torch
import transformers

from helpers.checkpoint_steps import layout_config, train_jobs
from helpers.tiny import tiny_model
from megatron_lite.checkpointing import latest_iteration, read_checkpoint
from megatron_lite.checkpointing.reshard import load_weights
from megatron_lite.config import ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.hf.convert import from_hf_state, to_hf_state
from megatron_lite.hf.families import hf_config, model_config_from_hf
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.training.loop import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402

FAMILIES = ("llama", "gpt2")


def our_logits(load: Path, tokens: torch.Tensor) -> torch.Tensor:
    """Logits of the single-device model holding the checkpoint's weights."""
    full = read_checkpoint(load, latest_iteration(load))
    config = layout_config(full.config["model"]["family"])
    model = GPTModel(config.model)
    load_weights(full.model, [model])
    model.eval()
    with torch.no_grad():
        return model(tokens)


def saved_format(family: str) -> str:
    """Each format once: llama's checkpoints (trained and imported) are torch_dist, gpt2's torch."""
    return {"llama": "torch_dist", "gpt2": "torch"}[family]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    run_on_ranks(train_jobs, 4, [(layout_config(f, Layout(tp=2, pp=2)).updated(train={"ckpt_format": saved_format(f)}),
                                  2, None, str(root / f)) for f in FAMILIES])
    return root


@pytest.mark.parametrize("family", FAMILIES)
def test_export_matches_transformers_and_import_round_trips(trained: Path, tmp_path: Path, family: str) -> None:
    hf_dir, back = tmp_path / "hf", tmp_path / "back"
    # A tiny shard limit forces the sharded layout (index + several files) that large models get.
    assert convert_checkpoint.main(["to-hf", "--load", str(trained / family), "--out", str(hf_dir),
                                    "--max-shard-size-gb", str(40_000 / 2**30)]) == 0
    index = json.loads((hf_dir / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    tokens = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    ours = our_logits(trained / family, tokens)
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    expected = {"llama": "LlamaForCausalLM", "gpt2": "GPT2LMHeadModel"}[family]
    assert type(hf).__name__ == expected
    with torch.no_grad():
        theirs = hf(tokens).logits
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-4)

    # tp for llama; tp x pp for gpt2 (each rank reads its slices of the transposed Conv1D weights and
    # of c_attn's [q; k; v], and the last stage holds a copy of the tied embedding).
    tp, pp = ("2", "1") if family == "llama" else ("2", "2")
    assert convert_checkpoint.main(["from-hf", str(hf_dir), "--out", str(back), "--tp", tp, "--pp", pp,
                                    "--make-vocab-size-divisible-by", "8", "--ckpt-format", saved_format(family)]) == 0
    assert (back / "iter_0000000" / "metadata.json").exists() == (family == "llama")
    torch.testing.assert_close(our_logits(back, tokens), ours, rtol=0, atol=1e-6)
    # pretrain accepts the import: iteration 0, fresh optimizer.
    config = layout_config(family).updated(train={"train_iters": 1, "load": str(back)})
    result = pretrain(config)
    assert len(result["losses"]) == 1 and result["iteration"] == 1


@pytest.mark.parametrize("family", FAMILIES)
def test_byte_tokenizer_export_generates_with_transformers(trained: Path, tmp_path: Path, family: str,
                                                          capsys) -> None:
    """The byte tokenizer gets files, and generate's eos is our eod (not GPT-2's default 50256)."""
    assert convert_checkpoint.main(["to-hf", "--load", str(trained / family), "--out", str(tmp_path)]) == 0
    line = "tokenizer: ByteTokenizer as tokenizer.json, tokenizer_config.json (eos 256, pad 257)"
    assert line in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json",
                                                          "tokenizer_config.json"]
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["eos_token_id"], config["pad_token_id"], config["bos_token_id"]) == (256, 257, 256)
    model_config_from_hf(config)  # from-hf takes them: they change nothing the model computes
    text = "héllo wörld — 你好\n"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert tokenizer(text)["input_ids"] == list(text.encode()) and tokenizer.decode(list(text.encode())) == text
    generator = transformers.pipeline("text-generation", model=str(tmp_path), dtype=torch.float32)
    generation = generator.model.generation_config
    assert (generation.eos_token_id, generation.pad_token_id, generation.bos_token_id) == (256, 257, 256)
    # The tiny models' context is 16 positions.
    generated = generator("héllo", max_new_tokens=4, do_sample=False)[0]["generated_text"]
    assert isinstance(generated, str) and generated.startswith("héllo")


def _perturbed(config) -> GPTModel:
    """A one-device model of `config`, initialised and then moved off the init's round values
    (unit norm weights, zero biases), so a mapping that mixed them up would show."""
    model = GPTModel(config)
    init_weights(model, config, seed=0)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "layernorm" in name or name.endswith("bias"):
                param.add_(0.1 * torch.randn(param.shape, generator=gen))
    return model.eval()


@pytest.mark.parametrize("architecture, model", [
    ("LlamaForCausalLM", {"kv_channels": 16}), ("Qwen2ForCausalLM", {"add_qkv_bias": True}),
    ("Qwen3ForCausalLM", {"qk_layernorm": True, "kv_channels": 16})])
def test_dense_llama_variants_map_to_their_hf_family(architecture: str, model: dict) -> None:
    """Wider heads, q/k/v biases, q/k norms: the family hf_config names computes our logits
    (fp32, 1e-4), and its config and weights map back to the same model bit for bit."""
    config = tiny_model("llama", **model)
    ours = _perturbed(config)
    state = {name: t[:config.vocab_size] if name in ("word_embeddings.weight", "output_layer.weight") else t
             for name, t in ours.state_dict().items()}
    hf_json = hf_config(config)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_json)).eval()
    assert type(hf).__name__ == architecture
    hf.load_state_dict(to_hf_state(state, config), strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, ours(tokens), rtol=0, atol=1e-4)
    back = model_config_from_hf(hf_json, config.make_vocab_size_divisible_by)
    assert dataclasses.replace(back, fused_kernels=config.fused_kernels) == config
    again = from_hf_state(to_hf_state(state, config), back)
    assert again.keys() == state.keys() and all(torch.equal(again[k], state[k]) for k in state)


def test_layernorm_1p_exports_gamma_and_imports_it_back() -> None:
    """A zero-centred model (--apply-layernorm-1p) writes HF's plain gamma = 1 + w: Qwen3 (q/k norms too) computes
    our logits; read back into the zero-centred model each norm weight is w again, and the plain import computes
    the same logits. Partial RoPE has no HF family: refused in one line."""
    config = tiny_model("llama", qk_layernorm=True, kv_channels=16, apply_layernorm_1p=True)
    ours = _perturbed(config)
    state = {name: t[:config.vocab_size] if name in ("word_embeddings.weight", "output_layer.weight") else t
             for name, t in ours.state_dict().items()}
    exported = to_hf_state(state, config)
    torch.testing.assert_close(exported["model.norm.weight"], state["final_layernorm.weight"] + 1)
    hf_json = hf_config(config)
    hf = transformers.AutoModelForCausalLM.from_config(transformers.AutoConfig.for_model(**hf_json)).eval()
    hf.load_state_dict(exported, strict=True)
    tokens = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = ours(tokens)
        torch.testing.assert_close(hf(tokens).logits, expected, rtol=0, atol=1e-4)
    again = from_hf_state(exported, config)
    for name, tensor in state.items():
        torch.testing.assert_close(again[name], tensor, rtol=0, atol=1e-7)
    plain = model_config_from_hf(hf_json, config.make_vocab_size_divisible_by)
    assert not plain.apply_layernorm_1p
    imported = GPTModel(plain).eval()
    imported.load_state_dict({**from_hf_state(exported, plain), **{
        name: ours.state_dict()[name] for name in ("word_embeddings.weight", "output_layer.weight")}})
    with torch.no_grad():
        torch.testing.assert_close(imported(tokens), expected, rtol=0, atol=1e-5)
    with pytest.raises(ConfigError, match=re.escape("--rotary-percent=0.5: no Hugging Face family here represents "
                                                    "partial RoPE")):
        hf_config(dataclasses.replace(config, rotary_percent=0.5))


@pytest.mark.parametrize("fields, message", [
    ({"attention_bias": True}, "attention_bias=True is not supported"),
    ({"model_type": "gemma"}, "model_type=gemma is not supported; allowed: llama, mistral, qwen2"),
    ({"model_type": "qwen2", "layer_types": ["full_attention", "chunked_attention"]},
     "layer_types=['full_attention', 'chunked_attention'] is not supported (full_attention or sliding_attention for "
     "each of the 2 layers)"),
    ({"model_type": "qwen2_moe", "use_sliding_window": True}, "use_sliding_window=True is not supported"),
])
def test_hf_configs_we_cannot_compute_are_refused_naming_the_field(fields: dict, message: str) -> None:
    hf_json = {**hf_config(tiny_model("llama")), **fields}
    with pytest.raises(ConfigError, match=re.escape(message)):
        model_config_from_hf(hf_json)
