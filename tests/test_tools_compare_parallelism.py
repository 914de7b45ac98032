"""tools/compare_parallelism.py trains the same model under several layouts and prints one row each."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_parallelism  # noqa: E402


def test_table_rows_and_equal_losses(capsys: pytest.CaptureFixture) -> None:
    assert compare_parallelism.main(["--layouts", "single", "dp4-distopt", "cp2", "--num-layers", "2", "--hidden-size", "32",
                                     "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"single", "dp4-distopt", "cp2"}
    assert rows["single"][-1] == rows["dp4-distopt"][-1] == rows["cp2"][-1]  # same last loss
    # Adam state is sharded four ways; the dp group carries traffic only with dp > 1, cp with cp > 1
    # (columns: layout, ranks, weights, Adam, activations, then MB/step over tp, cp, pp, dp).
    assert float(rows["dp4-distopt"][3]) == pytest.approx(float(rows["single"][3]) / 4, rel=0.05)
    assert float(rows["single"][8]) == 0.0 and float(rows["dp4-distopt"][8]) > 0.0
    assert float(rows["cp2"][6]) > 0.0 and float(rows["dp4-distopt"][6]) == 0.0
    # Each cp rank saves the activations of half the sequence.
    assert float(rows["cp2"][4]) < 0.6 * float(rows["single"][4])
