"""Train a tokenizer on local text: SentencePiece (BPE or unigram) or a byte-level BPE (`tokenizers`).

    python tools/train_tokenizer.py --input 'corpus/*.jsonl' --tokenizer-type HuggingFaceTokenizer \\
        --vocab-size 32000 --output tokenizer.json
    python tools/train_tokenizer.py --input corpus/ --tokenizer-type SentencePieceTokenizer \\
        --model-type unigram --vocab-size 32000 --output spm.model

It reads the same inputs as preprocess_data.py, skipping and counting bad records. Both
kinds can encode any text and decode it back unchanged: byte-level BPE by construction,
SentencePiece through byte fallback and identity normalisation. Special ids:
SentencePiece <unk>=0 <s>=1 </s>=2 (end of document) <pad>=3; byte-level BPE
<|endoftext|>=0 (end of document) <pad>=1. Load the result with build_tokenizer().
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator
from pathlib import Path

# Lets `python tools/train_tokenizer.py` run from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite.data.corpus_reader import BadRecordError, expand_inputs, iter_records, record_texts  # noqa: E402
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer  # noqa: E402

BYTE_LEVEL_SPECIAL_TOKENS = ["<|endoftext|>", "<pad>"]
# Both kinds hold the 256 byte values as tokens, plus their special tokens.
MIN_VOCAB_SIZE = 256 + 4


def _texts(args: argparse.Namespace, skipped: list[str]) -> Iterator[str]:
    for record in iter_records(expand_inputs(args.input), args.json_keys, args.dataset_split):
        try:
            texts = record_texts(record, args.json_keys)
        except BadRecordError as e:
            skipped.append(str(e))
            continue
        yield from texts


def train_sentencepiece(texts: Iterator[str], args: argparse.Namespace) -> str:
    import sentencepiece

    prefix = args.output.removesuffix(".model")
    # SentencePiece learns from sentences and drops any longer than 4192 bytes, so documents
    # go in line by line.
    lines = (line for text in texts for line in text.splitlines() if line.strip())
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=lines, model_prefix=prefix, model_type=args.model_type,
        vocab_size=args.vocab_size, pad_id=3, byte_fallback=True,
        normalization_rule_name="identity", remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True, input_sentence_size=args.max_sentences,
        shuffle_input_sentence=True, num_threads=os.cpu_count(), minloglevel=1)
    return prefix + ".model"


def train_byte_level_bpe(texts: Iterator[str], args: argparse.Namespace) -> str:
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tokenizer = HFTokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=args.vocab_size, special_tokens=BYTE_LEVEL_SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=sys.stderr.isatty())
    tokenizer.train_from_iterator(texts, trainer=trainer)
    tokenizer.save(args.output)
    return args.output


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields to learn from")
    parser.add_argument("--dataset-split", default="train", help="split read from `datasets` folders")
    parser.add_argument("--tokenizer-type", required=True, choices=["SentencePieceTokenizer", "HuggingFaceTokenizer"])
    parser.add_argument("--model-type", default="bpe", choices=["bpe", "unigram"], help="SentencePiece only")
    parser.add_argument("--vocab-size", type=int, required=True)
    parser.add_argument("--max-sentences", type=int, default=10_000_000,
                        help="SentencePiece samples at most this many lines (0: all)")
    parser.add_argument("--output", required=True, help="a .model (SentencePiece) or tokenizer.json path")
    args = parser.parse_args(argv)
    if args.vocab_size < MIN_VOCAB_SIZE:
        parser.error(f"--vocab-size {args.vocab_size} is below {MIN_VOCAB_SIZE}: "
                     "the 256 byte values and the special tokens come first")
    return args


def main(argv: list[str] | None = None) -> Tokenizer:
    args = parse_args(argv)
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    skipped: list[str] = []
    train = train_sentencepiece if args.tokenizer_type == "SentencePieceTokenizer" else train_byte_level_bpe
    path = train(_texts(args, skipped), args)
    if skipped:
        print(f"skipped {len(skipped)} bad records:", *skipped[:10], file=sys.stderr, sep="\n  ")
    # Load it back as training would, so a file that cannot be used fails here and not later.
    tokenizer = build_tokenizer(args.tokenizer_type, path)
    print(f"wrote {path}: vocab {tokenizer.vocab_size}, eod {tokenizer.eod}, pad {tokenizer.pad}")
    return tokenizer


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError, RuntimeError) as e:
        sys.exit(f"train_tokenizer.py: error: {e}")
