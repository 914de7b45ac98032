"""Where each file of a checkpoint lives (Megatron's names), and which iterations a directory holds."""
from __future__ import annotations

import re
from pathlib import Path

from megatron_lite import parallel_state
from megatron_lite.config import ConfigError

MARKER = "latest_checkpointed_iteration.txt"
FILENAME = "model_optim_rng.pt"


def checkpoint_dir(root: str | Path, iteration: int) -> Path:
    return Path(root) / f"iter_{iteration:07d}"


def shard_file(root: str | Path, iteration: int, tp_rank: int, pp_rank: int, pp: int) -> Path:
    """The model file of one (tp, pp) shard: mp_rank_TT, or mp_rank_TT_PPP when there are pipeline stages."""
    name = f"mp_rank_{tp_rank:02d}" + (f"_{pp_rank:03d}" if pp > 1 else "")
    return checkpoint_dir(root, iteration) / name / FILENAME


def rank_file(root: str | Path, iteration: int) -> Path:
    grid = parallel_state.get_grid()
    return shard_file(root, iteration, grid.coord("tp"), grid.coord("pp"), grid.size("pp"))


def optimizer_file(model_file: Path, dp_rank: int) -> Path:
    return model_file.with_name(f"distrib_optim_{dp_rank:03d}.pt")


def first_file(root: str | Path, iteration: int) -> Path:
    """The model file of tp rank 0 on the first stage, whatever the layout: it holds the layout and config."""
    with_stages = any(checkpoint_dir(root, iteration).glob("mp_rank_00_*"))
    return shard_file(root, iteration, 0, 0, 2 if with_stages else 1)


def saved_iterations(root: str | Path) -> list[int]:
    """The iterations of the complete iter_ directories in root, oldest first (.tmp ones are not complete)."""
    if not Path(root).is_dir():
        return []
    return sorted(int(p.name[5:]) for p in Path(root).iterdir() if re.fullmatch(r"iter_\d{7}", p.name) and p.is_dir())


def latest_iteration(root: str | Path) -> int | None:
    """The iteration the marker names; None when there is no marker (nothing saved yet)."""
    marker = Path(root) / MARKER
    if not marker.exists():
        return None
    text = marker.read_text().strip()
    if not text.isdigit():
        raise ConfigError(f"{marker} holds {text!r}, not an iteration number")
    return int(text)
