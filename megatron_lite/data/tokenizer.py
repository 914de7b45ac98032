"""Tokenizers behind one interface: encode, decode, vocab_size, eod, pad."""
from __future__ import annotations

import os
from abc import ABC, abstractmethod


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


TOKENIZERS = {cls.__name__: cls for cls in (ByteTokenizer, SentencePieceTokenizer, HuggingFaceTokenizer)}


def build_tokenizer(tokenizer_type: str, tokenizer_model: str | None = None) -> Tokenizer:
    """The tokenizer Megatron's --tokenizer-type / --tokenizer-model name."""
    if tokenizer_type not in TOKENIZERS:
        raise ValueError(f"unknown --tokenizer-type {tokenizer_type!r}; choose one of {sorted(TOKENIZERS)}")
    if tokenizer_type == "ByteTokenizer":
        return ByteTokenizer()
    if tokenizer_model is None:
        raise ValueError(f"--tokenizer-type {tokenizer_type} needs --tokenizer-model (a file or folder)")
    if not os.path.exists(tokenizer_model):
        raise FileNotFoundError(f"--tokenizer-model {tokenizer_model} for {tokenizer_type} does not exist")
    try:
        return TOKENIZERS[tokenizer_type](tokenizer_model)
    except ValueError:
        raise  # ours, and they name the file already
    except Exception as e:
        # The libraries' own errors (OSError, RuntimeError, bare Exception) rarely name the file.
        raise ValueError(f"cannot load {tokenizer_type} from {tokenizer_model}: {e}") from e

