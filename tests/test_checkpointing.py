"""Checkpoint files: a save failing halfway, pruning, damaged files refused against the manifest,
--ckpt-step, a checkpoint without a manifest, background saves (one process), and failures on one
rank agreed by all (two ranks)."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from helpers.parity import setup_rank
from helpers.tiny import tiny_config
from megatron_lite import comm, parallel_state
from megatron_lite.checkpointing import MARKER, load_checkpoint, save_checkpoint
from megatron_lite.config import ConfigError, TrainingError
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.training.loop import pretrain


@pytest.fixture(scope="module")
def straight() -> list[float]:
    """Losses of 6 uninterrupted steps, which every resumed run below must reproduce."""
    return pretrain(tiny_config(train_iters=6))["losses"]


def test_save_failing_halfway_keeps_previous_checkpoint(tmp_path: Path, monkeypatch, straight) -> None:
    real_save = torch.save

    def failing_save(obj, path, *args, **kwargs) -> None:
        if isinstance(path, (str, Path)) and "iter_0000004" in str(path):  # the first file of the second checkpoint
            raise OSError(28, "No space left on device")
        real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(TrainingError, match=r"saving the checkpoint of iteration 4 to .* failed \(rank 0: OSError: "
                                            r".*No space left on device\); the previous checkpoints and "
                                            r"latest_checkpointed_iteration.txt are untouched; the latest checkpoint "
                                            r"in .* is iteration 2"):
        pretrain(tiny_config(train_iters=6, save_interval=2, save=str(tmp_path)))
    monkeypatch.setattr(torch, "save", real_save)
    assert (tmp_path / MARKER).read_text() == "2"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000002"]  # no .tmp left behind
    assert pretrain(tiny_config(train_iters=6, load=str(tmp_path)))["losses"] == straight[2:]


def test_keep_last_prunes_old_checkpoints(tmp_path: Path) -> None:
    pretrain(tiny_config(train_iters=4, save_interval=1, keep_last=2, save=str(tmp_path)))
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000003", "iter_0000004"]


def test_damaged_files_are_refused_naming_them_and_the_newest_intact(tmp_path: Path, straight) -> None:
    pretrain(tiny_config(train_iters=6, save_interval=2, exit_interval=4, save=str(tmp_path)))
    manifest = json.loads((tmp_path / "iter_0000004" / "manifest.json").read_text())
    assert manifest["iteration"] == 4 and list(manifest["files"]) == [".metadata", "__0_0.distcp", "common.pt",
                                                                      "metadata.json"]
    shard = tmp_path / "iter_0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x10  # one flipped bit: torch.load would read a slightly different weight
    shard.write_bytes(bytes(data))
    with pytest.raises(ConfigError, match=f"checkpoint {tmp_path / 'iter_0000004'} is damaged: {shard} does not "
                                          "match its checksum .*; the newest intact checkpoint is iteration 2: resume "
                                          "from it with --ckpt-step 2"):
        pretrain(tiny_config(train_iters=6, load=str(tmp_path)))
    assert pretrain(tiny_config(train_iters=6, load=str(tmp_path), ckpt_step=2))["losses"] == straight[2:]

    shard.write_bytes(bytes(data[:1000]))
    with pytest.raises(ConfigError, match=f"{shard} has 1000 bytes, the manifest says {len(data)}"):
        pretrain(tiny_config(train_iters=6, load=str(tmp_path)))
    shutil.rmtree(tmp_path / "iter_0000002")
    shard.unlink()
    with pytest.raises(ConfigError, match=f"{shard} is missing; {tmp_path} holds no intact checkpoint before it"):
        pretrain(tiny_config(train_iters=6, load=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"--ckpt-step=3: .*iter_0000003 does not exist; .* holds iterations \[4\]"):
        pretrain(tiny_config(train_iters=6, load=str(tmp_path), ckpt_step=3))


def test_checkpoint_without_manifest_still_loads(tmp_path: Path, capsys, straight) -> None:
    """As written before manifests existed: loaded unverified, with a warning."""
    pretrain(tiny_config(train_iters=6, exit_interval=3, save=str(tmp_path)))
    (tmp_path / "iter_0000003" / "manifest.json").unlink()
    assert pretrain(tiny_config(train_iters=6, load=str(tmp_path)))["losses"] == straight[3:]
    assert "has no manifest (saved by an older version): its files are not verified" in capsys.readouterr().out


def test_async_save_resumes_bit_exactly(tmp_path: Path, capsys, straight) -> None:
    pretrain(tiny_config(train_iters=6, save_interval=1, exit_interval=4, async_save=True, save=str(tmp_path)))
    out = capsys.readouterr().out
    assert "> saving checkpoint at iteration 1 in the background" in out
    assert "> saved checkpoint at iteration 4" in out
    assert (tmp_path / MARKER).read_text() == "4"
    for iteration in range(1, 5):
        assert (tmp_path / f"iter_{iteration:07d}" / "manifest.json").exists()
    assert pretrain(tiny_config(train_iters=6, load=str(tmp_path)))["losses"] == straight[4:]


def _unwritable(*args, **kwargs) -> None:
    raise PermissionError(13, "Permission denied")


def agreement_worker(root: str) -> dict[str, str]:
    """tp 2: a save whose write fails on rank 1 only, then a load of a checkpoint in which only rank 1's
    file is damaged. Each must fail on both ranks, with the same message, and never hang."""
    config = tiny_config(train_iters=2, save=root).updated(parallel={"tensor_model_parallel_size": 2})
    model = setup_rank(config)
    save_checkpoint(root, 1, 4, model.chunks, model.optimizer, config)
    errors = {}
    real_save = torch.save
    if parallel_state.get_grid().rank == 1:
        torch.save = _unwritable
    try:
        save_checkpoint(root, 2, 8, model.chunks, model.optimizer, config)
    except TrainingError as exc:
        errors["save"] = str(exc)
    torch.save = real_save
    comm.barrier()
    if parallel_state.get_grid().rank == 1:
        shard = Path(root) / "iter_0000001" / "__1_0.distcp"
        shard.write_bytes(shard.read_bytes()[:-1])
    comm.barrier()
    try:
        load_checkpoint(root, model.chunks, model.optimizer, config)
    except ConfigError as exc:
        errors["load"] = str(exc)
    return errors


def test_failures_on_one_rank_are_agreed_by_every_rank(tmp_path: Path) -> None:
    ranks = run_on_ranks(agreement_worker, 2, str(tmp_path))
    assert ranks[0] == ranks[1]
    assert ranks[0]["save"].startswith(f"saving the checkpoint of iteration 2 to {tmp_path} failed (rank 1: "
                                       "PermissionError: [Errno 13] Permission denied)")
    assert (tmp_path / MARKER).read_text() == "1" and not (tmp_path / "iter_0000002.tmp").exists()
    shard = tmp_path / "iter_0000001" / "__1_0.distcp"
    assert ranks[0]["load"].startswith(f"checkpoint {tmp_path / 'iter_0000001'} is damaged: {shard} has ")
