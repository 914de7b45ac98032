"""Megatron's memory-mapped token format: a `.bin` of raw tokens and an `.idx` describing it.

The `.idx` layout, all little-endian, is byte-for-byte Megatron's (so files move freely
between Megatron-LM and megatron_lite):

    magic              9 bytes   b"MMIDIDX\\x00\\x00"
    version            u64       1
    dtype code         u8        see DTYPE_CODES
    sequence count     u64       S
    document count     u64       D + 1 (the length of document_indices)
    sequence_lengths   int32[S]  tokens in each sequence
    sequence_pointers  int64[S]  byte offset of each sequence in the `.bin`
    document_indices   int64[D+1] 0, then the sequence count at the end of each document

A document is one or more sequences (Megatron's "sentences"); the preprocessing here always
writes one sequence per document.
"""
from __future__ import annotations

import os
import shutil
import struct
from array import array
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

INDEX_MAGIC = b"MMIDIDX\x00\x00"
INDEX_VERSION = 1
DTYPE_CODES: dict[type[np.generic], int] = {
    np.uint8: 1, np.int8: 2, np.int16: 3, np.int32: 4, np.int64: 5,
    np.float64: 6, np.float32: 7, np.uint16: 8,
}
_DTYPES_BY_CODE = {code: dtype for dtype, code in DTYPE_CODES.items()}
_HEADER = struct.Struct("<9sQBQQ")


class IndexedDatasetError(ValueError):
    """A `.bin/.idx` pair that is missing, foreign, truncated or inconsistent."""


def optimal_dtype(vocab_size: int) -> type[np.generic]:
    """The smallest token dtype for ids below vocab_size: uint16 halves the file when it fits."""
    return np.uint16 if vocab_size <= 2**16 else np.int32


def data_file_path(path_prefix: str) -> str:
    return path_prefix + ".bin"


def index_file_path(path_prefix: str) -> str:
    return path_prefix + ".idx"


def _read_index(idx_path: str) -> tuple[type[np.generic], np.ndarray, np.ndarray, np.ndarray]:
    """(dtype, sequence_lengths, sequence_pointers, document_indices), each check naming the file."""
    file_size = os.path.getsize(idx_path)
    if file_size < _HEADER.size:
        raise IndexedDatasetError(f"{idx_path}: truncated header ({file_size} bytes, need {_HEADER.size})")
    with open(idx_path, "rb") as f:
        magic, version, code, sequence_count, document_count = _HEADER.unpack(f.read(_HEADER.size))
    if magic != INDEX_MAGIC:
        raise IndexedDatasetError(f"{idx_path}: bad magic {magic!r}, expected {INDEX_MAGIC!r} "
                                  "(not a Megatron .idx file)")
    if version != INDEX_VERSION:
        raise IndexedDatasetError(f"{idx_path}: unsupported version {version}, expected {INDEX_VERSION}")
    if code not in _DTYPES_BY_CODE:
        raise IndexedDatasetError(f"{idx_path}: unknown dtype code {code}, expected one of "
                                  f"{sorted(_DTYPES_BY_CODE)}")
    expected_size = _HEADER.size + 4 * sequence_count + 8 * sequence_count + 8 * document_count
    if file_size != expected_size:
        raise IndexedDatasetError(f"{idx_path}: size {file_size} bytes, but its header ({sequence_count} "
                                  f"sequences, {document_count} document indices) needs {expected_size}")
    # np.memmap refuses empty files, so an index with no sequences is read plainly.
    buffer = np.memmap(idx_path, dtype=np.uint8, mode="r") if expected_size > _HEADER.size else b""
    offset = _HEADER.size
    lengths = np.frombuffer(buffer, dtype="<i4", count=sequence_count, offset=offset)
    offset += lengths.nbytes
    pointers = np.frombuffer(buffer, dtype="<i8", count=sequence_count, offset=offset)
    offset += pointers.nbytes
    document_indices = np.frombuffer(buffer, dtype="<i8", count=document_count, offset=offset)
    if document_count == 0 or document_indices[0] != 0 or document_indices[-1] != sequence_count:
        raise IndexedDatasetError(f"{idx_path}: document indices must run from 0 to the sequence "
                                  f"count {sequence_count}")
    return _DTYPES_BY_CODE[code], lengths, pointers, document_indices


class IndexedDataset:
    """Read-only view of `{path_prefix}.bin/.idx`; sequence i comes back as a numpy array.

    Nothing is loaded up front: both files are memory-mapped, so a corpus larger than RAM
    costs only the pages that samples touch.
    """

    def __init__(self, path_prefix: str) -> None:
        # Accept "corpus_text_document.bin" as well as the bare prefix Megatron expects.
        for suffix in (".bin", ".idx"):
            path_prefix = path_prefix.removesuffix(suffix)
        self.path_prefix = path_prefix
        idx_path, bin_path = index_file_path(path_prefix), data_file_path(path_prefix)
        for path in (idx_path, bin_path):
            if not os.path.isfile(path):
                raise IndexedDatasetError(f"{path}: no such file (dataset prefix {path_prefix!r} "
                                          "needs both .bin and .idx)")
        self.dtype, self.sequence_lengths, self.sequence_pointers, self.document_indices = _read_index(idx_path)
        itemsize = np.dtype(self.dtype).itemsize
        expected = int(self.sequence_pointers[-1] + self.sequence_lengths[-1] * itemsize) if len(self) else 0
        actual = os.path.getsize(bin_path)
        if actual != expected:
            raise IndexedDatasetError(f"{bin_path}: size {actual} bytes, but {idx_path} says {expected} "
                                      "(truncated, or not the .bin of this .idx)")
        self._tokens = np.memmap(bin_path, dtype=self.dtype, mode="r") if actual else np.empty(0, self.dtype)

    def __len__(self) -> int:
        return len(self.sequence_lengths)

    def __getitem__(self, i: int) -> np.ndarray:
        return self.get(i)

    def get(self, i: int, offset: int = 0, length: int | None = None) -> np.ndarray:
        """Tokens [offset, offset + length) of sequence i (to its end when length is None)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sequence {i} out of range for {self.path_prefix} ({len(self)} sequences)")
        if length is None:
            length = int(self.sequence_lengths[i]) - offset
        start = int(self.sequence_pointers[i]) // self._tokens.itemsize + offset
        return self._tokens[start:start + length]


class IndexedDatasetBuilder:
    """Writes a `.bin` as documents arrive, then the `.idx` in finalize().

    Tokens go straight to disk; only the per-sequence lengths stay in memory (4 bytes each).
    """

    def __init__(self, bin_path: str, dtype: type[np.generic] = np.int32) -> None:
        dtype = np.dtype(dtype).type
        if dtype not in DTYPE_CODES:
            raise ValueError(f"dtype {dtype} is not one of the .idx format's {list(DTYPE_CODES)}")
        self.bin_path = bin_path
        self.dtype = dtype
        self._bin = open(bin_path, "wb")
        self._sequence_lengths = array("i")
        self._document_indices = array("q", [0])

    def add_item(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append one sequence to the current document."""
        tokens = np.asarray(tokens)
        if tokens.size and tokens.dtype != self.dtype and np.issubdtype(self.dtype, np.integer):
            # A silent wrap (e.g. id 70000 stored as uint16) would corrupt the data unnoticed.
            info = np.iinfo(self.dtype)
            if tokens.min() < info.min or tokens.max() > info.max:
                raise ValueError(f"{self.bin_path}: token ids {tokens.min()}..{tokens.max()} do not fit "
                                 f"{np.dtype(self.dtype).name}")
        self._bin.write(tokens.astype(self.dtype, copy=False).tobytes(order="C"))
        self._sequence_lengths.append(tokens.size)

    def end_document(self) -> None:
        """Close the current document after the sequences added since the last one."""
        self._document_indices.append(len(self._sequence_lengths))

    def add_document(self, tokens: Iterable[int] | np.ndarray) -> None:
        """Append a document made of one sequence."""
        self.add_item(tokens)
        self.end_document()

    def add_index(self, path_prefix: str) -> None:
        """Append a whole finished dataset (e.g. one worker's shard) after what is here."""
        other = IndexedDataset(path_prefix)
        if other.dtype != self.dtype:
            raise ValueError(f"{path_prefix}: dtype {np.dtype(other.dtype).name} differs from this "
                             f"builder's {np.dtype(self.dtype).name}")
        base = len(self._sequence_lengths)
        self._sequence_lengths.extend(other.sequence_lengths.astype(np.int32).tolist())
        self._document_indices.extend((other.document_indices[1:] + base).tolist())
        with open(data_file_path(path_prefix), "rb") as f:
            shutil.copyfileobj(f, self._bin)

    def close(self) -> None:
        """Close the `.bin` without writing an index (used when a run is abandoned)."""
        self._bin.close()

    def finalize(self, idx_path: str) -> None:
        """Close the `.bin` and write the `.idx` that describes it."""
        self.close()
        lengths = np.asarray(self._sequence_lengths, dtype="<i4")
        pointers = np.zeros(len(lengths), dtype="<i8")
        np.cumsum(lengths[:-1], dtype=np.int64, out=pointers[1:])
        pointers *= np.dtype(self.dtype).itemsize
        document_indices = np.asarray(self._document_indices, dtype="<i8")
        with open(idx_path, "wb") as f:
            f.write(_HEADER.pack(INDEX_MAGIC, INDEX_VERSION, DTYPE_CODES[self.dtype],
                                 len(lengths), len(document_indices)))
            f.write(lengths.tobytes())
            f.write(pointers.tobytes())
            f.write(document_indices.tobytes())


@contextmanager
def build_indexed_datasets(path_prefixes: list[str], dtype: type[np.generic]) -> Iterator[list[IndexedDatasetBuilder]]:
    """Builders of `{prefix}.bin/.idx` for each prefix, whose files appear only when the block completes.

    They write under temporary names, renamed into place after every index is written; an
    exception or Ctrl-C in the block removes them, so an interrupted build leaves no half
    dataset and never touches an existing one.
    """
    finals = [path for prefix in path_prefixes for path in (data_file_path(prefix), index_file_path(prefix))]
    temporary = {path: f"{path}.tmp{os.getpid()}" for path in finals}
    builders = [IndexedDatasetBuilder(temporary[data_file_path(prefix)], dtype) for prefix in path_prefixes]
    try:
        yield builders
        for prefix, builder in zip(path_prefixes, builders):
            builder.finalize(temporary[index_file_path(prefix)])
    except BaseException:
        for builder in builders:
            builder.close()
        for path in temporary.values():
            Path(path).unlink(missing_ok=True)
        raise
    # Each .idx after its .bin: a reader that finds the .idx finds the whole dataset.
    for path in finals:
        os.replace(temporary[path], path)
