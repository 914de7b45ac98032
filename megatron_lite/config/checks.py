"""What every configuration check raises, and the helpers the checks share."""
from __future__ import annotations


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the field, value and what is allowed."""


class TrainingError(RuntimeError):
    """Training cannot go on (a non-finite loss or grad norm, a checkpoint that failed to save);
    every rank raises it together, and the message says what is left untouched."""


def require(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def require_positive(obj: object, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        require(value is not None and value > 0, f"{flag(name)}={value} must be a positive number")


def require_null_vocab(vocab_size: int | None) -> None:
    """NullTokenizer's one input: how many ids the data holds."""
    require((vocab_size or 0) >= 1,
            f"--tokenizer-type NullTokenizer needs --vocab-size N >= 1 (the ids 0..N-1); got {vocab_size}")


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")

