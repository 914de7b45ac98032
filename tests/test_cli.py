"""pretrain_gpt.py as a user runs it: the log line, the metrics file, and one-line errors."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pretrain_gpt
from helpers.commands import ROOT, run_command

TINY = ["--num-layers", "2", "--hidden-size", "32", "--num-attention-heads", "4", "--num-query-groups", "2",
        "--seq-length", "16", "--micro-batch-size", "2", "--global-batch-size", "4", "--train-iters", "4",
        "--log-interval", "2", "--eval-interval", "4", "--eval-iters", "2"]
LOG_LINE = re.compile(
    r" iteration +(\d+)/ +(\d+) \| consumed samples: +(\d+) \| elapsed time per iteration \(ms\): [\d.]+ \|"
    r" learning rate: [\d.E+-]+ \| global batch size: +(\d+) \| lm loss: [\d.E+-]+ \| loss scale: 1\.0 \|"
    r" grad norm: [\d.]+ \| number of skipped iterations: +0 \| tokens/s: \d+ \|"
    r" TFLOP/s/GPU: [\d.]+ \| MFU: (n/a|[\d.]+%) \|")


def run(args: list[str], launcher: list[str] | None = None) -> subprocess.CompletedProcess:
    return run_command((launcher or [sys.executable]) + [str(ROOT / "pretrain_gpt.py"), *args])


def _train_records(log_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (log_dir / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def test_cli_run_logs_and_writes_metrics(tmp_path: Path) -> None:
    result = run(TINY + ["--log-dir", str(tmp_path)])
    assert result.returncode == 0, result.stderr
    lines = [m for m in map(LOG_LINE.search, result.stdout.splitlines()) if m]
    assert ([(m.group(1), m.group(2), m.group(3), m.group(4)) for m in lines]
            == [("2", "4", "8", "4"), ("4", "4", "16", "4")])
    assert "validation loss at iteration 4 | lm loss value:" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["kind"] for r in records] == ["train", "train", "validation"]
    assert records[1]["iteration"] == 4 and records[1]["tokens_per_s"] > 0 and records[1]["mfu"] is None


def test_torchrun_single_process(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1"]
    result = run(TINY + ["--train-iters", "2", "--save", str(tmp_path)], launcher)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert (tmp_path / "metrics.jsonl").exists()


def test_bad_flag_is_one_line_and_nonzero() -> None:
    result = run(["--hidden-size", "100", "--num-attention-heads", "3"])
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "pretrain_gpt.py: error: --hidden-size=100 is not divisible by --num-attention-heads=3 (or set --kv-channels)"]
    assert result.stdout == ""


def test_torchrun_tensor_parallel_and_bad_layout_on_every_rank(tmp_path: Path) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = run(TINY + ["--tp", "2", "--sp", "--save", str(tmp_path)], launcher)
    assert result.returncode == 0, result.stderr
    assert "> layout: tp2-sp on world 2; tp groups [[0, 1]]" in result.stdout
    assert len([line for line in result.stdout.splitlines() if LOG_LINE.search(line)]) == 2  # rank 0 only
    assert (sorted(p.name for p in (tmp_path / "iter_0000004").iterdir())
            == [".metadata", "__0_0.distcp", "__1_0.distcp", "common.pt", "manifest.json", "metadata.json"])
    resume = ["--train-iters", "6", "--log-interval", "1", "--eval-interval", "0"]
    other_layout = run(TINY + resume + ["--load", str(tmp_path), "--log-dir", str(tmp_path / "resumed")], launcher)
    assert other_layout.returncode == 0, other_layout.stderr
    assert f"> resharding checkpoint {tmp_path / 'iter_0000004'} saved with tp2 to dp2" in other_layout.stdout
    # The resumed run continues the data where the saved one stopped and the losses of one device.
    assert pretrain_gpt.main(TINY + resume + ["--log-dir", str(tmp_path / "straight")]) == 0
    resumed, straight = (_train_records(tmp_path / name) for name in ("resumed", "straight"))
    assert [(r["iteration"], r["consumed_samples"]) for r in resumed] == [(5, 20), (6, 24)]
    assert [r["lm_loss"] for r in resumed] == pytest.approx([r["lm_loss"] for r in straight[4:]], rel=1e-5)
    bad_flags = TINY + ["--tp", "2", "--num-attention-heads", "2", "--num-query-groups", "1"]
    message = "pretrain_gpt.py: error: --num-query-groups=1 is not divisible by --tensor-model-parallel-size=2"
    bad = run(bad_flags, launcher)
    assert bad.returncode != 0
    # torchrun stops the other rank once one has failed, so it may not get to print its line.
    errors = [line for line in bad.stderr.splitlines() if line.startswith("pretrain_gpt.py: error:")]
    assert errors and set(errors) == {message}
    # Validation runs before any process group exists, so each rank refuses on its own: here rank 1 alone.
    rank1 = run_command([sys.executable, str(ROOT / "pretrain_gpt.py"), *bad_flags],
                        env={**os.environ, "RANK": "1", "WORLD_SIZE": "2"})
    assert rank1.returncode == 2 and rank1.stderr.strip().splitlines() == [message]


def test_diverging_run_exits_1_with_one_line(tmp_path: Path) -> None:
    result = run(TINY + ["--lr", "1e4", "--clip-grad", "0", "--train-iters", "10", "--save", str(tmp_path)])
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "pretrain_gpt.py: error: iteration 2: grad norm is nan; stopped before the optimizer step "
        "(--no-check-for-nan-in-loss-and-grad lets a run go on); no checkpoint was saved"]


def test_output_path_that_is_a_file_is_refused_before_any_work(tmp_path: Path) -> None:
    existing = tmp_path / "notes.txt"
    existing.write_text("not a directory")
    for flag in ("--save", "--log-dir"):
        result = run(TINY + [flag, str(existing)])
        assert result.returncode == 2 and result.stdout == ""
        assert result.stderr.strip().splitlines() == [
            f"pretrain_gpt.py: error: {flag}={existing} is a file, not a directory"]
    result = run(TINY + ["--save", str(existing / "ckpt")])
    assert result.stderr.strip().splitlines() == [
        f"pretrain_gpt.py: error: --save={existing / 'ckpt'} cannot be created: {existing} is a file"]


def test_torchrun_context_parallel() -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    result = run(TINY + ["--cp", "2", "--cp-comm-type", "allgather", "--train-iters", "2"], launcher)
    assert result.returncode == 0, result.stderr
    assert "> layout: cp2-allgather on world 2; cp groups [[0, 1]]" in result.stdout
    assert len([line for line in result.stdout.splitlines() if LOG_LINE.search(line)]) == 1
