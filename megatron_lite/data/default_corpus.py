"""A small built-in corpus so the main job runs with no data: the running Python's stdlib sources.

Every machine that runs this code has those files, so a first run needs no download and no
preprocessing. The corpus is built once into a Megatron `.bin/.idx`, exactly what
`tools/preprocess_data.py --input FILES --append-eod` writes for the same files (one
document per file, byte-level tokens, each document ended by the eod id), and then read
by the same GPT dataset as any `--data-path`.
"""
from __future__ import annotations

import hashlib
import os
import sys
import sysconfig
from pathlib import Path

from megatron_lite.data.corpus_reader import BadRecordError, iter_records, record_texts
from megatron_lite.data.indexed_dataset import build_indexed_datasets, data_file_path, index_file_path, optimal_dtype
from megatron_lite.data.tokenizer import ByteTokenizer

DEFAULT_MAX_BYTES = 8 * 1024 * 1024
# Bump when the way the corpus is built changes, so that old caches are not reused.
CORPUS_FORMAT_VERSION = 2
# Installed packages differ from machine to machine; the stdlib proper does not.
_SKIPPED_DIRS = {"site-packages", "dist-packages", "__pycache__"}


def default_cache_dir() -> Path:
    return Path(os.environ.get("MEGATRON_LITE_CACHE", Path.home() / ".cache" / "megatron_lite"))


def stdlib_sources(max_bytes: int = DEFAULT_MAX_BYTES) -> list[Path]:
    """The stdlib's non-empty .py files in sorted order, as many as fit in max_bytes."""
    root = sysconfig.get_paths()["stdlib"]
    found = []
    for folder, subfolders, files in os.walk(root):
        # Pruned, not filtered afterwards: site-packages alone can hold 100k files.
        subfolders[:] = [d for d in subfolders if d not in _SKIPPED_DIRS]
        found += [os.path.join(folder, name) for name in files if name.endswith(".py")]
    picked, total = [], 0
    for path in map(Path, sorted(found)):
        size = path.stat().st_size
        if size == 0:
            continue
        if total + size > max_bytes:
            break
        picked.append(path)
        total += size
    return picked


def _write_corpus(files: list[Path], prefix: str) -> None:
    tokenizer = ByteTokenizer()
    # Ranks building the same corpus at once write identical bytes, so whichever rename wins is right.
    with build_indexed_datasets([prefix], optimal_dtype(tokenizer.vocab_size)) as (builder,):
        for record in iter_records([str(f) for f in files], ["text"]):
            try:
                text, = record_texts(record, ["text"])
            except BadRecordError:  # a stdlib test file in a legacy encoding: preprocess_data skips it too
                continue
            builder.add_document(tokenizer.encode(text) + [tokenizer.eod])


def build_default_corpus(cache_dir: str | Path | None = None, max_bytes: int = DEFAULT_MAX_BYTES) -> tuple[str, str]:
    """(the dataset prefix of the built-in corpus, a description for the log), building it if not cached.

    The cache is keyed by a hash of what goes in (each file's path, size and modification
    time, and the format version), so another Python, an upgraded one or a changed
    max_bytes builds its own.
    """
    files = stdlib_sources(max_bytes)
    if not files:
        raise FileNotFoundError(f"no .py files under {sysconfig.get_paths()['stdlib']} for the built-in corpus")
    stats = [p.stat() for p in files]
    listing = [str(CORPUS_FORMAT_VERSION)] + [f"{p}:{s.st_size}:{s.st_mtime_ns}" for p, s in zip(files, stats)]
    key = hashlib.sha256("\n".join(listing).encode()).hexdigest()[:16]
    cache = Path(cache_dir or default_cache_dir())
    prefix = str(cache / f"default_corpus_{key}_text_document")
    if not (os.path.isfile(index_file_path(prefix)) and os.path.isfile(data_file_path(prefix))):
        cache.mkdir(parents=True, exist_ok=True)
        _write_corpus(files, prefix)
    megabytes = sum(s.st_size for s in stats) / 1e6
    description = (f"built-in corpus: {len(files)} stdlib .py files ({megabytes:.1f} MB) of Python "
                   f"{sys.version.split()[0]} under {sysconfig.get_paths()['stdlib']}, cached at {prefix}.bin/.idx")
    return prefix, description
