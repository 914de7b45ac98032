"""Tokenize a corpus into Megatron's `.bin/.idx`: `{output_prefix}_{key}_document.bin/.idx` per key.

    python tools/preprocess_data.py --input 'corpus/*.jsonl' --output-prefix data/corpus \\
        --tokenizer-type HuggingFaceTokenizer --tokenizer-model tokenizer.json --append-eod --workers 4

Inputs are files, folders or globs of JSON lines, plain text (one document per file),
parquet, or `datasets` folders; megatron_lite/data/corpus_reader.py says exactly how each
is read. Records that are not documents (broken JSON, a missing key) are counted,
reported by file:line and skipped.

The output is byte-identical for any --workers: chunks are tokenized in parallel but
written in input order. It is written under temporary names and renamed into place only
once complete, so an interrupted run leaves no half dataset and never touches an
existing one.
"""
from __future__ import annotations

import argparse
import multiprocessing
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

# Lets `python tools/preprocess_data.py` run from a checkout that is not pip-installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from megatron_lite.data.corpus_reader import BadRecordError, Record, expand_inputs, iter_records, record_texts  # noqa: E402
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, build_indexed_datasets, optimal_dtype  # noqa: E402
from megatron_lite.data.tokenizer import TOKENIZERS, build_tokenizer  # noqa: E402

CHUNK_BYTES = 1 << 18  # big enough to amortise inter-process traffic, small enough to balance workers
CHUNK_RECORDS = 1024
BAD_RECORDS_SHOWN = 10


@dataclass(frozen=True)
class EncoderConfig:
    tokenizer: dict  # build_tokenizer's arguments, from Megatron's tokenizer flags
    keys: tuple[str, ...]
    append_eod: bool
    dtype: type[np.generic]


@dataclass
class EncodedChunk:
    documents: list[list[np.ndarray]]  # per good record, one token array per key
    bad_records: list[str]
    nbytes: int


class Encoder:
    """Records to token arrays; one per worker process, each with its own tokenizer."""

    def __init__(self, config: EncoderConfig) -> None:
        self.config = config
        self.tokenizer = build_tokenizer(**config.tokenizer)
        self.suffix = [self.tokenizer.eod] if config.append_eod else []

    def encode_chunk(self, records: list[Record]) -> EncodedChunk:
        chunk = EncodedChunk([], [], sum(r.nbytes for r in records))
        for record in records:
            try:
                texts = record_texts(record, self.config.keys)
            except BadRecordError as e:
                chunk.bad_records.append(str(e))
                continue
            chunk.documents.append([np.array(self.tokenizer.encode(text) + self.suffix, dtype=self.config.dtype)
                                    for text in texts])
        return chunk


_worker_encoder: Encoder | None = None


def _init_worker(config: EncoderConfig) -> None:
    global _worker_encoder
    _worker_encoder = Encoder(config)


def _encode_in_worker(records: list[Record]) -> EncodedChunk:
    return _worker_encoder.encode_chunk(records)


def _chunks(records: Iterable[Record]) -> Iterator[list[Record]]:
    chunk, nbytes = [], 0
    for record in records:
        chunk.append(record)
        nbytes += record.nbytes
        if nbytes >= CHUNK_BYTES or len(chunk) >= CHUNK_RECORDS:
            yield chunk
            chunk, nbytes = [], 0
    if chunk:
        yield chunk


def encoded_chunks(chunks: Iterable[list[Record]], config: EncoderConfig, workers: int) -> Iterator[EncodedChunk]:
    """Encoded chunks in input order. Pool.imap would read the whole corpus into its queue
    ahead of the workers; a bounded window of pending chunks keeps memory flat."""
    if workers == 1:  # in-process: no pickling, and a debugger or profiler sees the tokenizer
        yield from map(Encoder(config).encode_chunk, chunks)
        return
    with multiprocessing.Pool(workers, _init_worker, (config,)) as pool:
        pending = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(_encode_in_worker, (chunk,)))
            if len(pending) >= 4 * workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()


@dataclass
class PreprocessStats:
    documents: int = 0
    tokens: int = 0
    nbytes: int = 0
    bad_count: int = 0
    bad_records: list[str] = field(default_factory=list)  # the first few, for the report
    seconds: float = 0.0

    def add(self, chunk: EncodedChunk) -> None:
        self.documents += len(chunk.documents)
        self.tokens += sum(len(tokens) for document in chunk.documents for tokens in document)
        self.nbytes += chunk.nbytes
        self.bad_count += len(chunk.bad_records)
        self.bad_records.extend(chunk.bad_records[:BAD_RECORDS_SHOWN - len(self.bad_records)])

    def throughput(self) -> str:
        seconds = max(self.seconds, 1e-9)
        return (f"{self.documents:,} documents, {self.tokens:,} tokens, {self.nbytes / 1e6:.1f} MB in "
                f"{self.seconds:.1f} s: {self.nbytes / 1e6 / seconds:.2f} MB/s, {self.tokens / seconds:,.0f} tokens/s")


def _write(sources: list[str], args: argparse.Namespace, config: EncoderConfig,
           builders: dict[str, IndexedDatasetBuilder]) -> PreprocessStats:
    stats, start = PreprocessStats(), time.perf_counter()
    records = iter_records(sources, config.keys, args.dataset_split)
    progress = tqdm(unit=" docs", desc="tokenizing", disable=None)
    with closing(encoded_chunks(_chunks(records), config, args.workers)) as chunks, progress:
        for chunk in chunks:
            for document in chunk.documents:
                for key, tokens in zip(config.keys, document):
                    builders[key].add_document(tokens)
            stats.add(chunk)
            progress.update(len(chunk.documents))
            elapsed = time.perf_counter() - start
            progress.set_postfix_str(f"{stats.tokens:,} tokens, {stats.nbytes / 1e6 / elapsed:.1f} MB/s, "
                                     f"{stats.bad_count} bad", refresh=False)
    stats.seconds = time.perf_counter() - start
    if stats.bad_count:
        shown = "" if stats.bad_count == len(stats.bad_records) else f", the first {len(stats.bad_records)}"
        print(f"skipped {stats.bad_count} bad records{shown}:", *stats.bad_records, file=sys.stderr, sep="\n  ")
    if stats.documents == 0:
        why = f"all {stats.bad_count} records are bad" if stats.bad_count else "the input is empty"
        raise ValueError(f"no documents in {' '.join(args.input)}: {why}")
    return stats


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--input", nargs="+", required=True, help="files, folders or globs")
    parser.add_argument("--json-keys", nargs="+", default=["text"], help="fields to tokenize, one dataset each")
    parser.add_argument("--output-prefix", required=True)
    parser.add_argument("--tokenizer-type", default=None, choices=sorted(TOKENIZERS),
                        help="as pretrain_gpt.py's (default: GPT2BPETokenizer with --vocab-file, else ByteTokenizer)")
    parser.add_argument("--tokenizer-model", help="the .model (SentencePiece, Llama2), tokenizer.json or tokenizer "
                        "folder")
    parser.add_argument("--vocab-file", help="GPT2BPETokenizer: its vocab.json")
    parser.add_argument("--merge-file", help="GPT2BPETokenizer: its merges.txt")
    parser.add_argument("--vocab-size", type=int, help="NullTokenizer: ids 0..N-1, N ends documents")
    parser.add_argument("--append-eod", action="store_true", help="end each document with the eod id")
    parser.add_argument("--workers", type=int, default=1, help="tokenizing processes")
    parser.add_argument("--dataset-split", default="train", help="split read from `datasets` folders")
    args = parser.parse_args(argv)
    if args.workers < 1:
        parser.error(f"--workers must be at least 1, not {args.workers}")
    if args.tokenizer_type is None:  # as pretrain_gpt.py reads Megatron's GPT scripts
        args.tokenizer_type = "GPT2BPETokenizer" if args.vocab_file or args.merge_file else "ByteTokenizer"
    if len(set(args.json_keys)) != len(args.json_keys):
        parser.error(f"--json-keys {' '.join(args.json_keys)} names a key twice")
    return args


def main(argv: list[str] | None = None) -> PreprocessStats:
    args = parse_args(argv)
    sources = expand_inputs(args.input)  # a missing input fails here, before any file is created
    tokenizer_args = dict(tokenizer_type=args.tokenizer_type, tokenizer_model=args.tokenizer_model,
                          vocab_file=args.vocab_file, merge_file=args.merge_file, vocab_size=args.vocab_size)
    tokenizer = build_tokenizer(**tokenizer_args)
    config = EncoderConfig(tokenizer_args, tuple(args.json_keys), args.append_eod, optimal_dtype(tokenizer.vocab_size))
    Path(args.output_prefix).parent.mkdir(parents=True, exist_ok=True)
    outputs = [f"{args.output_prefix}_{key}_document" for key in config.keys]
    with build_indexed_datasets(outputs, config.dtype) as builders:
        stats = _write(sources, args, config, dict(zip(config.keys, builders)))
    for prefix in outputs:
        print(f"wrote {prefix}.bin/.idx ({np.dtype(config.dtype).name} tokens)")
    print(f"{args.workers} worker(s), {args.tokenizer_type}: {stats.throughput()}")
    return stats


if __name__ == "__main__":
    try:
        main()
    except (ValueError, OSError) as e:
        sys.exit(f"preprocess_data.py: error: {e}")
