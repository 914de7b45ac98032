"""Tokenizers behind one interface: encode, decode, vocab_size, eod, pad."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod

from megatron_lite.config.checks import require_null_vocab


class Tokenizer(ABC):
    """What the data pipeline and the model need from a tokenizer."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of ids the tokenizer can emit (before the model pads it)."""

    @property
    @abstractmethod
    def eod(self) -> int:
        """End-of-document id, appended between documents."""

    @property
    @abstractmethod
    def pad(self) -> int:
        """Padding id."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Text to ids (no eod appended)."""

    @abstractmethod
    def decode(self, ids: list[int]) -> str:
        """Ids to text; special ids are dropped."""


class ByteTokenizer(Tokenizer):
    """UTF-8 bytes as ids 0..255, then eod=256 and pad=257. Needs no file."""

    @property
    def vocab_size(self) -> int:
        return 258

    @property
    def eod(self) -> int:
        return 256

    @property
    def pad(self) -> int:
        return 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
    """A SentencePiece `.model`; its eos piece ends documents, its pad piece (or eos) pads."""

    def __init__(self, model_path: str) -> None:
        import sentencepiece

        self._sp = sentencepiece.SentencePieceProcessor(model_file=model_path)
        if self._sp.eos_id() < 0:
            raise ValueError(f"SentencePiece model {model_path} has no eos piece to end documents with")

    @property
    def vocab_size(self) -> int:
        return self._sp.get_piece_size()

    @property
    def eod(self) -> int:
        return self._sp.eos_id()

    @property
    def pad(self) -> int:
        return self._sp.pad_id() if self._sp.pad_id() >= 0 else self.eod

    def encode(self, text: str) -> list[int]:
        return self._sp.encode(text, out_type=int)

    def decode(self, ids: list[int]) -> str:
        return self._sp.decode(list(ids))


class Llama2Tokenizer(SentencePieceTokenizer):
    """Megatron's Llama2Tokenizer: a SentencePiece .model whose documents each begin with its BOS id."""

    def encode(self, text: str) -> list[int]:
        bos = self._sp.bos_id()
        return ([bos] if bos >= 0 else []) + super().encode(text)


class NullTokenizer(Tokenizer):
    """Megatron's NullTokenizer: text is already ids written as numbers ("12 7 311"); ids 0..N-1
    (--vocab-size N), and N ends documents. What --mock-data runs with: no file needed."""

    def __init__(self, vocab_size: int) -> None:
        self._ids = vocab_size

    @property
    def vocab_size(self) -> int:
        return self._ids + 1

    @property
    def eod(self) -> int:
        return self._ids

    @property
    def pad(self) -> int:
        return self._ids

    def encode(self, text: str) -> list[int]:
        return [int(word) for word in text.split()]

    def decode(self, ids: list[int]) -> str:
        return " ".join(str(i) for i in ids if i < self._ids)


# Names that well-known tokenizer.json files give their document end and padding tokens.
_EOD_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")
_PAD_TOKENS = ("<pad>", "<|pad|>", "[PAD]")


class HuggingFaceTokenizer(Tokenizer):
    """A `tokenizers` tokenizer.json, or a local `transformers` tokenizer folder.

    A folder is loaded with AutoTokenizer, whose config names the eos and pad tokens; a bare
    tokenizer.json has no such config, so they are found by their usual names.
    """

    def __init__(self, path: str) -> None:
        if os.path.isdir(path):
            from transformers import AutoTokenizer

            auto = AutoTokenizer.from_pretrained(path, local_files_only=True)
            if auto.eos_token_id is None:
                raise ValueError(f"tokenizer folder {path} defines no eos token to end documents with")
            self._tokenizer = auto.backend_tokenizer
            self._eod = auto.eos_token_id
            self._pad = auto.pad_token_id if auto.pad_token_id is not None else self._eod
        else:
            from tokenizers import Tokenizer as HFTokenizer

            self._tokenizer = HFTokenizer.from_file(path)
            eod = self._find_token(_EOD_TOKENS)
            if eod is None:
                raise ValueError(f"tokenizer file {path} has none of the end-of-document tokens {_EOD_TOKENS}")
            self._eod = eod
            pad = self._find_token(_PAD_TOKENS)
            self._pad = eod if pad is None else pad

    def _find_token(self, names: tuple[str, ...]) -> int | None:
        ids = (self._tokenizer.token_to_id(name) for name in names)
        return next((i for i in ids if i is not None), None)

    @property
    def vocab_size(self) -> int:
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod(self) -> int:
        return self._eod

    @property
    def pad(self) -> int:
        return self._pad

    def encode(self, text: str) -> list[int]:
        return self._tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(list(ids), skip_special_tokens=True)


class GPT2BPETokenizer(HuggingFaceTokenizer):
    """GPT-2's byte-level BPE from its vocab.json and merges.txt (Megatron's --vocab-file and
    --merge-file); <|endoftext|> ends documents."""

    def __init__(self, vocab_file: str, merge_file: str) -> None:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers

        tokenizer = HFTokenizer(models.BPE.from_file(vocab_file, merge_file))
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        self._tokenizer = tokenizer
        eod = self._find_token(("<|endoftext|>",))
        if eod is None:
            raise ValueError(f"vocab file {vocab_file} has no <|endoftext|> token to end documents with")
        self._eod = self._pad = eod


TOKENIZERS = {cls.__name__: cls for cls in (ByteTokenizer, SentencePieceTokenizer, Llama2Tokenizer,
                                            HuggingFaceTokenizer, GPT2BPETokenizer, NullTokenizer)}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None, vocab_file: str | None = None,
                    merge_file: str | None = None, vocab_size: int | None = None) -> Tokenizer:
    """The tokenizer Megatron's --tokenizer-type names, from the files its type reads
    (--tokenizer-model; --vocab-file and --merge-file; --vocab-size for NullTokenizer)."""
    if tokenizer_type not in TOKENIZERS:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {sorted(TOKENIZERS)}")
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_type == "NullTokenizer":
        require_null_vocab(vocab_size)
        return NullTokenizer(vocab_size)
    files = {"--vocab-file": vocab_file, "--merge-file": merge_file} if tokenizer_type == "GPT2BPETokenizer" else {
        "--tokenizer-model": tokenizer_model}
    if None in files.values():
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs {' and '.join(files)}")
    for name, path in files.items():
        if not os.path.exists(path):
            raise FileNotFoundError(f"{name} {path} for {tokenizer_type} does not exist")
    try:
        return TOKENIZERS[tokenizer_type](*files.values())
    except ValueError:
        raise  # ours, and they name the file already
    except Exception as e:
        # The libraries' own errors (OSError, RuntimeError, bare Exception) rarely name the file.
        raise ValueError(f"cannot load {tokenizer_type} from {' and '.join(files.values())}: {e}") from e

