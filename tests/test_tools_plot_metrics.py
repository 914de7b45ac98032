"""tools/plot_metrics.py overlays runs' metrics.jsonl in one figure, and refuses a directory without one."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from megatron_lite.training.metrics import MetricsLogger

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import plot_metrics  # noqa: E402


def _write_run(log_dir: Path, loss_offset: float) -> None:
    """Six logged iterations and two evaluations, written as training writes them."""
    logger = MetricsLogger(str(log_dir))
    for i in range(1, 7):
        logger.training({"iteration": i, "train_iters": 6, "consumed_samples": 4 * i, "elapsed_ms": 50.0,
                         "lr": 1e-4 * i, "global_batch_size": 4, "lm_loss": 5.0 - 0.2 * i + loss_offset,
                         "loss_scale": 1.0, "grad_norm": 2.0 / i, "skipped_iterations": 0, "tokens_per_s": 1000.0 + i,
                         "tflops_per_gpu": 0.1, "mfu": None, "peak_memory_gb": 0.5})
        if i % 3 == 0:
            logger.validation(i, 5.1 - 0.2 * i + loss_offset)


def test_two_runs_overlaid(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    for name, offset in (("base", 0.0), ("tp2", 0.1)):
        _write_run(tmp_path / name, offset)
    out = tmp_path / "curves.png"
    assert plot_metrics.main([str(tmp_path / "base"), str(tmp_path / "tp2"), "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"wrote {out}: 2 runs" in capsys.readouterr().out

    fig = plot_metrics.plot({label: plot_metrics.load_run(tmp_path / name)
                             for label, name in (("baseline", "base"), ("tp 2", "tp2"))})
    loss, lr, norm, throughput = fig.axes
    assert [line.get_label() for line in loss.lines] == ["baseline train", "baseline validation", "tp 2 train",
                                                         "tp 2 validation"]
    assert [line.get_linestyle() for line in loss.lines] == ["-", "--", "-", "--"]
    assert list(loss.lines[1].get_xdata()) == [3, 6] and list(loss.lines[3].get_ydata()) == pytest.approx([4.6, 4.0])
    for ax in (lr, norm, throughput):
        assert [line.get_label() for line in ax.lines] == ["baseline", "tp 2"]
        assert list(ax.lines[0].get_xdata()) == [1, 2, 3, 4, 5, 6]
    assert list(throughput.lines[1].get_ydata()) == [1001.0, 1002.0, 1003.0, 1004.0, 1005.0, 1006.0]
    assert [ax.get_ylabel() for ax in fig.axes] == ["lm loss (nats/token)", "learning rate",
                                                    "grad norm (L2, before clipping)", "throughput (tokens/s)"]
    assert all(ax.get_xlabel() == "iteration" and ax.get_legend() is not None for ax in fig.axes)
    assert fig.get_suptitle() == "training curves: baseline, tp 2"


@pytest.mark.parametrize("make, flags, message", [
    (lambda d: d.mkdir(), [], "{d} has no metrics.jsonl (train with --log-dir {d} or --save {d})"),
    (lambda d: _write_run(d, 0.0), ["--labels", "a", "b"],
     "--labels gives 2 labels for 1 run directories; give one each"),
    (lambda d: (d.mkdir(), (d / "metrics.jsonl").write_text("not json\n")), [],
     "{d}/metrics.jsonl:1 is not a metrics record of megatron_lite"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture, make, flags: list[str],
                                          message: str) -> None:
    run_dir = tmp_path / "run"
    make(run_dir)
    assert plot_metrics.main([str(run_dir), "--out", str(tmp_path / "x.png"), *flags]) == 2
    assert capsys.readouterr().err.splitlines() == [f"plot_metrics.py: error: {message.format(d=run_dir)}"]
    assert not (tmp_path / "x.png").exists()
