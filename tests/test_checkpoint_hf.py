"""Hugging Face export and import: a model trained at tp2 x pp2 loads in `transformers` with our
logits, and importing it back reproduces them; one spawn (4 ranks) trains both families."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers

from megatron_lite.checkpointing import latest_iteration, read_checkpoint
from megatron_lite.model.gpt import GPTModel
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.layout import Layout
from megatron_lite.reshard import load_weights
from megatron_lite.training import pretrain
from helpers.checkpoint_steps import layout_config, train_jobs

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


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trained")
    run_on_ranks(train_jobs, 4, [(layout_config(f, Layout(tp=2, pp=2)), 2, None, str(root / f)) for f in FAMILIES])
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

    # Two ranks: tp for llama, pp for gpt2 (whose last stage holds a copy of the tied embedding).
    tp, pp = ("2", "1") if family == "llama" else ("1", "2")
    assert convert_checkpoint.main(["from-hf", str(hf_dir), "--out", str(back), "--tp", tp, "--pp", pp,
                                    "--make-vocab-size-divisible-by", "8"]) == 0
    torch.testing.assert_close(our_logits(back, tokens), ours, rtol=0, atol=1e-6)
    # pretrain accepts the import: iteration 0, fresh optimizer.
    config = layout_config(family)
    config.train.train_iters, config.train.load = 1, str(back)
    result = pretrain(config)
    assert len(result["losses"]) == 1 and result["iteration"] == 1


def test_byte_tokenizer_export_says_no_files(trained: Path, tmp_path: Path, capsys) -> None:
    assert convert_checkpoint.main(["to-hf", "--load", str(trained / "llama"), "--out", str(tmp_path)]) == 0
    assert "byte tokenizer, which has no files" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
