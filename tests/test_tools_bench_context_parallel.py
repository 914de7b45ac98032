"""tools/bench_context_parallel.py: one row per cp size and comm type, measured against cp 1."""
from __future__ import annotations

import sys

import pytest

from helpers.commands import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_context_parallel  # noqa: E402


def test_cpu_smoke_prints_a_row_per_layout(capsys: pytest.CaptureFixture) -> None:
    assert bench_context_parallel.main(["--seq-length", "64", "--hidden-size", "32", "--heads", "4",
                                        "--query-groups", "2", "--cp", "1", "2", "--steps", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [(r[0], r[1]) for r in rows] == [("1", "p2p"), ("2", "p2p"), ("2", "allgather"), ("2", "a2a")]
    for row in rows:
        assert float(row[2]) > 0 and float(row[4]) > 0  # tokens/s, peak GB
    assert rows[0][3] == "1.00"
