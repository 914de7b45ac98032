"""Tied embeddings from Hugging Face: a Llama or Qwen2 with tie_word_embeddings imports tied (our
logits, its parameter count) at tp 1 and at tp 2 x pp 2 (where the last stage holds a copy of the
table), exports back bit for bit, and brings its tokenizer along; an untied gpt2 is refused."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file

from helpers.tiny import TINY_FLAGS, tiny_model
from megatron_lite.checkpointing import latest_iteration, read_checkpoint
from megatron_lite.checkpointing.reshard import load_weights
from megatron_lite.config import ConfigError, ModelConfig
from megatron_lite.data.tokenizer import build_tokenizer
from megatron_lite.hf.convert import TOKENIZER_FILES
from megatron_lite.hf.families import hf_config, model_config_from_hf
from megatron_lite.hf.tokenizer import BYTE_EOD_TOKEN, BYTE_PAD_TOKEN, PROBE_TEXT, byte_level_tokenizer
from megatron_lite.model.gpt import GPTModel
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import pretrain

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402
import preprocess_data  # noqa: E402

VOCAB = 258  # the byte-level tokenizer's: 256 bytes, eod, pad
SHAPE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=16, rms_norm_eps=1e-6, tie_word_embeddings=True)
ARCHITECTURES = {"LlamaForCausalLM": transformers.LlamaConfig, "Qwen2ForCausalLM": transformers.Qwen2Config}
LAYOUTS = {"tp1": ("1", "1"), "tp2-pp2": ("2", "2")}


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Each architecture saved by save_pretrained with a byte-level tokenizer, its weights moved
    off the init's round values (unit norms, zero biases) so that a mixed-up mapping would show."""
    folders = {}
    gen = torch.Generator().manual_seed(0)
    for architecture, config_class in ARCHITECTURES.items():
        model = getattr(transformers, architecture)(config_class(**SHAPE))
        assert model.lm_head.weight is model.model.embed_tokens.weight
        with torch.no_grad():
            for param in model.parameters():
                param.add_(0.05 * torch.randn(param.shape, generator=gen))
        folder = tmp_path_factory.mktemp(architecture)
        model.save_pretrained(folder)
        tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(),
                                                         eos_token=BYTE_EOD_TOKEN, pad_token=BYTE_PAD_TOKEN)
        tokenizer.save_pretrained(folder)
        folders[architecture] = folder
    return folders


@pytest.fixture(scope="module")
def imported(hf_folders: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[tuple[str, str], Path]:
    """from-hf of each architecture at each layout."""
    out = {}
    for architecture, folder in hf_folders.items():
        for layout, (tp, pp) in LAYOUTS.items():
            out[architecture, layout] = tmp_path_factory.mktemp(f"{architecture}-{layout}")
            assert convert_checkpoint.main(["from-hf", str(folder), "--out", str(out[architecture, layout]),
                                            "--tp", tp, "--pp", pp, "--make-vocab-size-divisible-by", "8"]) == 0
    return out


CASES = [(a, layout) for a in ARCHITECTURES for layout in LAYOUTS]


@pytest.mark.parametrize("architecture, layout", CASES)
def test_tied_import_matches_transformers(hf_folders, imported, architecture: str, layout: str) -> None:
    """Our logits are transformers' (fp32, 1e-4), and the checkpoint holds one table: the HF
    model's parameter count, no output layer."""
    full = read_checkpoint(imported[architecture, layout], 0)
    config = ModelConfig(**full.config["model"])
    assert config.tie_embeddings and "output_layer.weight" not in full.model
    ours = GPTModel(config)
    load_weights(full.model, [ours])
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_folders[architecture], dtype=torch.float32)
    assert type(hf).__name__ == architecture
    assert sum(t.numel() for t in full.model.values()) == sum(p.numel() for p in hf.parameters())
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(tokens), hf.eval()(tokens).logits, rtol=0, atol=1e-4)


@pytest.mark.parametrize("architecture, layout", CASES)
def test_tied_export_round_trips_bit_exactly(hf_folders, imported, tmp_path: Path, architecture: str,
                                             layout: str) -> None:
    """to-hf writes what save_pretrained wrote: the same tensors (no lm_head.weight) and a tied config."""
    load = imported[architecture, layout]
    assert latest_iteration(load) == 0
    assert convert_checkpoint.main(["to-hf", "--load", str(load), "--out", str(tmp_path)]) == 0
    original = json.loads((hf_folders[architecture] / "config.json").read_text())
    exported = json.loads((tmp_path / "config.json").read_text())
    assert exported["tie_word_embeddings"] is True
    assert model_config_from_hf(exported) == model_config_from_hf(original)
    theirs, ours = load_file(hf_folders[architecture] / "model.safetensors"), load_file(tmp_path / "model.safetensors")
    assert "lm_head.weight" not in theirs and ours.keys() == theirs.keys()
    assert all(torch.equal(ours[name], theirs[name]) for name in theirs)


def test_from_hf_copies_the_tokenizer(hf_folders, tmp_path: Path, capsys) -> None:
    """from-hf of a folder with a tokenizer puts a copy in the checkpoint, and says so, that
    build_tokenizer loads with the folder's ids, eod and pad (what preprocess_data.py and
    pretrain_gpt.py use)."""
    folder = hf_folders["LlamaForCausalLM"]
    assert convert_checkpoint.main(["from-hf", str(folder), "--out", str(tmp_path)]) == 0
    tokenizer = tmp_path / convert_checkpoint.TOKENIZER_DIR
    names = [name for name in TOKENIZER_FILES if (folder / name).exists()]
    assert "tokenizer.json" in names and sorted(p.name for p in tokenizer.iterdir()) == sorted(names)
    assert (f"tokenizer: copied {', '.join(names)} to {tokenizer}: preprocess and train with --tokenizer-type "
            f"HuggingFaceTokenizer --tokenizer-model {tokenizer}") in capsys.readouterr().out
    copy, source = (build_tokenizer("HuggingFaceTokenizer", str(path)) for path in (tokenizer, folder))
    assert copy.encode(PROBE_TEXT) == source.encode(PROBE_TEXT) == list(PROBE_TEXT.encode())
    assert (copy.eod, copy.pad, copy.vocab_size) == (source.eod, source.pad, VOCAB) == (256, 257, VOCAB)

    # The flow the line names: data preprocessed with the copy trains the import, which stays tied.
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": PROBE_TEXT * 4}) + "\n" for _ in range(8)))
    tokenizer_flags = ["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", str(tokenizer)]
    preprocess_data.main(["--input", str(tmp_path / "docs.jsonl"), "--output-prefix", str(tmp_path / "docs"),
                          "--append-eod", *tokenizer_flags])
    config = parse_args([*TINY_FLAGS, "--load", str(tmp_path), "--save", str(tmp_path / "trained"), *tokenizer_flags,
                         "--data-path", str(tmp_path / "docs_text_document"), "--train-iters", "1",
                         "--eval-interval", "0"])
    result = pretrain(config)
    assert result["iteration"] == 1 and result["config"].model.tie_embeddings
    trained = read_checkpoint(tmp_path / "trained", 1)
    assert trained.config["model"]["untie_embeddings_and_output_weights"] is False
    assert "output_layer.weight" not in trained.model


def test_an_untied_gpt2_is_refused() -> None:
    """GPT2LMHeadModel is always tied: neither the flag nor a config.json can untie our gpt2."""
    with pytest.raises(ConfigError, match="--untie-embeddings-and-output-weights is for the llama family"):
        parse_args(["--model", "tiny-gpt2", "--untie-embeddings-and-output-weights"])
    hf_json = {**hf_config(tiny_model("gpt2")), "tie_word_embeddings": False}
    with pytest.raises(ConfigError, match="tie_word_embeddings=False is not supported"):
        model_config_from_hf(hf_json)
