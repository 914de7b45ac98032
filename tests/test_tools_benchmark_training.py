"""tools/benchmark_training.py on CPU: every row trains and is measured, the CSV holds the same table."""
from __future__ import annotations

import csv
import os
import sys
from pathlib import Path

from helpers.commands import ROOT, run_command

TOOL = [sys.executable, str(ROOT / "tools" / "benchmark_training.py"), "--device", "cpu", "--steps", "2",
        "--warmup", "1"]
COLUMNS = ("row", "tokens_per_s", "tflops_per_device", "mfu", "peak_mem_gib", "final_loss", "vs_hf_eager", "note")


def table(argv: list[str]) -> dict[str, dict[str, str]]:
    """The printed table, row name -> column -> cell (the note may hold spaces; it comes last)."""
    # One thread: tiny ops on two busy cores otherwise spin in OpenMP barriers, many times slower.
    proc = run_command(TOOL + argv, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith("device cpu (fp32") and lines[1].split()[:2] == ["row", "tokens/s"]
    cells = [line.split(maxsplit=len(COLUMNS) - 1) for line in lines[2:]]
    return {c[0]: dict(zip(COLUMNS, c + [""] * (len(COLUMNS) - len(c)))) for c in cells}


def assert_measured(row: dict[str, str]) -> None:
    assert float(row["tokens_per_s"]) > 0 and float(row["tflops_per_device"]) > 0, row
    assert 0 < float(row["final_loss"]) < 10, row  # about ln(256) = 5.5 on random tokens
    assert row["mfu"] == row["peak_mem_gib"] == "n/a", row  # no peak TFLOP/s and no allocator stats on CPU


def compiled_graphs(row: dict[str, str]) -> int:
    """The count in a compile row's note; 0 when it says nothing was compiled."""
    prefix = "compiled graphs: "
    return int(row["note"].removeprefix(prefix)) if row["note"].startswith(prefix) else 0


def test_eager_rows_are_measured_against_hf_and_written_to_csv(tmp_path: Path) -> None:
    out = tmp_path / "train.csv"
    rows = ["megatron_lite", "megatron_lite-unfused", "megatron_lite-recompute-full", "hf-eager"]
    printed = table(["--rows", *rows, "--csv", str(out)])
    assert list(printed) == rows
    for row in printed.values():
        assert_measured(row)
        assert float(row["vs_hf_eager"]) > 0
    assert printed["hf-eager"]["vs_hf_eager"] == "1.00"
    # Same weights init, data and math on CPU (the fused ops fall back to the same references).
    assert printed["megatron_lite"]["final_loss"] == printed["megatron_lite-unfused"]["final_loss"]
    # Recomputation replays the same math: the same loss.
    assert printed["megatron_lite"]["final_loss"] == printed["megatron_lite-recompute-full"]["final_loss"]

    with out.open() as f:
        written = list(csv.DictReader(f))
    assert [r["row"] for r in written] == rows and list(written[0]) == list(COLUMNS)
    for r in written:
        assert f"{float(r['tokens_per_s']):.0f}" == printed[r["row"]]["tokens_per_s"]
        assert r["mfu"] == r["peak_mem_gib"] == ""


def test_compile_rows_compile() -> None:
    # Separate from the eager rows, and only those two: each inductor compile takes ~20 s on 2 cores.
    printed = table(["--rows", "megatron_lite-compile", "hf-compile"])
    assert list(printed) == ["megatron_lite-compile", "hf-compile"]
    assert_measured(printed["megatron_lite-compile"])
    assert compiled_graphs(printed["megatron_lite-compile"]) >= 1
    assert_measured(printed["hf-compile"])
    assert compiled_graphs(printed["hf-compile"]) >= 1
    assert printed["hf-compile"]["vs_hf_eager"] == "n/a"  # no hf-eager row to compare with
