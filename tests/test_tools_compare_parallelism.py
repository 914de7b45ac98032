"""tools/compare_parallelism.py trains the same model under several layouts and prints one row each."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import compare_parallelism  # noqa: E402


def test_table_rows_and_equal_losses(capsys: pytest.CaptureFixture) -> None:
    assert compare_parallelism.main(["--layouts", "single", "dp4-distopt", "dp4-zero3", "cp2", "dp4-ps", "--num-layers",
                                     "2", "--hidden-size", "32", "--steps", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {"single", "dp4-distopt", "dp4-zero3", "cp2", "dp4-ps"}
    assert len({row[11] for row in rows.values()}) == 1  # the same last loss
    # The planner predicted every rank's state bytes and traffic exactly.
    assert all("state+traffic exact" in line for line in lines[1:])
    # Columns: layout, ranks, weights, grads, Adam, activations, then MB/step over tp, cp, pp, dp.
    # ZeRO-1 shards Adam state four ways, ZeRO-3 the weights and grads too; the dp group carries
    # traffic only with dp > 1, cp with cp > 1.
    weights, grads, adam = (float(rows["single"][i]) for i in (2, 3, 4))
    assert float(rows["dp4-distopt"][4]) == pytest.approx(adam / 4, rel=0.05)
    assert float(rows["dp4-distopt"][2]) == pytest.approx(weights, rel=0.05)
    assert ([float(rows["dp4-zero3"][i]) for i in (2, 3, 4)]
            == pytest.approx([weights / 4, grads / 4, adam / 4], rel=0.05))
    assert float(rows["single"][9]) == 0.0 and float(rows["dp4-distopt"][9]) > 0.0
    assert float(rows["cp2"][7]) > 0.0 and float(rows["dp4-distopt"][7]) == 0.0
    # A parameter server's link carries (dp-1) x the model out (and the grads in): more than the
    # reduce-scatter + all-gather of a rank of the ring; the server holds all of Adam's state.
    assert float(rows["dp4-ps"][9]) > 1.9 * float(rows["dp4-distopt"][9])
    assert float(rows["dp4-ps"][4]) == pytest.approx(adam, rel=0.05)
    # Each cp rank saves the activations of half the sequence.
    assert float(rows["cp2"][5]) < 0.6 * float(rows["single"][5])
