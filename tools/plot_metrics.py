"""Plot training curves from the metrics.jsonl of one or more runs, overlaid.

    python tools/plot_metrics.py runs/a runs/b --out curves.png [--labels baseline "tp 2"]

Each RUN_DIR is a --log-dir (or --save) directory holding metrics.jsonl (docs/metrics.md).
One figure, four panels against iteration: loss (train solid, validation dashed with markers),
learning rate, grad norm and throughput in tokens/s; one colour per run, labelled with the
run directory's name or --labels.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

try:
    from matplotlib.figure import Figure
except ImportError:  # matplotlib is an optional extra, not a dependency of training
    sys.exit('plot_metrics.py: error: matplotlib is not installed; pip install matplotlib '
             '(or pip install -e ".[plot]")')

# (metrics.jsonl field, y-axis label) of the panels after the loss.
PANELS = [("lr", "learning rate"), ("grad_norm", "grad norm (L2, before clipping)"),
          ("tokens_per_s", "throughput (tokens/s)")]


class RunError(ValueError):
    """A run directory whose metrics cannot be plotted; the message says which and why."""


def load_run(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(train records, validation records) of a run, by iteration. A resumed run appends to the
    same file, so an iteration logged twice keeps its latest record."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        raise RunError(f"{run_dir} has no metrics.jsonl (train with --log-dir {run_dir} or --save {run_dir})")
    kinds: dict[str, dict[int, dict]] = {"train": {}, "validation": {}}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            record = json.loads(line)
            kinds[record["kind"]][record["iteration"]] = record
        except (ValueError, KeyError, TypeError):
            raise RunError(f"{path}:{number} is not a metrics record of megatron_lite") from None
    if not kinds["train"]:
        raise RunError(f"{path} holds no training records")
    return [r for _, r in sorted(kinds["train"].items())], [r for _, r in sorted(kinds["validation"].items())]


def plot(runs: dict[str, tuple[list[dict], list[dict]]]) -> Figure:
    """The figure of runs {label: (train records, validation records)}."""
    fig = Figure(figsize=(12, 8), layout="constrained")
    loss_ax, *other_axes = fig.subplots(2, 2).flat
    for index, (label, (train, valid)) in enumerate(runs.items()):
        color = f"C{index % 10}"
        steps = [r["iteration"] for r in train]
        loss_ax.plot(steps, [r["lm_loss"] for r in train], color=color, label=f"{label} train")
        if valid:
            loss_ax.plot([r["iteration"] for r in valid], [r["lm_loss"] for r in valid], color=color, linestyle="--",
                         marker="o", label=f"{label} validation")
        for ax, (field, _) in zip(other_axes, PANELS):
            ax.plot(steps, [r[field] for r in train], color=color, label=label)
    loss_ax.set_ylabel("lm loss (nats/token)")
    for ax, (_, ylabel) in zip(other_axes, PANELS):
        ax.set_ylabel(ylabel)
    for ax in (loss_ax, *other_axes):
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"training curves: {', '.join(runs)}")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dirs", nargs="+", type=Path, metavar="RUN_DIR", help="directories holding metrics.jsonl")
    parser.add_argument("--out", type=Path, default=Path("curves.png"), help="the PNG to write")
    parser.add_argument("--labels", nargs="+", help="one legend label per RUN_DIR (default: the directory names)")
    args = parser.parse_args(argv)
    labels = args.labels or [d.resolve().name for d in args.run_dirs]
    try:
        if len(labels) != len(args.run_dirs):
            raise RunError(f"--labels gives {len(labels)} labels for {len(args.run_dirs)} run directories; "
                           "give one each")
        if len(set(labels)) != len(labels):
            raise RunError(f"the run labels {labels} repeat; name the runs apart with --labels")
        runs = {label: load_run(d) for label, d in zip(labels, args.run_dirs)}
    except RunError as exc:
        print(f"plot_metrics.py: error: {exc}", file=sys.stderr)
        return 2
    plot(runs).savefig(args.out, dpi=100)  # a bare Figure renders with the Agg backend: no display needed
    print(f"wrote {args.out}: {len(runs)} runs, {sum(len(t) for t, _ in runs.values())} logged iterations")
    return 0


if __name__ == "__main__":
    sys.exit(main())
