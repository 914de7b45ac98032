"""Preemption: SIGTERM to one rank of a tp 2 x pp 2 run (as a scheduler sends before it kills a job)
finishes the step on every rank, saves and exits 0; relaunched with --load, the run continues
bit-identically to one that was never interrupted. The run saves every step in the background
(--async-save), so saves are in flight when the signal arrives."""
from __future__ import annotations

import json
import sys
from pathlib import Path

from helpers.commands import ROOT, run_command

FLAGS = ["--tp", "2", "--pp", "2", "--sp", "--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4",
         "--num-query-groups", "2", "--seq-length", "16", "--micro-batch-size", "1", "--global-batch-size", "4",
         "--train-iters", "6", "--log-interval", "1", "--eval-interval", "0"]
SIGTERM_AFTER_STEP_3 = """
import os, signal, sys
sys.path.insert(0, {root!r})
import megatron_lite.training.loop as training
import pretrain_gpt

real_step = training.train_step


def step(model, batches, iteration, *args, **kwargs):
    result = real_step(model, batches, iteration, *args, **kwargs)
    if iteration == 3 and os.environ["RANK"] == "1":
        os.kill(os.getpid(), signal.SIGTERM)
    return result


training.train_step = step
sys.exit(pretrain_gpt.main())
"""


def torchrun(script: Path, *flags: str):
    return run_command([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "4",
                        str(script), *FLAGS, *flags])


def losses(log_dir: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (log_dir / "metrics.jsonl").read_text().splitlines()]
    return {r["iteration"]: r["lm_loss"] for r in records if r["kind"] == "train"}


def test_sigterm_to_one_rank_saves_exits_0_and_resumes_bit_exactly(tmp_path: Path) -> None:
    script, ckpt = tmp_path / "sigterm_after_step_3.py", tmp_path / "ckpt"
    script.write_text(SIGTERM_AFTER_STEP_3.format(root=str(ROOT)))
    stopped = torchrun(script, "--exit-signal-handler", "--async-save", "--save-interval", "1", "--save", str(ckpt))
    assert stopped.returncode == 0, stopped.stderr[-3000:]
    assert "> exiting at iteration 3: SIGTERM received (--exit-signal-handler)" in stopped.stdout
    assert (ckpt / "latest_checkpointed_iteration.txt").read_text() == "3"
    assert sorted(losses(ckpt)) == [1, 2, 3]

    resumed = torchrun(ROOT / "pretrain_gpt.py", "--load", str(ckpt), "--log-dir", str(tmp_path / "resumed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    straight = torchrun(ROOT / "pretrain_gpt.py", "--log-dir", str(tmp_path / "straight"))
    assert straight.returncode == 0, straight.stderr[-3000:]
    assert losses(tmp_path / "resumed") == {i: losses(tmp_path / "straight")[i] for i in (4, 5, 6)}
