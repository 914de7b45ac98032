"""Draw a pipeline schedule and measure its bubble, by running the real schedule code under a cost model.

    python tools/plot_schedule.py --pp 4 --vpp 2 --microbatches 8 --out sched.png

Spawns pp CPU ranks (gloo), runs the chosen schedule with fixed forward/backward durations
(trace.CostModelRunner), and draws its timeline with matplotlib into a PNG: one row per rank,
time to the right in the cost model's units, forward and backward boxes in two colours, each
labelled with its microbatch, and in an interleaved schedule each model chunk lighter and
hatched. Prints the measured bubble next to the formula, (p-1)/m for GPipe and 1F1B,
(p-1)/(v*m) interleaved, which the figure's title repeats.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

try:
    from matplotlib.colors import to_rgb
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch
except ImportError:  # matplotlib is an optional extra, not a dependency of training
    sys.exit('plot_schedule.py: error: matplotlib is not installed; pip install matplotlib (or pip install -e ".[plot]")')

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.config import ParallelConfig  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.pipeline_parallel.schedules import run_schedule  # noqa: E402
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Event, Trace, bubble_fraction  # noqa: E402

KINDS = {"F": ("forward", "tab:blue"), "B": ("backward", "tab:orange")}
# Chunk c is lighter and hatched, so that chunks stay apart in greyscale as well.
HATCHES = ("", "//", "..", "xx", "++", "\\\\")


def schedule_worker(pp: int, schedule: str, vpp: int, microbatches: int, forward: float, backward: float) -> list:
    parallel_state.initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=pp))
    trace = Trace(parallel_state.get_grid().rank)
    run_schedule(CostModelRunner(trace, forward / vpp, backward / vpp), schedule, microbatches, vpp)
    return trace.events


def _chunk_style(color: str, chunk: int, vpp: int) -> dict:
    """Face colour (`color` mixed with white, more for later chunks) and hatch of a chunk's boxes."""
    lighter = 0.6 * chunk / max(vpp - 1, 1)
    face = tuple(c + (1 - c) * lighter for c in to_rgb(color))
    return {"facecolor": face, "hatch": HATCHES[chunk % len(HATCHES)], "edgecolor": "white"}


def render(events: list[Event], pp: int, vpp: int, forward: float, backward: float, title: str) -> Figure:
    """The timeline: one row per rank (rank 0 on top), time to the right, each box labelled with
    its microbatch; the legend names forward and backward and, interleaved, the chunks."""
    end = max(e.end for e in events)
    # A chunk's boxes are vpp times shorter: the figure widens with vpp so their labels still fit.
    fig = Figure(figsize=(min(24.0, max(8.0, 0.3 * end * vpp)), 1.6 + 0.5 * pp), layout="constrained")
    ax = fig.subplots()
    for e in events:
        ax.barh(e.rank, e.end - e.start, left=e.start, height=0.8, linewidth=0.5,
                **_chunk_style(KINDS[e.kind][1], e.chunk, vpp))
        ax.text((e.start + e.end) / 2, e.rank, str(e.microbatch), ha="center", va="center", fontsize=7)
    handles = [Patch(color=color, label=name) for name, color in KINDS.values()]
    if vpp > 1:
        handles += [Patch(label=f"chunk {c}", **_chunk_style("tab:gray", c, vpp)) for c in range(vpp)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_yticks(range(pp), [str(r) for r in range(pp)])
    ax.set_ylim(pp - 0.5, -0.5)
    ax.set_xlim(0, end)
    ax.set_ylabel("pipeline rank")
    ax.set_xlabel(f"time (cost-model units: one stage's forward of one microbatch takes {forward:g}, "
                  f"its backward {backward:g})")
    ax.set_title(title, fontsize="medium")
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per rank (interleaved when > 1)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--schedule", choices=("gpipe", "1f1b", "interleaved"), default=None,
                        help="default: interleaved when --vpp > 1, else 1f1b")
    parser.add_argument("--forward-time", type=float, default=1.0, help="one stage's forward of one microbatch")
    parser.add_argument("--backward-time", type=float, default=2.0, help="one stage's backward of one microbatch")
    parser.add_argument("--out", default="schedule.png")
    args = parser.parse_args(argv)
    schedule = args.schedule or ("interleaved" if args.vpp > 1 else "1f1b")
    errors = []
    if args.pp < 2:
        errors.append(f"--pp={args.pp} must be at least 2")
    if args.microbatches < 1:
        errors.append(f"--microbatches={args.microbatches} must be at least 1")
    if args.forward_time <= 0 or args.backward_time <= 0:
        errors.append(f"--forward-time={args.forward_time} and --backward-time={args.backward_time} must be > 0")
    if (schedule == "interleaved") != (args.vpp > 1):
        errors.append(f"--schedule={schedule} with --vpp={args.vpp}: interleaved needs --vpp > 1 and only it")
    if schedule == "interleaved" and args.microbatches % args.pp:
        errors.append(f"--microbatches={args.microbatches} must be a multiple of --pp={args.pp} when interleaved")
    if errors:
        parser.error("; ".join(errors))
    ranks = run_on_ranks(schedule_worker, args.pp, args.pp, schedule, args.vpp, args.microbatches,
                         args.forward_time, args.backward_time)
    events = [e for r in ranks for e in r]
    formula = (args.pp - 1) / (args.vpp * args.microbatches)
    formula_text = f"(p-1)/(v*m) = {args.pp - 1}/({args.vpp}*{args.microbatches})" if args.vpp > 1 else \
        f"(p-1)/m = {args.pp - 1}/{args.microbatches}"
    summary = (f"{schedule}: pp={args.pp} vpp={args.vpp} microbatches={args.microbatches}: bubble "
               f"{bubble_fraction(events):.4f} measured, {formula:.4f} = {formula_text}")
    fig = render(events, args.pp, args.vpp, args.forward_time, args.backward_time, summary)
    fig.savefig(args.out, dpi=100)  # a bare Figure renders with the Agg backend: no display needed
    print(f"{summary}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
