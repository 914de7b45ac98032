"""tools/plot_schedule.py draws a real PNG and reports the bubble next to its formula."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plot_schedule  # noqa: E402


def test_plot_interleaved_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sched.png"
    assert plot_schedule.main(["--pp", "4", "--vpp", "2", "--microbatches", "8", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 500 and height > 4 * 30
    assert "bubble 0.1875 measured, 0.1875 = (p-1)/(v*m) = 3/(2*8)" in capsys.readouterr().out


def test_plot_refuses_impossible_interleaving() -> None:
    with pytest.raises(SystemExit):
        plot_schedule.main(["--pp", "4", "--vpp", "2", "--microbatches", "6"])
