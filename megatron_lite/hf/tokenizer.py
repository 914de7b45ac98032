"""The tokenizer half of a Hugging Face export: whatever tokenizer the run trained with, the folder
gets a `transformers` tokenizer that `AutoTokenizer` loads and that encodes text to our ids.

- ByteTokenizer has no file, so one is built: a byte-level `tokenizers` model without merges, so
  byte b is token b, plus <|endoftext|> (256, eod) and <pad> (257).
- A SentencePiece .model is copied as tokenizer.model and converted by `transformers` (it follows
  the model's own normalizer settings) to a tokenizer.json.
- A tokenizer.json is copied and given the tokenizer_config.json that names its eos and pad
  tokens; a transformers folder is copied file by file.

transformers then writes its tokenizer.json and tokenizer_config.json over the copies, with the
eos and pad tokens set to our eod and pad. The folder is loaded back with AutoTokenizer and
checked against our tokenizer, so a conversion that encodes differently fails the export.
"""
from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING

from tokenizers import AddedToken, decoders, models, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer

from megatron_lite.config import ConfigError
from megatron_lite.data.tokenizer import Tokenizer, build_tokenizer
from megatron_lite.hf.convert import TOKENIZER_FILES

if TYPE_CHECKING:  # transformers takes seconds to import; only an export needs it, not a reshard
    from transformers import PreTrainedTokenizerBase

BYTE_EOD_TOKEN, BYTE_PAD_TOKEN = "<|endoftext|>", "<pad>"
# Spaces, tabs, newlines, punctuation that decode's space clean-up would touch, and multi-byte UTF-8.
PROBE_TEXT = "Hello  world , ok .\n\n\ttabs  and spaces — héllo wörld 你好 🎉 "


def byte_level_tokenizer() -> HFTokenizer:
    """ByteTokenizer's ids as a `tokenizers.Tokenizer`: byte b is id b, then eod 256 and pad 257."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    # The byte-level pre-tokenizer spells each byte as one printable character (GPT-2's table);
    # with no merges every character stays its own token, the id of its byte.
    vocab = {char: byte for byte, char in bytes_to_unicode().items()}
    tokenizer = HFTokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(BYTE_EOD_TOKEN, special=True), AddedToken(BYTE_PAD_TOKEN, special=True)])
    return tokenizer


def copy_tokenizer_files(source: Path, folder: Path) -> list[str]:
    """Copy the tokenizer files (TOKENIZER_FILES) of transformers folder `source` into `folder`,
    creating it if there are any; returns their names."""
    names = [name for name in TOKENIZER_FILES if (source / name).exists()]
    if names:
        folder.mkdir(parents=True, exist_ok=True)
    for name in names:
        shutil.copy(source / name, folder / name)
    return names


def _transformers_tokenizer(kind: str, source: Path | None, folder: Path) -> PreTrainedTokenizerBase:
    """The run's tokenizer as a `transformers` one, its original files copied into `folder` first."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    if kind == "ByteTokenizer":
        # Our encode turns "<|endoftext|>" in text into its bytes, never into eod.
        return PreTrainedTokenizerFast(tokenizer_object=byte_level_tokenizer(), split_special_tokens=True)
    if source.is_dir():
        copy_tokenizer_files(source, folder)
        return AutoTokenizer.from_pretrained(folder)
    if kind == "SentencePieceTokenizer":
        shutil.copy(source, folder / "tokenizer.model")
        # SentencePiece reads control pieces such as "</s>" in text as plain text.
        return PreTrainedTokenizerFast.from_pretrained(folder, split_special_tokens=True)
    shutil.copy(source, folder / "tokenizer.json")
    return PreTrainedTokenizerFast(tokenizer_file=str(folder / "tokenizer.json"))


def check_export(ours: Tokenizer, folder: Path) -> None:
    """ConfigError unless AutoTokenizer on `folder` has our eod, pad and ids on PROBE_TEXT."""
    from transformers import AutoTokenizer

    theirs = AutoTokenizer.from_pretrained(folder)
    ids = ours.encode(PROBE_TEXT)
    checks = {"eos id": (theirs.eos_token_id, ours.eod), "pad id": (theirs.pad_token_id, ours.pad),
              "ids": (theirs.encode(PROBE_TEXT, add_special_tokens=False), ids),
              "decoded text": (theirs.decode(ids, skip_special_tokens=True), ours.decode(ids))}
    wrong = [f"{what} {got!r} (ours {want!r})" for what, (got, want) in checks.items() if got != want]
    if wrong:
        raise ConfigError(f"the exported tokenizer in {folder} differs from the run's: {'; '.join(wrong)}")


def export_tokenizer(train_config: dict, vocab_size: int, out: Path) -> tuple[dict[str, int], str]:
    """Write the run's tokenizer into `out` as a transformers tokenizer folder.

    Returns the token ids for config.json (generation stops on eos, our eod; bos is eod too,
    since in packed training data documents start after one) and a line saying what was written.
    `vocab_size` is the model's: a model of another size (one imported from Hugging Face, whose
    checkpoint names no tokenizer) gets no tokenizer and no ids.
    """
    kind = train_config.get("tokenizer_type") or "ByteTokenizer"
    source = train_config.get("tokenizer_model")
    try:
        ours = build_tokenizer(kind, source)
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"cannot export the run's tokenizer: {e}") from e
    if ours.vocab_size != vocab_size:
        return {}, (f"tokenizer: none written: the model has {vocab_size} tokens and the checkpoint's "
                    f"{kind} {ours.vocab_size}, so it was not trained with it; copy its tokenizer files into {out}")
    with tempfile.TemporaryDirectory() as staging:
        # Converted apart from `out`, so that a tokenizer exported there before cannot leak into the
        # conversion, and a run whose tokenizer file is in `out` itself reads it before it is replaced.
        staged = Path(staging)
        hf = _transformers_tokenizer(kind, Path(source) if source else None, staged)
        hf.eos_token, hf.pad_token = hf.convert_ids_to_tokens([ours.eod, ours.pad])
        hf.save_pretrained(staged)
        written = sorted(p.name for p in staged.iterdir())
        for name in written:
            shutil.copy(staged / name, out / name)
    check_export(ours, out)
    origin = f" from {source}" if source else ""
    line = f"tokenizer: {kind}{origin} as {', '.join(written)} (eos {ours.eod}, pad {ours.pad})"
    return {"bos_token_id": ours.eod, "eos_token_id": ours.eod, "pad_token_id": ours.pad}, line
