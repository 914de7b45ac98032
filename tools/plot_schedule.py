"""Draw a pipeline schedule and measure its bubble, by running the real schedule code under a cost model.

    python tools/plot_schedule.py --pp 4 --vpp 2 --microbatches 8 --out sched.png

Spawns pp CPU ranks (gloo), runs the chosen schedule with fixed forward/backward durations
(trace.CostModelRunner), and writes a PNG timeline: one row per rank, time to the right,
forwards light and backwards dark in one colour per microbatch, each box labelled with its
microbatch number (and, interleaved, a bar per model chunk). Prints the measured bubble next
to the formula: (p-1)/m for GPipe and 1F1B, (p-1)/(v*m) interleaved.
"""
from __future__ import annotations

import argparse
import struct
import sys
import zlib
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.config import ParallelConfig  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.pipeline_parallel.schedules import run_schedule  # noqa: E402
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Event, Trace, bubble_fraction  # noqa: E402

PALETTE = [(230, 85, 13), (49, 130, 189), (49, 163, 84), (117, 107, 177), (222, 45, 38), (253, 174, 107),
           (107, 174, 214), (116, 196, 118), (158, 154, 200), (252, 146, 114)]
# 3x5 pixel digits, one string of 15 bits per digit, row by row.
DIGITS = ["111101101101111", "010110010010111", "111001111100111", "111001111001111", "101101111001001",
          "111100111001111", "111100111101111", "111001001001001", "111101111101111", "111101111001111"]
UNIT, ROW, GAP, SCALE = 24, 36, 6, 3  # pixels per time unit, row height, row gap, digit pixel size


def schedule_worker(pp: int, schedule: str, vpp: int, microbatches: int, forward: float, backward: float) -> list:
    parallel_state.initialize_model_parallel(ParallelConfig(pipeline_model_parallel_size=pp))
    trace = Trace(parallel_state.get_grid().rank)
    run_schedule(CostModelRunner(trace, forward / vpp, backward / vpp), schedule, microbatches, vpp)
    return trace.events


def _draw_number(img: np.ndarray, x: int, y: int, number: int, color: tuple[int, int, int]) -> None:
    for k, ch in enumerate(str(number)):
        bits = DIGITS[int(ch)]
        for i, bit in enumerate(bits):
            if bit == "1":
                r, c = divmod(i, 3)
                x0, y0 = x + k * 4 * SCALE + c * SCALE, y + r * SCALE
                img[y0:y0 + SCALE, x0:x0 + SCALE] = color


def render(events: list[Event], pp: int, vpp: int) -> np.ndarray:
    """RGB image of the timeline."""
    end = max(e.end for e in events)
    unit = UNIT * vpp  # chunks are vpp times shorter: keep their boxes wide enough for a label
    margin = 5 * 4 * SCALE
    img = np.full((pp * (ROW + GAP) + GAP, margin + int(end * unit) + GAP, 3), 255, dtype=np.uint8)
    for r in range(pp):
        _draw_number(img, GAP, GAP + r * (ROW + GAP) + (ROW - 5 * SCALE) // 2, r, (0, 0, 0))
    for e in events:
        y0, x0, x1 = GAP + e.rank * (ROW + GAP), margin + int(e.start * unit), margin + int(e.end * unit)
        base = np.array(PALETTE[e.microbatch % len(PALETTE)], dtype=float)
        color = base * 0.55 if e.kind == "B" else 255 - (255 - base) * 0.55
        img[y0:y0 + ROW, x0:x1] = color.astype(np.uint8)
        img[y0:y0 + ROW, x1 - 1:x1] = 255  # a white seam between boxes
        if vpp > 1:  # one dark bar per chunk index along the bottom edge
            img[y0 + ROW - 3:y0 + ROW, x0:x0 + (x1 - x0) * (e.chunk + 1) // vpp] = 40
        text = (0, 0, 0) if e.kind == "F" else (255, 255, 255)
        _draw_number(img, x0 + 3, y0 + 4, e.microbatch, text)
    return img


def write_png(path: str | Path, img: np.ndarray) -> None:
    """Minimal PNG encoder (8-bit RGB, one IDAT chunk): no imaging library needed."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
                           + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


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
    if (schedule == "interleaved") != (args.vpp > 1):
        errors.append(f"--schedule={schedule} with --vpp={args.vpp}: interleaved needs --vpp > 1 and only it")
    if schedule == "interleaved" and args.microbatches % args.pp:
        errors.append(f"--microbatches={args.microbatches} must be a multiple of --pp={args.pp} when interleaved")
    if errors:
        parser.error("; ".join(errors))
    ranks = run_on_ranks(schedule_worker, args.pp, args.pp, schedule, args.vpp, args.microbatches,
                         args.forward_time, args.backward_time)
    events = [e for r in ranks for e in r]
    write_png(args.out, render(events, args.pp, args.vpp))
    formula = (args.pp - 1) / (args.vpp * args.microbatches)
    formula_text = f"(p-1)/(v*m) = {args.pp - 1}/({args.vpp}*{args.microbatches})" if args.vpp > 1 else \
        f"(p-1)/m = {args.pp - 1}/{args.microbatches}"
    print(f"{schedule}: pp={args.pp} vpp={args.vpp} microbatches={args.microbatches}: bubble "
          f"{bubble_fraction(events):.4f} measured, {formula:.4f} = {formula_text}; wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
