"""The tokenizer of a Hugging Face export (megatron_lite/hf/tokenizer.py): for every tokenizer
type, AutoTokenizer on the exported folder gives our ids, eos and pad, and decodes back."""
from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from helpers.tokenizers import KINDS, train_tokenizers, write_corpus
from megatron_lite.config import ConfigError
from megatron_lite.data.tokenizer import ByteTokenizer, Tokenizer, build_tokenizer
from megatron_lite.hf.tokenizer import check_export, export_tokenizer

# Multi-byte UTF-8, runs of spaces, tabs and newlines, pieces the models never saw, and eod's
# name in text (ours: its bytes for the byte tokenizer, eod for a tokenizer.json that has it).
TEXTS = ["the quick brown fox", "héllo wörld — 你好", "  leading spaces,\ttabs\n\nand blank lines  \n",
         "naïve café 東京 ☃ 🎉 x", "a<|endoftext|>b", " ", ""]
# name: (--tokenizer-type, a file of which kind, or None for no file); the folder is a transformers
# save of the byte-level BPE with no pad token, which we then pad with eod.
EXPORTS = {"byte": ("ByteTokenizer", None), "transformers-folder": ("HuggingFaceTokenizer", "folder"),
           **{name: (kind, name) for name, (kind, _, _) in KINDS.items()}}


@pytest.fixture(scope="module")
def tokenizer_models(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("corpus")
    write_corpus(root)
    models = train_tokenizers(root, tmp_path_factory.mktemp("tokenizers"))
    folder = tmp_path_factory.mktemp("folder")
    PreTrainedTokenizerFast(tokenizer_file=models["byte-level-bpe"], eos_token="<|endoftext|>").save_pretrained(folder)
    return {**models, "folder": str(folder)}


def export(kind: str, model: str | None, out: Path) -> tuple[Tokenizer, dict[str, int], str]:
    """Our tokenizer, and what exporting it for a model of its vocabulary returned."""
    ours = build_tokenizer(kind, model)
    return ours, *export_tokenizer({"tokenizer_type": kind, "tokenizer_model": model}, ours.vocab_size, out)


@pytest.mark.parametrize("name", EXPORTS)
def test_auto_tokenizer_on_the_export_encodes_like_ours(tokenizer_models, tmp_path: Path, name: str) -> None:
    kind, model = EXPORTS[name]
    ours, token_ids, line = export(kind, tokenizer_models[model] if model else None, tmp_path)
    assert token_ids == {"bos_token_id": ours.eod, "eos_token_id": ours.eod, "pad_token_id": ours.pad}
    assert f"(eos {ours.eod}, pad {ours.pad})" in line
    files = {p.name for p in tmp_path.iterdir()}
    assert {"tokenizer.json", "tokenizer_config.json"} <= files
    assert ("tokenizer.model" in files) == (kind == "SentencePieceTokenizer")  # the original, kept

    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert (theirs.eos_token_id, theirs.pad_token_id) == (ours.eod, ours.pad)
    for text in TEXTS:
        ids = theirs.encode(text, add_special_tokens=False)
        assert ids == ours.encode(text), text
        assert theirs(text)["input_ids"] == ids  # nothing (a BOS) added by default either
        assert theirs.decode(ids + [ours.eod], skip_special_tokens=True) == ours.decode(ids)
    assert theirs.decode(theirs.encode(TEXTS[2], add_special_tokens=False)) == TEXTS[2]


def test_the_byte_export_maps_every_byte_to_its_own_id(tmp_path: Path) -> None:
    ours = export("ByteTokenizer", None, tmp_path)[0]
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert len(theirs) == ours.vocab_size
    assert theirs.convert_ids_to_tokens([256, 257]) == ["<|endoftext|>", "<pad>"]
    # Every code point below U+0800 and a stride above it: all UTF-8 lead and continuation bytes.
    text = "".join(map(chr, [*range(0x800), *range(0x800, 0xD800, 97), *range(0xE000, 0x110000, 4099)]))
    assert set(ours.encode(text)) == set(range(256)) - {0xC0, 0xC1, *range(0xF5, 0x100)}
    assert theirs.encode(text, add_special_tokens=False) == ours.encode(text)
    # Bytes no UTF-8 text has, alone or cut out of a character, decode to U+FFFD as ours do.
    assert [theirs.decode([b]) for b in range(256)] == [ours.decode([b]) for b in range(256)]


def test_an_export_that_encodes_otherwise_is_refused(tokenizer_models, tmp_path: Path) -> None:
    export("SentencePieceTokenizer", tokenizer_models["sentencepiece-bpe"], tmp_path)
    with pytest.raises(ConfigError, match=r"differs from the run's: eos id 2 \(ours 256\); pad id 3 \(ours 257\); ids"):
        check_export(ByteTokenizer(), tmp_path)


def test_a_tokenizer_file_that_is_gone_is_named(tmp_path: Path) -> None:
    gone = str(tmp_path / "moved.model")
    with pytest.raises(ConfigError, match="cannot export the run's tokenizer: .*moved.model"):
        export_tokenizer({"tokenizer_type": "SentencePieceTokenizer", "tokenizer_model": gone}, 320, tmp_path)


def test_a_model_of_another_vocabulary_gets_no_tokenizer(tmp_path: Path) -> None:
    """An import from Hugging Face: its checkpoint names no tokenizer, so the default (bytes) is not its."""
    token_ids, line = export_tokenizer({"tokenizer_type": "ByteTokenizer"}, 32000, tmp_path)
    assert token_ids == {} and list(tmp_path.iterdir()) == []
    assert line.startswith("tokenizer: none written: the model has 32000 tokens and the checkpoint's ByteTokenizer 258")


@pytest.mark.parametrize("name", ["sentencepiece-bpe", "sentencepiece-unigram"])
def test_sentencepiece_control_piece_names_in_text(tokenizer_models, tmp_path: Path, name: str) -> None:
    """SentencePiece reads "</s>" in text as text, and so does a BPE export; tokenizers' Unigram
    model matches every piece of its vocabulary, control pieces too (docs/checkpoints.md)."""
    ours = export("SentencePieceTokenizer", tokenizer_models[name], tmp_path)[0]
    ids = AutoTokenizer.from_pretrained(tmp_path).encode("a</s>b<pad>c", add_special_tokens=False)
    if name == "sentencepiece-bpe":
        assert ids == ours.encode("a</s>b<pad>c")
    else:
        assert {ours.eod, ours.pad} <= set(ids) and not {ours.eod, ours.pad} & set(ours.encode("a</s>b<pad>c"))


def test_exporting_again_into_the_folder_replaces_the_tokenizer(tokenizer_models, tmp_path: Path) -> None:
    """Over an earlier export of another tokenizer, and from a tokenizer.model in the folder itself."""
    export("ByteTokenizer", None, tmp_path)
    for model in (tokenizer_models["sentencepiece-unigram"], str(tmp_path / "tokenizer.model")):
        ours = export("SentencePieceTokenizer", model, tmp_path)[0].encode(TEXTS[2])
        assert AutoTokenizer.from_pretrained(tmp_path).encode(TEXTS[2], add_special_tokens=False) == ours
