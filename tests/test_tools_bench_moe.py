"""tools/bench_moe.py: a dense row, then one MoE row per ep size, each against the dense one."""
from __future__ import annotations

import sys

import pytest

from helpers.commands import ROOT

sys.path.insert(0, str(ROOT / "tools"))
import bench_moe  # noqa: E402


def test_cpu_smoke_prints_dense_and_each_ep(capsys: pytest.CaptureFixture) -> None:
    assert bench_moe.main(["--hidden-size", "32", "--moe-ffn-hidden-size", "32", "--experts", "4", "--tokens", "64",
                           "--ep", "1", "2", "--steps", "2"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.strip().splitlines()[1:]]
    assert [r[:-2] for r in rows] == [["dense"], ["moe", "ep1"], ["moe", "ep2"]]
    assert rows[0][-1] == "1.00" and all(float(r[-2]) > 0 for r in rows)
