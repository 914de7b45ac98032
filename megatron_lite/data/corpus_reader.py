"""Documents out of local corpora: JSON lines, plain text, parquet and `datasets` folders.

What an input is:
- a `.jsonl` / `.json` file: JSON lines, one document per line (Megatron's format);
- a `.parquet` file: one document per row;
- any other file: plain UTF-8 text, the whole file is one document, under the key "text"
  (so a glob of source files or books works as is; split a huge single-file corpus into
  JSON lines first, since one document is tokenized by one worker);
- a folder written by `datasets`' save_to_disk: its rows (of --dataset-split);
- a folder holding .jsonl/.json/.parquet/.txt files: those files, recursively, sorted;
- any other folder: whatever `datasets.load_dataset` makes of it (csv, arrow, ...), streamed;
- a glob of any of these.

Readers only cut the input into raw Records; record_texts() parses them. That keeps the
expensive part (JSON decoding) in the tokenizing workers, and lets a bad record be
reported by its place (file:line) and skipped instead of stopping the run.
"""
from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import NamedTuple

JSON_SUFFIXES = (".jsonl", ".json")
CORPUS_SUFFIXES = (*JSON_SUFFIXES, ".parquet", ".txt")


class Record(NamedTuple):
    """One document as read, before parsing."""

    location: str  # "file:line" or "file:row N", for reports
    kind: str  # "json": data is one JSON line; "text": a whole text file; "row": a dict of fields
    data: bytes | dict
    nbytes: int  # input bytes this record stands for, for throughput figures


class BadRecordError(ValueError):
    """A record that is not a document: broken JSON, a missing key, undecodable text."""


def _is_saved_dataset(path: str) -> bool:
    return (os.path.isfile(os.path.join(path, "state.json"))
            or os.path.isfile(os.path.join(path, "dataset_dict.json")))


def expand_inputs(inputs: list[str]) -> list[str]:
    """The files and dataset folders that paths, globs and folders name, in a stable order."""
    sources = []
    for pattern in inputs:
        matches = sorted(glob.glob(pattern, recursive=True))
        if not matches:
            raise FileNotFoundError(f"input {pattern!r} does not exist (or the glob matches nothing)")
        for path in matches:
            if os.path.isdir(path) and not _is_saved_dataset(path):
                files = sorted(str(p) for p in Path(path).rglob("*")
                               if p.suffix in CORPUS_SUFFIXES and p.is_file())
                sources.extend(files or [path])  # no corpus files: a folder for datasets.load_dataset
            else:
                sources.append(path)
    return sources


def _text_bytes(fields: dict) -> int:
    return sum(len(v.encode("utf-8")) for v in fields.values() if isinstance(v, str))


def _json_lines(path: str) -> Iterator[Record]:
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if line.strip():  # blank lines (a trailing newline, say) are not documents
                yield Record(f"{path}:{lineno}", "json", line, len(line))


def _rows(path: str, rows: Iterator[dict], keys: Sequence[str]) -> Iterator[Record]:
    for number, row in enumerate(rows, 1):
        fields = {k: row[k] for k in keys if k in row}
        yield Record(f"{path}:row {number}", "row", fields, _text_bytes(fields))


def _parquet_rows(path: str, keys: Sequence[str]) -> Iterator[dict]:
    import pyarrow.parquet as pq

    with pq.ParquetFile(path) as parquet:
        # Read only the wanted columns; with none of them present, rows are still read so
        # that each is reported as lacking the key.
        columns = [k for k in keys if k in parquet.schema_arrow.names] or None
        for batch in parquet.iter_batches(columns=columns):
            yield from batch.to_pylist()


def _dataset_rows(path: str, keys: Sequence[str], split: str) -> Iterator[dict]:
    # Local folders only: never let `datasets` reach for the hub.
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets

    if _is_saved_dataset(path):
        dataset = datasets.load_from_disk(path)
        if isinstance(dataset, datasets.DatasetDict):
            if split not in dataset:
                raise ValueError(f"{path} has no split {split!r} (it has {sorted(dataset)}); "
                                 "choose one with --dataset-split")
            dataset = dataset[split]
    else:
        dataset = datasets.load_dataset(path, split=split, streaming=True)
    columns = [k for k in keys if k in (dataset.column_names or [])]
    yield from dataset.select_columns(columns) if columns else dataset


def iter_records(sources: list[str], keys: Sequence[str], dataset_split: str = "train") -> Iterator[Record]:
    """Every record of every source (from expand_inputs), in order."""
    for path in sources:
        if os.path.isdir(path):
            yield from _rows(path, _dataset_rows(path, keys, dataset_split), keys)
        elif path.endswith(JSON_SUFFIXES):
            yield from _json_lines(path)
        elif path.endswith(".parquet"):
            yield from _rows(path, _parquet_rows(path, keys), keys)
        else:
            data = Path(path).read_bytes()
            yield Record(path, "text", data, len(data))


def _fields(record: Record) -> dict:
    if record.kind == "json":
        try:
            fields = json.loads(record.data)
        except ValueError as e:  # JSONDecodeError and UnicodeDecodeError alike
            raise BadRecordError(f"{record.location}: not valid JSON ({e})") from None
        if not isinstance(fields, dict):
            raise BadRecordError(f"{record.location}: a JSON {type(fields).__name__}, not an object")
        return fields
    if record.kind == "text":
        try:
            return {"text": record.data.decode("utf-8")}
        except UnicodeDecodeError as e:
            raise BadRecordError(f"{record.location}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    return record.data


def record_texts(record: Record, keys: Sequence[str]) -> list[str]:
    """The record's text under each key, or BadRecordError saying where and why not."""
    fields = _fields(record)
    texts = []
    for key in keys:
        value = fields.get(key)
        if not isinstance(value, str):
            problem = f"no key {key!r}" if value is None else f"{key!r} is a {type(value).__name__}, not text"
            raise BadRecordError(f"{record.location}: {problem}")
        texts.append(value)
    return texts
