"""Data for a training run: the tokenizer, the corpus (--data-path or the built-in one) and its datasets."""
from __future__ import annotations

from typing import NamedTuple

from megatron_lite.config import ConfigError, TrainConfig
from megatron_lite.data.blended_dataset import BlendedDataset
from megatron_lite.data.default_corpus import build_default_corpus
from megatron_lite.data.documents import DocumentMasking
from megatron_lite.data.gpt_dataset import GPTDataset, build_train_valid_test_datasets, parse_data_path
from megatron_lite.data.indexed_dataset import IndexedDataset
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer

# Tokens of each dataset checked against the tokenizer's vocabulary. Data written by another
# tokenizer shows ids beyond the vocabulary within its first documents, and reading them
# costs nothing, where a whole corpus could take minutes.
VOCAB_CHECK_TOKENS = 1 << 20


class TrainingData(NamedTuple):
    tokenizer: Tokenizer
    train: GPTDataset | BlendedDataset | RandomTokens  # RandomTokens: --mock-data
    # None when evaluation is off or the split has no valid part.
    valid: GPTDataset | BlendedDataset | RandomTokens | None
    description: str  # one line for the log: which corpus, which tokenizer, how many samples
    documents: DocumentMasking | None  # --reset-attention-mask and its kin at the tokenizer's eod, if any is on


def check_token_ids(dataset: IndexedDataset, tokenizer: Tokenizer) -> None:
    """Refuse a dataset whose first tokens do not fit the tokenizer's vocabulary.

    The model's vocabulary is the tokenizer's, and the vocab-parallel embedding reads an id
    beyond it as a zero vector: data preprocessed with another tokenizer would train on
    garbage without a word.
    """
    seen, largest = 0, -1
    for i in range(len(dataset)):
        if seen >= VOCAB_CHECK_TOKENS:
            break
        tokens = dataset.get(i, 0, min(int(dataset.sequence_lengths[i]), VOCAB_CHECK_TOKENS - seen))
        if tokens.size:
            largest = max(largest, int(tokens.max()))
        seen += tokens.size
    if largest >= tokenizer.vocab_size:
        raise ValueError(f"{dataset.path_prefix}.bin holds token id {largest}, beyond the vocabulary of "
                         f"{type(tokenizer).__name__} ({tokenizer.vocab_size} ids): preprocess and train with "
                         "the same --tokenizer-type and --tokenizer-model")


def run_tokenizer(cfg: TrainConfig) -> Tokenizer:
    """The tokenizer --tokenizer-type and --tokenizer-model name; a ConfigError names what is wrong."""
    try:
        return build_tokenizer(cfg.tokenizer_type, cfg.tokenizer_model, cfg.vocab_file, cfg.merge_file,
                               cfg.tokenizer_vocab_size)
    except (ValueError, OSError) as e:
        raise ConfigError(str(e)) from e


def build_training_data(cfg: TrainConfig, seq_length: int) -> TrainingData:
    """The tokenizer and the train/valid datasets of this run; bad input raises ConfigError naming the file.

    Training reads train_iters global batches and every evaluation the first eval_iters
    global batches of the valid split, so exactly that many samples are asked for (the
    datasets round them up to whole epochs); the test split is never read.
    """
    tokenizer = run_tokenizer(cfg)
    evaluating = bool(cfg.eval_interval and cfg.eval_iters)
    documents = DocumentMasking.of(vars(cfg), tokenizer.eod)
    if cfg.mock_data:  # Megatron's --mock-data: random tokens of the tokenizer's vocabulary, no corpus
        train = RandomTokens(tokenizer.vocab_size, seq_length, cfg.seed)
        valid = RandomTokens(tokenizer.vocab_size, seq_length, cfg.seed + 1) if evaluating else None
        description = (f"--mock-data: random tokens; {type(tokenizer).__name__} (vocab {tokenizer.vocab_size}); "
                       f"samples of {seq_length + 1} tokens")
        return TrainingData(tokenizer, train, valid, description, documents)
    try:
        if cfg.data_path:
            data_path, corpus = cfg.data_path, f"--data-path {' '.join(cfg.data_path)}"
        else:
            prefix, corpus = build_default_corpus(cfg.data_cache_dir)
            data_path = [prefix]
        for prefix in parse_data_path(data_path)[0]:
            check_token_ids(IndexedDataset(prefix), tokenizer)
        num_samples = (cfg.train_iters * cfg.global_batch_size,
                       cfg.eval_iters * cfg.global_batch_size if evaluating else 0, 0)
        train, valid, _ = build_train_valid_test_datasets(data_path, cfg.split, seq_length, cfg.seed, num_samples,
                                                          cfg.data_cache_dir)
    except (ValueError, OSError) as e:  # the data modules' errors name the file and what is wrong with it
        raise ConfigError(str(e)) from e
    description = (f"{corpus}; {type(tokenizer).__name__} (vocab {tokenizer.vocab_size}); {len(train):,} train"
                   f"{f' and {len(valid):,} valid' if valid is not None else ''} samples of {seq_length + 1} tokens")
    if documents is not None:
        description += f"; {documents.describe()}"
    return TrainingData(tokenizer, train, valid, description, documents)
