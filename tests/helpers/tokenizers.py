"""Small tokenizers of every trainable kind, trained by tools/train_tokenizer.py on generated text."""
from __future__ import annotations

import json
import random
from pathlib import Path

from tools import train_tokenizer

VOCAB_SIZE = 320
KINDS = {  # name: (--tokenizer-type, extra flags, output file)
    "sentencepiece-bpe": ("SentencePieceTokenizer", ["--model-type", "bpe"], "bpe.model"),
    "sentencepiece-unigram": ("SentencePieceTokenizer", ["--model-type", "unigram"], "unigram.model"),
    "byte-level-bpe": ("HuggingFaceTokenizer", [], "tokenizer.json"),
}


def write_corpus(root: Path) -> list[str]:
    """docs.jsonl and notes.txt of English-like text in `root`; returns the JSON documents."""
    rng = random.Random(0)
    # Common words to learn merges from, and enough rare ones that even a unigram model
    # finds VOCAB_SIZE pieces worth keeping.
    common = "the quick brown fox jumps over a lazy dog".split()
    rare = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9))) for _ in range(300)]
    texts = [" ".join(rng.choice(common if rng.random() < 0.5 else rare) for _ in range(60)) for _ in range(150)]
    (root / "docs.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    (root / "notes.txt").write_text("\n".join(texts[:20]))
    return texts


def train_tokenizers(corpus: Path, out: Path) -> dict[str, str]:
    """Each of KINDS trained once on the files in `corpus`: name -> model path in `out`."""
    for tokenizer_type, flags, filename in KINDS.values():
        train_tokenizer.main(["--input", str(corpus / "*"), "--tokenizer-type", tokenizer_type, *flags,
                              "--vocab-size", str(VOCAB_SIZE), "--output", str(out / filename)])
    return {name: str(out / filename) for name, (_, _, filename) in KINDS.items()}
