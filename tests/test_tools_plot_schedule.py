"""tools/plot_schedule.py draws a real PNG and reports the bubble next to its formula."""
from __future__ import annotations

import struct
import sys
from pathlib import Path

import pytest

from megatron_lite.pipeline_parallel.trace import Event

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plot_schedule  # noqa: E402


def test_plot_interleaved_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "sched.png"
    assert plot_schedule.main(["--pp", "4", "--vpp", "2", "--microbatches", "8", "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert width > 800 and height > 4 * 50  # at 100 dpi: wide enough for 64 labelled chunk boxes a rank
    assert "bubble 0.1875 measured, 0.1875 = (p-1)/(v*m) = 3/(2*8)" in capsys.readouterr().out


def test_figure_rows_boxes_and_legend() -> None:
    # Two ranks, two chunks, one microbatch: the forwards of chunks 0 and 1 down the pipeline and back.
    events = [Event(0, 0, 0, "F", 0.0, 0.5), Event(1, 0, 0, "F", 0.5, 1.0), Event(0, 1, 0, "F", 1.0, 1.5),
              Event(1, 1, 0, "F", 1.5, 2.0), Event(1, 1, 0, "B", 2.0, 3.0), Event(0, 1, 0, "B", 3.0, 4.0),
              Event(1, 0, 0, "B", 4.0, 5.0), Event(0, 0, 0, "B", 5.0, 6.0)]
    fig = plot_schedule.render(events, pp=2, vpp=2, forward=1.0, backward=2.0, title="a title")
    [ax] = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["0", "1"] and ax.get_ylim() == (1.5, -0.5)
    assert ax.get_ylabel() == "pipeline rank"
    assert ax.get_xlabel() == "time (cost-model units: one stage's forward of one microbatch takes 1, its backward 2)"
    assert ax.get_title() == "a title" and ax.get_xlim() == (0.0, 6.0)
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["forward", "backward", "chunk 0", "chunk 1"]
    boxes = ax.patches
    assert len(boxes) == len(events)
    for box, e in zip(boxes, events):  # one box per event, in its rank's row, from start to end
        assert (box.get_x(), box.get_x() + box.get_width()) == (e.start, e.end)
        assert box.get_y() + box.get_height() / 2 == e.rank
    by_style = {(e.kind, e.chunk): (box.get_facecolor(), box.get_hatch()) for box, e in zip(boxes, events)}
    assert len(set(by_style.values())) == 4  # forward and backward of each chunk all drawn apart
    assert by_style[("F", 0)][1] in ("", None) and by_style[("F", 1)][1] == "//"
    assert [t.get_text() for t in ax.texts] == ["0"] * len(events)  # each box labelled with its microbatch


def test_plot_zero_bubble_schedule(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """ZB-H1 drawn with its W passes apart, the measured bubble beside its formula."""
    out = tmp_path / "zb.png"
    assert plot_schedule.main(["--pp", "2", "--schedule", "zb-h1", "--microbatches", "4", "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "bubble 0.0833 measured, 0.0833 = (p-1)(F+B-W)/(m(F+B+W)) = 1x1/(4x3)" in capsys.readouterr().out
    events = [Event(0, 0, 0, "F", 0.0, 1.0), Event(0, 0, 0, "B", 1.0, 2.0), Event(0, 0, 0, "W", 2.0, 3.0)]
    [ax] = plot_schedule.render(events, pp=1, vpp=1, forward=1.0, backward=2.0, title="zb").axes
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["forward", "input gradients (B)",
                                                                    "weight gradients (W)"]
    assert len({tuple(box.get_facecolor()) for box in ax.patches}) == 3


def test_plot_refuses_impossible_interleaving() -> None:
    with pytest.raises(SystemExit):
        plot_schedule.main(["--pp", "4", "--vpp", "2", "--microbatches", "6"])
