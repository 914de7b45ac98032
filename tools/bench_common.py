"""What the multi-rank benchmark tools share: the --steps and --device flags, and how many GPUs a row may use."""
from __future__ import annotations

import argparse

import torch


def parse_run_args(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, int | None]:
    """The tool's flags plus --steps and --device, parsed; and the GPUs a row's ranks may take (one
    each; None on CPU, where gloo ranks have no limit)."""
    parser.add_argument("--steps", type=int, default=3, help="timed steps after one warm-up")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    args = parser.parse_args(argv)
    return args, torch.cuda.device_count() if args.device == "cuda" else None
