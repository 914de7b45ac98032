"""A small built-in corpus so the main job runs with no data: the running Python's stdlib sources.

Every machine that runs this code has those files, so a first run needs no download and no
preprocessing. Documents are the .py files in sorted order, byte-tokenized, each followed
by the end-of-document id; the token stream is cached as .npy keyed by what went into it.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

import numpy as np

from megatron_lite.data.tokenizer import ByteTokenizer

DEFAULT_MAX_BYTES = 8 * 1024 * 1024


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_LITE_CACHE", Path.home() / ".cache" / "megatron_lite"))


def _stdlib_sources(max_bytes: int) -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    picked, total = [], 0
    for path in sorted(root.rglob("*.py")):
        # Installed packages differ from machine to machine; the stdlib proper does not.
        if "site-packages" in path.parts or "dist-packages" in path.parts:
            continue
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        picked.append(path)
        total += size
    return picked


def load_default_corpus(cache_dir: str | Path | None = None,
                        max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[np.ndarray, list[int], str]:
    """(tokens uint16, document start offsets, a description for the log)."""
    files = _stdlib_sources(max_bytes)
    if not files:
        raise RuntimeError(f"no .py files found under {sysconfig.get_paths()['stdlib']} for the default corpus")
    key = hashlib.sha256("\n".join(f"{p}:{p.stat().st_size}" for p in files).encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir()) / f"default_corpus_{key}.npz"
    description = (f"built-in corpus: {len(files)} stdlib .py files of Python {sys.version.split()[0]} "
                   f"under {files[0].parent}, byte-level tokens, cached at {cache}")
    if cache.exists():
        with np.load(cache) as data:
            return data["tokens"], data["doc_starts"].tolist(), description
    eod = ByteTokenizer().eod
    pieces, doc_starts, offset = [], [], 0
    for path in files:
        doc = np.frombuffer(path.read_bytes(), dtype=np.uint8).astype(np.uint16)
        pieces.append(np.append(doc, np.uint16(eod)))
        doc_starts.append(offset)
        offset += len(doc) + 1
    tokens = np.concatenate(pieces)
    cache.parent.mkdir(parents=True, exist_ok=True)
    # Write under a temporary name, then rename: a crash never leaves a half cache behind.
    tmp = cache.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, tokens=tokens, doc_starts=np.asarray(doc_starts, dtype=np.int64))
    os.replace(tmp, cache)
    return tokens, doc_starts, description
