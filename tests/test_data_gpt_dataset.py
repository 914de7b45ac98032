"""GPT samples: coverage per epoch, determinism, splits, blending and the index cache.

Corpora here hold each token value once (token = its position in the corpus), so a token
seen in a sample says exactly where it came from.
"""
from __future__ import annotations

import os

import numpy as np
import pytest

from megatron_lite.data import gpt_dataset
from megatron_lite.data.gpt_dataset import build_train_valid_test_datasets, parse_data_path, split_boundaries
from megatron_lite.data.indexed_dataset import IndexedDatasetBuilder, IndexedDatasetError

SEQ = 16


def unique_token_corpus(prefix: str, num_docs: int = 200, first_token: int = 0, seed: int = 0) -> list[np.ndarray]:
    lengths = np.random.default_rng(seed).integers(0, 40, num_docs)  # zero-length documents included
    tokens = np.arange(first_token, first_token + lengths.sum())
    documents = np.split(tokens, np.cumsum(lengths)[:-1])
    builder = IndexedDatasetBuilder(prefix + ".bin", np.int32)
    for document in documents:
        builder.add_document(document)
    builder.finalize(prefix + ".idx")
    return documents


def all_samples(dataset) -> np.ndarray:
    return np.stack([dataset[i] for i in range(len(dataset))])


@pytest.fixture
def corpus(tmp_path) -> tuple[str, list[np.ndarray]]:
    prefix = str(tmp_path / "corpus")
    return prefix, unique_token_corpus(prefix)


def test_samples_are_windows_over_shuffled_epochs(corpus, tmp_path):
    prefix, documents = corpus
    total, epochs = sum(map(len, documents)), 3
    num_samples = (epochs * total - 1) // SEQ  # exactly three epochs' worth
    train, valid, test = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, 1, (num_samples, 0, 0),
                                                         str(tmp_path / "cache"))
    assert valid is None and test is None and len(train) == num_samples
    samples = all_samples(train)
    assert samples.shape == (num_samples, SEQ + 1) and samples.dtype == np.int64

    # Each epoch visits every document once, in its own order.
    per_epoch = train.document_index.reshape(epochs, len(documents))
    assert all(sorted(order) == list(range(len(documents))) for order in per_epoch)
    assert len({tuple(order) for order in per_epoch}) == epochs

    # Sample i is tokens [i * SEQ, (i + 1) * SEQ] of the documents laid end to end.
    stream = np.concatenate([documents[d] for d in train.document_index])
    windows = np.stack([stream[i * SEQ:(i + 1) * SEQ + 1] for i in range(num_samples)])
    np.testing.assert_array_equal(samples[np.argsort(train.shuffle_index)], windows)

    # So every token is an input once per epoch, but for the < SEQ tokens after the last sample.
    counts = np.bincount(samples[:, :-1].ravel(), minlength=total)
    assert set(np.unique(counts)) <= {epochs - 1, epochs}
    assert (counts == epochs - 1).sum() == epochs * total - num_samples * SEQ < SEQ + 1


def test_a_partial_final_epoch_is_served_after_the_full_ones(corpus, tmp_path):
    prefix, documents = corpus
    total = sum(map(len, documents))
    num_samples = (total - 1) // SEQ + 5  # one epoch and a few samples of the next
    train, _, _ = build_train_valid_test_datasets([prefix], "1", SEQ, 1, (num_samples, 0, 0), str(tmp_path))
    counts = np.bincount(np.stack([train[i][:-1] for i in range(num_samples)]).ravel(), minlength=total)
    assert (counts == 0).sum() < SEQ  # the first epoch is covered whole


def test_same_seed_same_samples_other_seed_other_order(corpus, tmp_path):
    prefix, _ = corpus

    def samples(seed: int, cache: str) -> np.ndarray:
        train, _, _ = build_train_valid_test_datasets([prefix], "100,0,0", SEQ, seed, (300, 0, 0),
                                                      str(tmp_path / cache))
        return all_samples(train)

    np.testing.assert_array_equal(samples(7, "a"), samples(7, "b"))  # built twice from scratch
    assert not np.array_equal(samples(7, "a"), samples(8, "a"))


def test_splits_take_disjoint_document_ranges(corpus, tmp_path):
    prefix, documents = corpus
    datasets = build_train_valid_test_datasets([prefix], "80,15,5", SEQ, 1, (100, 20, 10), str(tmp_path))
    bounds = split_boundaries("80,15,5", len(documents))
    assert bounds == [0, 160, 190, 200]
    for (start, end), dataset in zip(zip(bounds, bounds[1:]), datasets):
        allowed = np.concatenate(documents[start:end])
        assert np.isin(all_samples(dataset), allowed).all()
    assert build_train_valid_test_datasets([prefix], "80,20,0", SEQ, 1, (10, 10, 10), str(tmp_path))[2] is None
    assert build_train_valid_test_datasets([prefix], "80,20,0", SEQ, 1, (10, 0, 0), str(tmp_path))[1] is None


def test_split_boundaries_follow_megatron():
    assert split_boundaries("949,50,1", 1000) == [0, 949, 999, 1000]
    assert split_boundaries("1,1,1", 10) == [0, 4, 7, 10]  # the rounding surplus comes off the later cuts
    assert split_boundaries("98/2", 50) == [0, 49, 50, 50]
    with pytest.raises(ValueError, match="not numbers"):
        split_boundaries("a,b", 10)


def test_errors_name_the_file_and_the_numbers(corpus, tmp_path):
    prefix, documents = corpus
    with pytest.raises(ValueError, match=r"corpus: the valid split has \d+ tokens in 4 documents, fewer than "
                                         r"one sample of seq_length\+1 = 1001"):
        build_train_valid_test_datasets([prefix], "98,2,0", 1000, 1, (1, 1, 0), str(tmp_path))
    unique_token_corpus(str(tmp_path / "tiny"), num_docs=3)
    with pytest.raises(ValueError, match="tiny: the valid split of --split 98,1,1 gets no documents"):
        build_train_valid_test_datasets([str(tmp_path / "tiny")], "98,1,1", 2, 1, (1, 1, 1), str(tmp_path))
    with open(prefix + ".bin", "r+b") as f:
        f.truncate(100)
    with pytest.raises(IndexedDatasetError, match="corpus.bin: size 100 bytes"):
        build_train_valid_test_datasets([prefix], "1", SEQ, 1, (1, 0, 0), str(tmp_path))


def test_data_path_forms():
    assert parse_data_path(["a"]) == (["a"], [1.0])
    assert parse_data_path(["3", "a", "1", "b"]) == (["a", "b"], [0.75, 0.25])
    for bad in (["0.5", "a", "b"], ["x", "a", "1", "b"], ["-1", "a", "2", "b"]):
        with pytest.raises(ValueError, match="--data-path"):
            parse_data_path(bad)


def test_blending_holds_the_ratios(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    unique_token_corpus(a, seed=1)
    unique_token_corpus(b, first_token=1_000_000, seed=2)  # b's tokens tell its samples apart
    size = 10_000
    train, _, _ = build_train_valid_test_datasets(["0.7", a, "0.3", b], "100,0,0", SEQ, 1, (size, 0, 0),
                                                  str(tmp_path / "cache"))
    assert len(train) == size
    from_a = np.array([train[i][0] < 1_000_000 for i in range(size)])
    assert abs(from_a.mean() - 0.7) < 0.01
    # Megatron's greedy rule keeps every prefix of the run within one sample of its share.
    taken_from_a = np.cumsum(from_a)
    assert np.abs(taken_from_a - 0.7 * np.arange(1, size + 1)).max() <= 1


def test_indices_are_cached_and_reused(corpus, tmp_path, monkeypatch):
    prefix, _ = corpus
    build = lambda seq: build_train_valid_test_datasets([prefix], "90,10,0", seq, 1, (50, 5, 0))  # noqa: E731
    first = [all_samples(d) for d in build(SEQ)[:2]]
    cache = tmp_path / "cache"  # beside the data when no cache_dir is given
    files = sorted(cache.glob("*.npy"))
    assert len(files) == 6  # three arrays for each of train and valid
    mtimes = [os.stat(f).st_mtime_ns for f in files]

    def rebuilt(*args):
        raise AssertionError("indices were rebuilt instead of read from the cache")

    monkeypatch.setattr(gpt_dataset, "_build_indices", rebuilt)
    for before, dataset in zip(first, build(SEQ)[:2]):
        np.testing.assert_array_equal(before, all_samples(dataset))
    assert [os.stat(f).st_mtime_ns for f in files] == mtimes
    with pytest.raises(AssertionError, match="rebuilt"):  # other settings, other cache entry
        build(SEQ + 1)


def test_an_unwritable_cache_only_warns(corpus, tmp_path):
    prefix, _ = corpus
    (tmp_path / "a_file").write_text("")
    with pytest.warns(UserWarning, match="cannot cache dataset indices"):
        train, _, _ = build_train_valid_test_datasets([prefix], "1", SEQ, 1, (10, 0, 0), str(tmp_path / "a_file" / "c"))
    assert len(train) >= 10 and train[9].shape == (SEQ + 1,)
