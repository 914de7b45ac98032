"""Fault tolerance: torchrun --max-restarts 1 restarts the group after a rank is killed (kill -9)
right after a checkpoint; the run resumes from it and ends with the uninterrupted run's loss.

The job is launched as a user launches a job that resumes itself: `--save ck --load ck` with
ck not existing yet, and no environment variable to set: the restarted workers must find
each other although torchrun keeps its store from the failed attempt (pytorch issue 135712).

The kill is injected from outside the library: the test runs pretrain_gpt.py through a small
launcher script that wraps the checkpoint writer so that rank 1 kills itself once after the
first save; a marker file makes the restarted attempt run clean.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from helpers.commands import ROOT, run_command

FLAGS = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
         "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
         "--log-interval", "1", "--eval-interval", "0", "--save-interval", "2"]
KILL_AFTER_FIRST_SAVE = """
import os, sys
from pathlib import Path
sys.path.insert(0, {root!r})
import megatron_lite.training.loop as training
import pretrain_gpt

real_save = training.CheckpointWriter.save


def save_then_die(self, *args, **kwargs):
    real_save(self, *args, **kwargs)
    marker = Path({marker!r})
    if os.environ["RANK"] == "1" and not marker.exists():
        marker.touch()
        os.kill(os.getpid(), 9)


training.CheckpointWriter.save = save_then_die
sys.exit(pretrain_gpt.main())
"""


def torchrun(script: Path, save: Path) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", str(script), *FLAGS, "--save", str(save), "--load", str(save)]
    return run_command(cmd)


def final_loss(save: Path) -> tuple[int, float]:
    records = [json.loads(line) for line in (save / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r["kind"] == "train"][-1]
    return last["iteration"], last["lm_loss"]


def test_killed_rank_restarts_and_resumes(tmp_path: Path) -> None:
    killer, marker = tmp_path / "kill_after_first_save.py", tmp_path / "killed"
    killer.write_text(KILL_AFTER_FIRST_SAVE.format(root=str(ROOT), marker=str(marker)))
    faulty = torchrun(killer, tmp_path / "faulty")
    assert faulty.returncode == 0, faulty.stderr[-3000:]
    assert marker.exists()
    assert "WARNING: --load={} does not exist yet; training starts from scratch".format(tmp_path / "faulty") \
        in faulty.stdout
    clean = torchrun(ROOT / "pretrain_gpt.py", tmp_path / "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    assert final_loss(tmp_path / "faulty") == final_loss(tmp_path / "clean")
    records = (tmp_path / "faulty" / "metrics.jsonl").read_text().splitlines()
    iterations = [json.loads(line)["iteration"] for line in records]
    assert iterations == [1, 2, 3, 4]  # the second attempt started at the checkpoint of iteration 2
