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
    sys.exit('plot_schedule.py: error: matplotlib is not installed; pip install matplotlib '
             '(or pip install -e ".[plot]")')

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.config import ParallelConfig  # noqa: E402
from megatron_lite.config.parallel_config import SCHEDULES, interleaved_microbatches_problem  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.pipeline_parallel.schedules import run_schedule  # noqa: E402
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Event, Trace, bubble_fraction  # noqa: E402

KINDS = {"F": ("forward", "tab:blue"), "B": ("backward", "tab:orange"), "W": ("weight gradients (W)", "tab:green")}
# Chunk c is lighter and hatched, so that chunks stay apart in greyscale as well.
HATCHES = ("", "//", "..", "xx", "++", "\\\\")


def schedule_worker(pp: int, schedule: str, vpp: int, microbatches: int, group_size: int | None, forward: float,
                    backward: float, weight_grad: float) -> list:
    parallel_state.initialize_model_parallel(ParallelConfig(
        pipeline_model_parallel_size=pp, pipeline_schedule=schedule,
        virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None))
    trace = Trace(parallel_state.get_grid().rank)
    run_schedule(CostModelRunner(trace, forward / vpp, backward / vpp, weight_grad / vpp), schedule, microbatches, vpp,
                 microbatch_group_size=group_size)
    return trace.events


def _chunk_style(color: str, chunk: int, vpp: int) -> dict:
    """Face colour (`color` mixed with white, more for later chunks) and hatch of a chunk's boxes."""
    lighter = 0.6 * chunk / max(vpp - 1, 1)
    face = tuple(c + (1 - c) * lighter for c in to_rgb(color))
    return {"facecolor": face, "hatch": HATCHES[chunk % len(HATCHES)], "edgecolor": "white"}


def render(events: list[Event], pp: int, vpp: int, forward: float, backward: float, title: str) -> Figure:
    """The timeline: one row per rank (rank 0 on top), time to the right, each box labelled with
    its microbatch; the legend names forward and backward (split: input and weight gradients)
    and, with several chunks per rank, the chunks."""
    end = max(e.end for e in events)
    # A chunk's boxes are vpp times shorter: the figure widens with vpp so their labels still fit.
    fig = Figure(figsize=(min(24.0, max(8.0, 0.3 * end * vpp)), 1.6 + 0.5 * pp), layout="constrained")
    ax = fig.subplots()
    for e in events:
        ax.barh(e.rank, e.end - e.start, left=e.start, height=0.8, linewidth=0.5,
                **_chunk_style(KINDS[e.kind][1], e.chunk, vpp))
        ax.text((e.start + e.end) / 2, e.rank, str(e.microbatch), ha="center", va="center", fontsize=7)
    split = any(e.kind == "W" for e in events)
    names = {**{k: name for k, (name, _) in KINDS.items()}, **({"B": "input gradients (B)"} if split else {})}
    handles = [Patch(color=color, label=names[k]) for k, (_, color) in KINDS.items() if split or k != "W"]
    if vpp > 1:
        handles += [Patch(label=f"chunk {c}", **_chunk_style("tab:gray", c, vpp)) for c in range(vpp)]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize="small")
    ax.set_yticks(range(pp), [str(r) for r in range(pp)])
    ax.set_ylim(pp - 0.5, -0.5)
    ax.set_xlim(0, end)
    ax.set_ylabel("pipeline rank")
    ax.set_xlabel(f"time (cost-model units: one stage's forward of one microbatch takes {forward:g}, "
                  f"its backward {backward:g})")  # split: B and W share the backward's time
    ax.set_title(title, fontsize="medium")
    return fig


def _formula(schedule: str, p: int, v: int, m: int, f: float, b: float, w: float) -> tuple[float, str]:
    """The textbook bubble of a schedule and how it reads: (p-1)/m, (p-1)/(v*m); ZB-H1's idle
    (p-1)(F+B-W) over the work m(F+B+W); ZB-V's (p-1)/(6m), for F = B = W (its paper's case)."""
    if schedule == "zb-h1":
        return ((p - 1) * (f + b - w) / (m * (f + b + w)),
                f"(p-1)(F+B-W)/(m(F+B+W)) = {p - 1}x{f + b - w:g}/({m}x{f + b + w:g})")
    if schedule == "zbv":
        return (p - 1) / (6 * m), f"(p-1)/(6m) = {p - 1}/(6*{m}) for F = B = W"
    if v > 1:
        return (p - 1) / (v * m), f"(p-1)/(v*m) = {p - 1}/({v}*{m})"
    return (p - 1) / m, f"(p-1)/m = {p - 1}/{m}"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pp", type=int, default=4, help="pipeline stages")
    parser.add_argument("--vpp", type=int, default=1, help="model chunks per rank (interleaved when > 1)")
    parser.add_argument("--microbatches", type=int, default=8)
    parser.add_argument("--microbatch-group-size-per-virtual-pipeline-stage", type=int, default=None,
                        dest="group_size", help="interleaved: microbatches a chunk runs in a row (default: --pp)")
    parser.add_argument("--schedule", choices=SCHEDULES, default=None,
                        help="default: interleaved when --vpp > 1, else 1f1b (zbv takes --vpp 2)")
    parser.add_argument("--forward-time", type=float, default=1.0, help="one stage's forward of one microbatch")
    parser.add_argument("--backward-time", type=float, default=2.0, help="one stage's backward of one microbatch")
    parser.add_argument("--weight-grad-time", type=float, default=None,
                        help="zb-h1, zbv: the weight gradients' part of the backward (W; default half of it)")
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
    weight_grad = args.backward_time / 2 if args.weight_grad_time is None else args.weight_grad_time
    if not 0 < weight_grad < args.backward_time:
        errors.append(f"--weight-grad-time={weight_grad} must be between 0 and --backward-time={args.backward_time}")
    chunks = {"interleaved": "> 1", "zbv": "2"}.get(schedule, "1")
    if not (args.vpp > 1 if chunks == "> 1" else args.vpp == int(chunks)):
        errors.append(f"--schedule={schedule} with --vpp={args.vpp}: {schedule} runs --vpp {chunks}")
    if args.group_size is not None and schedule != "interleaved":
        errors.append("--microbatch-group-size-per-virtual-pipeline-stage is for the interleaved schedule only")
    if schedule == "interleaved":
        group_size = args.pp if args.group_size is None else args.group_size
        problem = interleaved_microbatches_problem(args.pp, args.microbatches, group_size)
        errors += [problem] if problem else []
    if errors:
        parser.error("; ".join(errors))
    ranks = run_on_ranks(schedule_worker, args.pp, args.pp, schedule, args.vpp, args.microbatches, args.group_size,
                         args.forward_time, args.backward_time, weight_grad)
    events = [e for r in ranks for e in r]
    formula, formula_text = _formula(schedule, args.pp, args.vpp, args.microbatches, args.forward_time,
                                     args.backward_time - weight_grad, weight_grad)
    summary = (f"{schedule}: pp={args.pp} vpp={args.vpp} microbatches={args.microbatches}: bubble "
               f"{bubble_fraction(events):.4f} measured, {formula:.4f} = {formula_text}")
    fig = render(events, args.pp, args.vpp, args.forward_time, args.backward_time, summary)
    fig.savefig(args.out, dpi=100)  # a bare Figure renders with the Agg backend: no display needed
    print(f"{summary}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
