"""Tokenizers trained by tools/train_tokenizer.py, loaded by build_tokenizer, used by preprocess_data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from helpers.tokenizers import KINDS, VOCAB_SIZE, train_tokenizers, write_corpus
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.tokenizer import ByteTokenizer, build_tokenizer
from tools import preprocess_data

ROUND_TRIP_TEXTS = ["the quick brown fox", "  leading spaces,\ttabs\n\nand blank lines  ",
                    "naïve café 東京 ☃ 🎉 (never seen in training)", ""]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, list[str]]:
    """JSON lines and a text file of generated English-like text; the JSON documents."""
    root = tmp_path_factory.mktemp("tokenizer_corpus")
    return root, write_corpus(root)


@pytest.fixture(scope="module")
def trained(corpus, tmp_path_factory) -> dict[str, str]:
    """Each kind of tokenizer trained once on the corpus: name -> model path."""
    return train_tokenizers(corpus[0], tmp_path_factory.mktemp("tokenizers"))


@pytest.mark.parametrize("name", KINDS)
def test_trained_tokenizers_round_trip(trained, name):
    tokenizer = build_tokenizer(KINDS[name][0], trained[name])
    assert 256 < tokenizer.vocab_size <= VOCAB_SIZE
    assert len({tokenizer.eod, tokenizer.pad}) == 2 and max(tokenizer.eod, tokenizer.pad) < tokenizer.vocab_size
    for text in ROUND_TRIP_TEXTS:
        assert tokenizer.decode(tokenizer.encode(text)) == text
    assert tokenizer.decode(tokenizer.encode("lazy dog") + [tokenizer.eod, tokenizer.pad]) == "lazy dog"
    assert len(tokenizer.encode("the quick brown fox")) < len("the quick brown fox") // 2  # it learned merges


@pytest.mark.parametrize("name", KINDS)
def test_preprocess_with_a_trained_tokenizer(trained, corpus, tmp_path, name):
    root, texts = corpus
    tokenizer_type = KINDS[name][0]
    for workers in ("1", "2"):
        preprocess_data.main(["--input", str(root / "docs.jsonl"), "--output-prefix", str(tmp_path / workers),
                              "--tokenizer-type", tokenizer_type, "--tokenizer-model", trained[name],
                              "--append-eod", "--workers", workers])
    for suffix in (".bin", ".idx"):
        one, two = (tmp_path / f"{workers}_text_document{suffix}" for workers in "12")
        assert one.read_bytes() == two.read_bytes()
    tokenizer = build_tokenizer(tokenizer_type, trained[name])
    dataset = IndexedDataset(str(tmp_path / "2_text_document"))
    assert [tokenizer.decode(dataset[i].tolist()) for i in range(len(dataset))] == texts
    assert dataset[0].tolist() == tokenizer.encode(texts[0]) + [tokenizer.eod]


def test_a_transformers_folder_loads_like_its_tokenizer_json(trained, tmp_path):
    from transformers import PreTrainedTokenizerFast

    PreTrainedTokenizerFast(tokenizer_file=trained["byte-level-bpe"], eos_token="<|endoftext|>",
                            pad_token="<pad>").save_pretrained(str(tmp_path / "hf"))
    from_folder = build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "hf"))
    from_file = build_tokenizer("HuggingFaceTokenizer", trained["byte-level-bpe"])
    assert (from_folder.vocab_size, from_folder.eod, from_folder.pad) == (from_file.vocab_size, 0, 1)
    assert from_folder.encode(ROUND_TRIP_TEXTS[1]) == from_file.encode(ROUND_TRIP_TEXTS[1])


def test_bad_tokenizer_arguments_name_the_type_and_path(tmp_path):
    with pytest.raises(ValueError, match="unknown --tokenizer-type 'TikTokenizer'; choose one of"):
        build_tokenizer("TikTokenizer", None)
    with pytest.raises(ValueError, match="GPT2BPETokenizer needs --vocab-file and --merge-file"):
        build_tokenizer("GPT2BPETokenizer", vocab_file=str(tmp_path / "vocab.json"))
    with pytest.raises(ValueError, match="SentencePieceTokenizer needs --tokenizer-model"):
        build_tokenizer("SentencePieceTokenizer", None)
    with pytest.raises(FileNotFoundError, match="missing.model for SentencePieceTokenizer does not exist"):
        build_tokenizer("SentencePieceTokenizer", str(tmp_path / "missing.model"))
    (tmp_path / "garbage").write_text("not a tokenizer")
    for tokenizer_type in ("SentencePieceTokenizer", "HuggingFaceTokenizer"):
        with pytest.raises(ValueError, match=f"cannot load {tokenizer_type} from .*garbage"):
            build_tokenizer(tokenizer_type, str(tmp_path / "garbage"))
    from tokenizers import Tokenizer, models

    Tokenizer(models.BPE()).save(str(tmp_path / "no_eod.json"))
    with pytest.raises(ValueError, match="no_eod.json has none of the end-of-document tokens"):
        build_tokenizer("HuggingFaceTokenizer", str(tmp_path / "no_eod.json"))


def test_byte_tokenizer():
    tokenizer = build_tokenizer("ByteTokenizer", None)
    assert isinstance(tokenizer, ByteTokenizer)
    assert (tokenizer.vocab_size, tokenizer.eod, tokenizer.pad) == (258, 256, 257)
    assert tokenizer.decode(tokenizer.encode("héllo") + [tokenizer.eod]) == "héllo"


def _gpt2_files(tokenizer_json: str, folder: Path) -> tuple[str, str]:
    """GPT-2's two files, vocab.json and merges.txt, of a trained byte-level BPE."""
    model = json.loads(Path(tokenizer_json).read_text())
    vocab = {**model["model"]["vocab"], **{t["content"]: t["id"] for t in model["added_tokens"]}}
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["model"]["merges"]]
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    return str(folder / "vocab.json"), str(folder / "merges.txt")


def test_megatron_tokenizers_and_their_preprocess_flags(trained, corpus, tmp_path):
    """GPT2BPETokenizer (--vocab-file, --merge-file) encodes as transformers' GPT-2 tokenizer does;
    Llama2Tokenizer is the SentencePiece model with BOS first; NullTokenizer reads ids written as
    numbers. tools/preprocess_data.py takes the same flags (the GPT-2 type implied by the files)."""
    from transformers import GPT2TokenizerFast

    vocab_file, merge_file = _gpt2_files(trained["byte-level-bpe"], tmp_path)
    gpt2 = build_tokenizer("GPT2BPETokenizer", vocab_file=vocab_file, merge_file=merge_file)
    reference = GPT2TokenizerFast.from_pretrained(str(tmp_path))  # reads the folder's vocab.json and merges.txt
    for text in ROUND_TRIP_TEXTS:
        assert gpt2.encode(text) == reference.encode(text)
        assert gpt2.decode(gpt2.encode(text)) == text
    assert gpt2.eod == json.loads(Path(vocab_file).read_text())["<|endoftext|>"]
    llama2 = build_tokenizer("Llama2Tokenizer", trained["sentencepiece-bpe"])
    plain = build_tokenizer("SentencePieceTokenizer", trained["sentencepiece-bpe"])
    assert llama2.encode("lazy dog") == [llama2._sp.bos_id(), *plain.encode("lazy dog")] and llama2.eod == plain.eod
    null = build_tokenizer("NullTokenizer", vocab_size=10)
    assert (null.encode("3 1 4"), null.vocab_size, null.eod, null.decode([3, 10, 1])) == ([3, 1, 4], 11, 10, "3 1")

    root, texts = corpus
    (tmp_path / "ids.txt").write_text("3 1 4 1 5")
    runs = {"gpt2": (gpt2, ["--vocab-file", vocab_file, "--merge-file", merge_file], "docs.jsonl"),
            "llama2": (llama2, ["--tokenizer-type", "Llama2Tokenizer", "--tokenizer-model",
                                trained["sentencepiece-bpe"]], "docs.jsonl"),
            "null": (null, ["--tokenizer-type", "NullTokenizer", "--vocab-size", "10"], "ids.txt")}
    for name, (tokenizer, flags, source) in runs.items():
        folder = tmp_path if source == "ids.txt" else root
        preprocess_data.main(["--input", str(folder / source), "--output-prefix", str(tmp_path / name), *flags,
                              "--append-eod", "--workers", "2"])
        first = IndexedDataset(str(tmp_path / f"{name}_text_document"))[0].tolist()
        expected = "3 1 4 1 5" if source == "ids.txt" else texts[0]
        assert first == tokenizer.encode(expected) + [tokenizer.eod], name
