"""The .bin/.idx format: round trips, Megatron's exact bytes, and clear errors on bad files."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder, IndexedDatasetError, optimal_dtype


def write_dataset(prefix: str, documents: list, dtype: type[np.generic]) -> IndexedDataset:
    builder = IndexedDatasetBuilder(prefix + ".bin", dtype)
    for document in documents:
        builder.add_document(document)
    builder.finalize(prefix + ".idx")
    return IndexedDataset(prefix)


@pytest.mark.parametrize("dtype, high", [(np.uint16, 2**16), (np.int32, 2**31 - 1)])
def test_round_trip(tmp_path, dtype, high):
    rng = np.random.default_rng(0)
    documents = [rng.integers(0, high, size=n) for n in (5, 0, 1, 300, 17)]
    documents.append(np.array([0, high - 1]))  # the extremes of the range survive
    dataset = write_dataset(str(tmp_path / "d"), documents, dtype)
    assert dataset.dtype is dtype and len(dataset) == len(documents)
    for i, document in enumerate(documents):
        np.testing.assert_array_equal(dataset[i], document)
    np.testing.assert_array_equal(dataset.sequence_lengths, [len(d) for d in documents])
    np.testing.assert_array_equal(dataset.document_indices, np.arange(len(documents) + 1))
    np.testing.assert_array_equal(dataset.get(3, offset=10, length=5), documents[3][10:15])
    np.testing.assert_array_equal(dataset.get(3, offset=290), documents[3][290:])


def test_index_bytes_follow_megatrons_layout(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    builder.add_item([1, 2, 3])  # a document of two sequences, then one of one
    builder.add_item([4, 5])
    builder.end_document()
    builder.add_document([6])
    builder.finalize(str(tmp_path / "d.idx"))
    expected = (b"MMIDIDX\x00\x00" + struct.pack("<Q", 1) + struct.pack("<B", 8)
                + struct.pack("<Q", 3) + struct.pack("<Q", 3)
                + struct.pack("<3i", 3, 2, 1)  # sequence lengths
                + struct.pack("<3q", 0, 6, 10)  # byte pointers: uint16 is two bytes a token
                + struct.pack("<3q", 0, 2, 3))  # document indices
    assert (tmp_path / "d.idx").read_bytes() == expected
    assert (tmp_path / "d.bin").read_bytes() == struct.pack("<6H", 1, 2, 3, 4, 5, 6)
    np.testing.assert_array_equal(IndexedDataset(str(tmp_path / "d")).document_indices, [0, 2, 3])


def test_add_index_appends_a_finished_dataset(tmp_path):
    parts = [[[1, 2], [3]], [[4, 5, 6]], []]
    for k, documents in enumerate(parts):
        write_dataset(str(tmp_path / f"part{k}"), documents, np.int32)
    merged = IndexedDatasetBuilder(str(tmp_path / "all.bin"), np.int32)
    for k in range(len(parts)):
        merged.add_index(str(tmp_path / f"part{k}"))
    merged.finalize(str(tmp_path / "all.idx"))
    dataset = IndexedDataset(str(tmp_path / "all"))
    assert [d.tolist() for d in (dataset[i] for i in range(len(dataset)))] == [[1, 2], [3], [4, 5, 6]]
    np.testing.assert_array_equal(dataset.document_indices, [0, 1, 2, 3])
    write_dataset(str(tmp_path / "small"), [[1]], np.uint16)
    with pytest.raises(ValueError, match="dtype uint16 differs"):
        IndexedDatasetBuilder(str(tmp_path / "x.bin"), np.int32).add_index(str(tmp_path / "small"))


def test_ids_that_do_not_fit_the_dtype_are_refused(tmp_path):
    builder = IndexedDatasetBuilder(str(tmp_path / "d.bin"), np.uint16)
    with pytest.raises(ValueError, match="do not fit uint16"):
        builder.add_document([1, 70000])
    assert optimal_dtype(258) is np.uint16 and optimal_dtype(2**16) is np.uint16
    assert optimal_dtype(2**16 + 1) is np.int32


def _patch(path, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def _truncate(path, size: int) -> None:
    with open(path, "r+b") as f:
        f.truncate(size)


CORRUPTIONS = {
    "foreign magic": (lambda p: _patch(p + ".idx", 0, b"NOTMEGA"), ".idx: bad magic"),
    "newer version": (lambda p: _patch(p + ".idx", 9, struct.pack("<Q", 2)), ".idx: unsupported version 2"),
    "unknown dtype": (lambda p: _patch(p + ".idx", 17, bytes([9])), ".idx: unknown dtype code 9"),
    "short header": (lambda p: _truncate(p + ".idx", 20), ".idx: truncated header"),
    "truncated index": (lambda p: _truncate(p + ".idx", os.path.getsize(p + ".idx") - 8), ".idx: size"),
    "truncated data": (lambda p: _truncate(p + ".bin", 7), r".bin: size 7 bytes, but .*\.idx says 20"),
    "missing data": (lambda p: os.remove(p + ".bin"), ".bin: no such file"),
}


@pytest.mark.parametrize("corruption", CORRUPTIONS)
def test_bad_files_name_the_file_and_the_check(tmp_path, corruption):
    prefix = str(tmp_path / "d")
    write_dataset(prefix, [[1, 2, 3], [4] * 7], np.uint16)
    damage, message = CORRUPTIONS[corruption]
    damage(prefix)
    with pytest.raises(IndexedDatasetError, match=message) as error:
        IndexedDataset(prefix)
    assert prefix in str(error.value)
