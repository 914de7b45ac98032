"""Throughput of one mixture-of-experts layer against a dense MLP of the same active parameters.

    python tools/bench_moe.py                          # CPU smoke: hidden 256, 8 experts, top-2
    python tools/bench_moe.py --device cuda --hidden-size 2048 --moe-ffn-hidden-size 1408 --tokens 16384 --ep 1 2 4 8

Rows: the dense MLP (width k x the expert width, so each token meets as many weights), then the
MoE layer at each ep size, on ep local ranks (gloo on CPU, NCCL on GPU with one GPU per rank:
rows needing more GPUs than are visible are skipped). Every rank routes its own --tokens tokens
(expert parallelism splits the experts, not the tokens), so tokens/s counts all ranks' tokens
over the slowest rank's forward + backward time (the first, warm-up, pass not counted) and is
given per device; the ratio is to the dense row measured in the same run.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_common import parse_run_args  # noqa: E402

from megatron_lite import parallel_state  # noqa: E402
from megatron_lite.config import ModelConfig, ParallelConfig  # noqa: E402
from megatron_lite.config.layout import Layout  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.model.moe import MoELayer  # noqa: E402
from megatron_lite.model.ops import select_ops  # noqa: E402
from megatron_lite.model.transformer import MLP  # noqa: E402


def layer_worker(ep: int | None, args: argparse.Namespace) -> float:
    """Seconds per forward + backward of the layer on this rank; ep None: the dense MLP."""
    parallel_state.initialize_model_parallel(Layout(dp=ep or 1, ep=ep or 1).apply(ParallelConfig()))
    grid = parallel_state.get_grid()
    device = torch.device(args.device, grid.rank) if args.device == "cuda" else torch.device("cpu")
    dtype = torch.bfloat16 if args.device == "cuda" else torch.float32
    config = ModelConfig(hidden_size=args.hidden_size, num_attention_heads=8, num_experts=args.experts,
                         moe_router_topk=args.topk, moe_ffn_hidden_size=args.moe_ffn_hidden_size,
                         ffn_hidden_size=args.topk * args.moe_ffn_hidden_size)
    ops = select_ops(args.device == "cuda")
    layer = (MLP(config, ops) if ep is None else MoELayer(config, ops, False, None)).to(device, dtype)
    gen = torch.Generator(device=device).manual_seed(grid.rank)
    for param in layer.parameters():
        param.data.normal_(0.0, 0.02, generator=gen)
    x = torch.randn(1, args.tokens, args.hidden_size, device=device, dtype=dtype, generator=gen, requires_grad=True)
    times = []
    for _ in range(args.steps + 1):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        layer(x).float().square().mean().backward()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return sum(times[1:]) / args.steps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--moe-ffn-hidden-size", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--topk", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=1024, help="tokens each rank routes")
    parser.add_argument("--ep", type=int, nargs="+", default=[1, 2, 4])
    args, gpus = parse_run_args(parser, argv)
    print(f"{'layer':>8s} {'tokens/s/device':>16s} {'vs dense':>9s}   ({args.experts} experts, top-{args.topk}, hidden "
          f"{args.hidden_size}, expert width {args.moe_ffn_hidden_size}, {args.tokens} tokens per rank, {args.device})")
    dense = None
    for ep in [None, *args.ep]:
        name = "dense" if ep is None else f"moe ep{ep}"
        if gpus is not None and (ep or 1) > gpus:
            print(f"{name:>8s}   skipped: needs {ep} GPUs, {gpus} visible", flush=True)
            continue
        seconds = max(run_on_ranks(layer_worker, ep or 1, ep, args))
        per_device = args.tokens / seconds
        dense = dense or per_device
        print(f"{name:>8s} {per_device:16.0f} {per_device / dense:9.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
