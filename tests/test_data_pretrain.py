"""The whole data path as a user runs it: (train a tokenizer,) preprocess with 2 workers, pretrain on
the result; the built-in corpus through the same files; and one-line errors for bad data."""
from __future__ import annotations

import json
import math
import random
import re
import sys
from pathlib import Path

import numpy as np
import pytest
from test_cli import LOG_LINE, TINY, run

import pretrain_gpt
from helpers.commands import ROOT, run_command
from megatron_lite.data.default_corpus import build_default_corpus, stdlib_sources
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder
from tools import preprocess_data

LOSS = re.compile(r"\| lm loss: ([\d.E+-]+) \|")
TRAIN = TINY + ["--train-iters", "8", "--eval-interval", "8", "--lr", "1e-2", "--lr-warmup-iters", "2",
                "--split", "90,10,0"]


def tool(name: str, *args: str) -> None:
    result = run_command([sys.executable, str(ROOT / "tools" / name), *args])
    assert result.returncode == 0, result.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """About 300 KB of JSON lines: sentences of a small grammar, so a tiny model learns fast."""
    rng = random.Random(0)
    subjects = ["the cat", "a dog", "my neighbour", "the old sailor", "our teacher", "a small bird"]
    verbs = ["sees", "likes", "paints", "follows", "remembers", "builds"]
    objects = ["a red boat", "the quiet river", "an open window", "the long road", "a wooden house"]
    lines = []
    while sum(map(len, lines)) < 300_000:
        text = " ".join(f"{rng.choice(subjects)} {rng.choice(verbs)} {rng.choice(objects)}."
                        for _ in range(rng.randint(5, 40)))
        lines.append(json.dumps({"text": text}) + "\n")
    path = tmp_path_factory.mktemp("corpus") / "corpus.jsonl"
    path.write_text("".join(lines))
    return path


@pytest.mark.parametrize("tokenizer_type", ["ByteTokenizer", "HuggingFaceTokenizer"])
def test_preprocess_then_pretrain(corpus, tmp_path, tokenizer_type):
    tokenizer_flags = ["--tokenizer-type", tokenizer_type]
    if tokenizer_type == "HuggingFaceTokenizer":
        tool("train_tokenizer.py", "--input", str(corpus), "--tokenizer-type", tokenizer_type, "--vocab-size", "512",
             "--output", str(tmp_path / "tokenizer.json"))
        tokenizer_flags += ["--tokenizer-model", str(tmp_path / "tokenizer.json")]
    tool("preprocess_data.py", "--input", str(corpus), "--output-prefix", str(tmp_path / "corpus"), "--append-eod",
         "--workers", "2", *tokenizer_flags)

    result = run(TRAIN + ["--data-path", str(tmp_path / "corpus_text_document"), *tokenizer_flags])
    assert result.returncode == 0, result.stderr
    assert f"> data: --data-path {tmp_path / 'corpus_text_document'}; {tokenizer_type} (vocab " in result.stdout
    assert [m.group(1) for m in map(LOG_LINE.search, result.stdout.splitlines()) if m] == ["2", "4", "6", "8"]
    losses = [float(m.group(1)) for m in map(LOSS.search, result.stdout.splitlines()) if m]
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0] - 0.5, losses
    assert "validation loss at iteration 8 | lm loss value:" in result.stdout
    assert (tmp_path / "cache").is_dir()  # the sample indices, beside the data as in Megatron


def test_built_in_corpus_is_what_preprocess_data_writes(tmp_path):
    max_bytes = 200_000
    prefix, description = build_default_corpus(tmp_path / "cache", max_bytes)
    assert description.startswith("built-in corpus: ")
    files = [str(path) for path in stdlib_sources(max_bytes)]
    preprocess_data.main(["--input", *files, "--output-prefix", str(tmp_path / "stdlib"), "--append-eod"])
    for suffix in (".bin", ".idx"):
        assert Path(prefix + suffix).read_bytes() == (tmp_path / f"stdlib_text_document{suffix}").read_bytes()
    # Cached: a second call finds the files and rewrites nothing; nothing temporary is left.
    modified = Path(prefix + ".bin").stat().st_mtime_ns
    assert build_default_corpus(tmp_path / "cache", max_bytes)[0] == prefix
    assert Path(prefix + ".bin").stat().st_mtime_ns == modified
    assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [Path(prefix).name + ".bin",
                                                                      Path(prefix).name + ".idx"]


def write_dataset(prefix: Path, documents: list[list[int]]) -> str:
    builder = IndexedDatasetBuilder(str(prefix) + ".bin", np.uint16)
    for document in documents:
        builder.add_document(document)
    builder.finalize(str(prefix) + ".idx")
    return str(prefix)


def test_blended_data_paths_train(tmp_path, capsys):
    rng = np.random.default_rng(0)
    a, b = (write_dataset(tmp_path / name, [rng.integers(0, 256, 100).tolist() for _ in range(20)]) for name in "ab")
    assert pretrain_gpt.main(TRAIN + ["--data-path", "0.7", a, "0.3", b]) == 0
    out = capsys.readouterr().out
    assert f"> data: --data-path 0.7 {a} 0.3 {b}; ByteTokenizer (vocab 258); 32 train and 8 valid samples" in out
    assert len([line for line in out.splitlines() if LOG_LINE.search(line)]) == 4


def truncated(tmp: Path) -> list[str]:
    prefix = write_dataset(tmp / "cut", [[1, 2, 3]] * 50)
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(298)
    return ["--data-path", prefix]


def foreign(tmp: Path) -> list[str]:
    prefix = write_dataset(tmp / "foreign", [[1, 2, 3]] * 50)
    Path(prefix + ".idx").write_bytes(b"a text file that is not a Megatron index at all\n")
    return ["--data-path", prefix]


BAD_INPUT = {  # case: (flags made in tmp_path, what follows "pretrain_gpt.py: error: ")
    "missing": (lambda tmp: ["--data-path", str(tmp / "nothing")], r".*/nothing\.idx: no such file .*"),
    "empty": (lambda tmp: ["--data-path", write_dataset(tmp / "empty", [])],
              r".*/empty: the train split of --split 90,10,0 gets no documents \(the dataset has 0\)"),
    "truncated": (truncated, r".*/cut\.bin: size 298 bytes, but .*/cut\.idx says 300 \(truncated.*"),
    "foreign": (foreign, r".*/foreign\.idx: bad magic b'a text fi', expected .*"),
    "shorter than a sample": (lambda tmp: ["--data-path", write_dataset(tmp / "short", [[1]] * 10)],
                              r".*/short: the train split has 9 tokens in 9 documents, fewer than one sample of "
                              r"seq_length\+1 = 17 tokens"),
    "another tokenizer's ids": (lambda tmp: ["--data-path", write_dataset(tmp / "bpe", [[5, 300, 7]] * 50)],
                                r".*/bpe\.bin holds token id 300, beyond the vocabulary of ByteTokenizer \(258 ids\): "
                                r"preprocess and train with the same --tokenizer-type and --tokenizer-model"),
    "missing tokenizer": (lambda tmp: ["--data-path", write_dataset(tmp / "ok", [[1, 2, 3]] * 50), "--tokenizer-type",
                                       "HuggingFaceTokenizer", "--tokenizer-model", str(tmp / "tokenizer.json")],
                          r"--tokenizer-model .*/tokenizer\.json for HuggingFaceTokenizer does not exist"),
    "tokenizer without data": (lambda tmp: ["--tokenizer-type", "SentencePieceTokenizer"],
                               r"--tokenizer-type=SentencePieceTokenizer needs --data-path \(data preprocessed with "
                               r"it\) or --mock-data; the built-in corpus is byte-level"),
}


@pytest.mark.parametrize("case", BAD_INPUT)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, case):
    make_flags, message = BAD_INPUT[case]
    assert pretrain_gpt.main(TRAIN + make_flags(tmp_path)) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1 and re.fullmatch("pretrain_gpt.py: error: " + message, err.strip()), err
