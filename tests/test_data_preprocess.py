"""tools/preprocess_data.py: mixed inputs, worker-independent output, bad records, no half datasets."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from megatron_lite.data.indexed_dataset import IndexedDataset, IndexedDatasetBuilder
from megatron_lite.data.tokenizer import ByteTokenizer
from tools import preprocess_data

EOD = ByteTokenizer().eod


def documents(prefix: str) -> list[str]:
    """The texts of a byte-tokenized dataset, each checked to end with the eod id."""
    dataset = IndexedDataset(prefix)
    assert all(dataset[i][-1] == EOD for i in range(len(dataset)))
    return [ByteTokenizer().decode(dataset[i].tolist()) for i in range(len(dataset))]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


@pytest.fixture
def corpus(tmp_path) -> tuple[Path, list[str]]:
    """A folder of text, JSON lines (three bad lines, one blank) and parquet; and its good documents."""
    root = tmp_path / "corpus"
    root.mkdir()
    txt = ["first file\n\nnaïve ☃ paragraphs\n", "second file " * 50]
    (root / "a.txt").write_text(txt[0], encoding="utf-8")
    (root / "b.txt").write_text(txt[1])
    jsonl = [f"json document {i} " * (i % 7 + 1) for i in range(40)]
    lines = [json.dumps({"text": t}) for t in jsonl]
    lines[2], lines[4], lines[6] = "{not json", json.dumps({"body": "no text"}), json.dumps({"text": 12})
    lines.insert(9, "")
    (root / "c.jsonl").write_text("\n".join(lines) + "\n")
    rows = [f"parquet row {i}" for i in range(30)]
    pq.write_table(pa.table({"id": list(range(30)), "text": rows}), root / "d.parquet", row_group_size=8)
    return root, txt + [t for i, t in enumerate(jsonl) if i not in (2, 4, 6)] + rows


def run(inputs: list[str], prefix: Path, *extra: str):
    return preprocess_data.main(["--input", *inputs, "--output-prefix", str(prefix), "--append-eod", *extra])


def test_one_and_two_workers_write_identical_files(corpus, tmp_path, monkeypatch):
    root, expected = corpus
    monkeypatch.setattr(preprocess_data, "CHUNK_RECORDS", 4)  # many chunks, so the workers interleave
    run([str(root)], tmp_path / "one" / "c", "--workers", "1")
    stats = run([str(root)], tmp_path / "two" / "c", "--workers", "2")
    assert snapshot(tmp_path / "one") == snapshot(tmp_path / "two")
    assert sorted(snapshot(tmp_path / "one")) == ["c_text_document.bin", "c_text_document.idx"]
    assert documents(str(tmp_path / "two" / "c_text_document")) == expected
    assert stats.documents == len(expected)
    assert stats.tokens == sum(len(t.encode()) + 1 for t in expected)


def test_bad_records_are_reported_by_line_and_skipped(corpus, tmp_path, capsys):
    root, expected = corpus
    stats = run([str(root / "*.jsonl")], tmp_path / "c")
    assert stats.bad_count == 3 and stats.documents == 37
    report = capsys.readouterr()
    assert "skipped 3 bad records" in report.err
    assert f"{root}/c.jsonl:3: not valid JSON" in report.err
    assert f"{root}/c.jsonl:5: no key 'text'" in report.err
    assert f"{root}/c.jsonl:7: 'text' is a int, not text" in report.err
    assert "37 documents" in report.out and "MB/s" in report.out


def test_interrupted_run_leaves_no_files_and_keeps_the_existing_dataset(corpus, tmp_path, monkeypatch):
    root, _ = corpus
    run([str(root)], tmp_path / "c")
    before = snapshot(tmp_path)
    add_document, calls = IndexedDatasetBuilder.add_document, []

    def crash_after_a_few(self, tokens):
        calls.append(1)
        if len(calls) % 5 == 0:
            raise KeyboardInterrupt("simulated interruption")
        add_document(self, tokens)

    monkeypatch.setattr(IndexedDatasetBuilder, "add_document", crash_after_a_few)
    for prefix in ("c", "fresh"):
        with pytest.raises(KeyboardInterrupt):
            run([str(root)], tmp_path / prefix, "--workers", "2")
        assert snapshot(tmp_path) == before


def test_missing_empty_and_all_bad_inputs_fail_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="input '.*nowhere.jsonl' does not exist"):
        run([str(tmp_path / "nowhere.jsonl")], tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="no documents in .*empty.jsonl: the input is empty"):
        run([str(tmp_path / "empty.jsonl")], tmp_path / "out")
    (tmp_path / "bad.jsonl").write_text("[1]\n{\"title\": \"x\"}\n")
    with pytest.raises(ValueError, match="all 2 records are bad"):
        run([str(tmp_path / "bad.jsonl")], tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "empty.jsonl"]


def test_parquet_rows_without_the_column_are_reported(tmp_path, capsys):
    pq.write_table(pa.table({"body": ["a", "b"]}), tmp_path / "p.parquet")
    with pytest.raises(ValueError, match="all 2 records are bad"):
        run([str(tmp_path / "p.parquet")], tmp_path / "out")
    assert f"{tmp_path}/p.parquet:row 2: no key 'text'" in capsys.readouterr().err


def test_several_keys_stay_aligned(tmp_path):
    records = [{"text": "body one", "title": "one"}, {"text": "no title"}, {"text": "body three", "title": "3"}]
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    run([str(tmp_path / "c.jsonl")], tmp_path / "c", "--json-keys", "text", "title")
    assert documents(str(tmp_path / "c_text_document")) == ["body one", "body three"]
    assert documents(str(tmp_path / "c_title_document")) == ["one", "3"]


def test_datasets_folders(tmp_path):
    import datasets

    texts = ["alpha", "beta", "", "gamma delta"]
    datasets.Dataset.from_dict({"text": texts}).save_to_disk(str(tmp_path / "saved"))
    splits = {"train": ["unused"], "validation": texts}
    datasets.DatasetDict({k: datasets.Dataset.from_dict({"text": v}) for k, v in splits.items()}).save_to_disk(
        str(tmp_path / "saved_dict"))
    (tmp_path / "csv").mkdir()
    (tmp_path / "csv" / "part.csv").write_text("text,n\n" + "".join(f"{t},{i}\n" for i, t in enumerate(texts)))
    run([str(tmp_path / "saved")], tmp_path / "out" / "saved")
    run([str(tmp_path / "saved_dict")], tmp_path / "out" / "dict", "--dataset-split", "validation")
    run([str(tmp_path / "csv")], tmp_path / "out" / "csv")  # read by datasets.load_dataset
    for name in ("saved", "dict"):
        assert documents(str(tmp_path / "out" / f"{name}_text_document")) == texts
    # csv reads the empty field as missing, so that row is reported and skipped.
    assert documents(str(tmp_path / "out" / "csv_text_document")) == ["alpha", "beta", "gamma delta"]
    assert np.array_equal(IndexedDataset(str(tmp_path / "out" / "saved_text_document"))[2], [EOD])
