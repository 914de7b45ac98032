"""Checkpoint files on one process: a save killed halfway, pruning, bad input."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from megatron_lite.checkpointing import MARKER
from megatron_lite.config import ConfigError
from megatron_lite.training import pretrain
from tiny import tiny_config


def test_save_killed_halfway_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    straight = pretrain(tiny_config(train_iters=4))["losses"]
    real_save, calls = torch.save, []

    def failing_save(obj, path, *args, **kwargs) -> None:
        calls.append(path)
        if len(calls) == 2:  # the first file of the second checkpoint
            raise OSError("disk full")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        pretrain(tiny_config(train_iters=4, save_interval=2, save=str(tmp_path)))
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / MARKER).read_text() == "2"
    assert not (tmp_path / "iter_0000004").exists()
    assert pretrain(tiny_config(train_iters=4, load=str(tmp_path)))["losses"] == straight[2:]


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    pretrain(tiny_config(train_iters=4, save_interval=1, keep_last=2, save=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]


def test_missing_and_truncated_files_are_named(tmp_path: Path) -> None:
    pretrain(tiny_config(train_iters=1, save=str(tmp_path)))
    shard = tmp_path / "iter_0000001" / "mp_rank_00" / "model_optim_rng.pt"
    shard.write_bytes(shard.read_bytes()[:1000])
    with pytest.raises(ConfigError, match=f"cannot read checkpoint {shard}"):
        pretrain(tiny_config(train_iters=2, load=str(tmp_path)))
    shutil.rmtree(shard.parent)
    with pytest.raises(ConfigError, match=f"checkpoint file {shard} is missing"):
        pretrain(tiny_config(train_iters=2, load=str(tmp_path)))
