"""bf16 and fp16 training against fp32 on the same batches: loss and grad-norm curves in one plot.

    python tools/precision_parity.py [--steps 50] [--model tiny] [--device cuda] [--csv out.csv] [--plot out.png]

Trains the `--model` preset three times from the same initialisation on the same batches of the
built-in corpus (same seed): fp32, --bf16 and --fp16 (dynamic loss scaling from 2^16: Megatron's
default 2^32 overflows the first steps of a small model, which are then skipped). Writes one CSV row
per step (each precision's loss and grad norm), prints the largest relative difference of each
half precision from fp32, and draws the curves (matplotlib, the [plot] extra). tools/gpu_report.py
runs it on the GPU; on CPU it runs as well (bf16 may be emulated there, and slow).
"""
from __future__ import annotations

import argparse
import csv
import json
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from megatron_lite.training.arguments import parse_args  # noqa: E402
from megatron_lite.training.loop import pretrain  # noqa: E402

PRECISIONS = {"fp32": [], "bf16": ["--bf16"], "fp16": ["--fp16", "--initial-loss-scale", "65536"]}


def train(precision: str, args: argparse.Namespace, log_dir: str) -> list[dict]:
    """One run's metrics records, one per step."""
    flags = ["--model", args.model, "--train-iters", str(args.steps), "--log-interval", "1", "--eval-interval", "0",
             "--log-dir", log_dir, *PRECISIONS[precision], *(["--device", args.device] if args.device else [])]
    pretrain(parse_args(flags))
    return [r for r in map(json.loads, Path(log_dir, "metrics.jsonl").read_text().splitlines()) if "lm_loss" in r]


def worst_relative(reference: list[float], values: list[float]) -> float:
    """The largest |b - a| / |a| over the steps both logged (a skipped fp16 step logs a nan grad norm)."""
    pairs = [(a, b) for a, b in zip(reference, values) if a == a and b == b]
    return max((abs(b - a) / abs(a) for a, b in pairs), default=float("nan"))


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (loss, norm) = plt.subplots(1, 2, figsize=(11, 4))
    steps = [r["step"] for r in rows]
    for precision in PRECISIONS:
        loss.plot(steps, [r[f"{precision}_loss"] for r in rows], label=precision)
        norm.plot(steps, [r[f"{precision}_grad_norm"] for r in rows], label=precision)
    loss.set(xlabel="step", ylabel="lm loss", title="loss")
    norm.set(xlabel="step", ylabel="grad norm", title="grad norm (after unscaling)")
    loss.legend()
    fig.tight_layout()
    fig.savefig(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--model", default="tiny", help="a pretrain_gpt.py preset")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--csv", type=Path, help="one row per step")
    parser.add_argument("--plot", type=Path, help="the curves, as a PNG (needs matplotlib)")
    args = parser.parse_args(argv)
    runs = {}
    for precision in PRECISIONS:
        with tempfile.TemporaryDirectory() as log_dir:
            runs[precision] = train(precision, args, log_dir)
    rows = [{"step": i + 1, **{f"{p}_{k}": runs[p][i][m] for p in PRECISIONS
                               for k, m in (("loss", "lm_loss"), ("grad_norm", "grad_norm"))}}
            for i in range(args.steps)]
    for precision in ("bf16", "fp16"):
        loss, norm = (worst_relative([r[f"fp32_{k}"] for r in rows], [r[f"{precision}_{k}"] for r in rows])
                      for k in ("loss", "grad_norm"))
        print(f"{precision} vs fp32 over {args.steps} steps: largest relative difference of the loss {loss:.2e}, "
              f"of the grad norm {norm:.2e}")
    if args.csv:
        with args.csv.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    if args.plot:
        plot(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
