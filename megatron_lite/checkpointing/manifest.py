"""Each checkpoint's manifest.json: every file's size and CRC-32, written before the marker moves,
checked before a checkpoint is used.

A truncated file (a full disk, a copy cut short) or a flipped bit (bad storage) would
otherwise surface as an unpickling error deep in loading, or not at all. CRC-32 is the
checksum for this job: it detects any burst of up to 32 flipped bits and runs at memory
speed, where a cryptographic hash would add minutes to a large checkpoint for no gain.

Checking is split over the ranks (rank r reads every world-size-th file) and agreed on: every
rank learns of every damaged file, so all refuse together and none waits for the others.
"""
from __future__ import annotations

import json
import os
import zlib
from pathlib import Path

from megatron_lite import comm, parallel_state

MANIFEST = "manifest.json"
_BLOCK = 16 * 2**20


def file_entry(path: Path) -> dict[str, int]:
    """Size and CRC-32 of one file."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(_BLOCK):
            crc = zlib.crc32(block, crc)
    return {"bytes": path.stat().st_size, "crc32": crc}


def write_manifest(directory: Path, iteration: int, files: dict[str, dict[str, int]]) -> None:
    """`files` maps each path relative to `directory` to its file_entry."""
    path = directory / MANIFEST
    path.write_text(json.dumps({"iteration": iteration, "files": dict(sorted(files.items()))}, indent=1))
    with open(path, "rb") as f:  # on disk before the directory is renamed into place
        os.fsync(f.fileno())


def damaged_files(directory: Path) -> list[str] | None:
    """What is wrong with the files of a checkpoint directory, one line each ([] if intact);
    None when it has no manifest (written before manifests existed). Collective."""
    manifest = directory / MANIFEST
    if not manifest.exists():
        return None
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError) as exc:
        return [f"{manifest} cannot be read: {exc}"]
    grid = parallel_state.get_grid()
    mine = []
    for name in sorted(files)[grid.rank::grid.world_size]:
        path, want = directory / name, files[name]
        if not path.is_file():
            mine.append(f"{path} is missing")
            continue
        got = file_entry(path)
        if got["bytes"] != want["bytes"]:
            mine.append(f"{path} has {got['bytes']} bytes, the manifest says {want['bytes']}")
        elif got["crc32"] != want["crc32"]:
            mine.append(f"{path} does not match its checksum (its bytes changed after it was written)")
    return sorted(line for lines in comm.all_gather_object(mine) for line in lines)
