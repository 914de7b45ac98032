"""Tokens/s and peak memory of long-sequence training under context parallelism, per cp size and comm type.

    python tools/bench_context_parallel.py                                  # CPU smoke: seq 1024
    python tools/bench_context_parallel.py --device cuda --seq-length 65536 --cp 1 2 4 --hidden-size 2048

Each row trains the same model (micro and global batch 1) for a few steps on `cp` local ranks
(gloo on CPU, NCCL on GPU: one GPU per rank, so rows needing more GPUs than there are are
skipped) and prints the tokens of the whole sequence per second of step time (the first step,
a warm-up, not counted) and the largest rank's peak memory: allocated GPU memory, or on CPU the
peak resident set of the process (which includes the interpreter and torch, ~0.3 GB). The rows
compare with cp 1 measured in the same run.
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
from megatron_lite.config import CP_COMM_TYPES, Config, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_lite.config.layout import Layout  # noqa: E402
from megatron_lite.data.random_tokens import RandomTokens  # noqa: E402
from megatron_lite.distributed.spawn import run_on_ranks  # noqa: E402
from megatron_lite.training.loop import rank_microbatches, set_seed, train_step  # noqa: E402
from megatron_lite.training.metrics import peak_memory_gb  # noqa: E402
from megatron_lite.training.parallelize import parallelize  # noqa: E402


def bench_worker(layout: Layout, args: argparse.Namespace) -> dict:
    config = Config(
        model=ModelConfig(num_layers=args.num_layers, hidden_size=args.hidden_size, num_attention_heads=args.heads,
                          num_query_groups=args.query_groups, seq_length=args.seq_length, vocab_size=32000,
                          make_vocab_size_divisible_by=128),
        parallel=layout.apply(ParallelConfig()),
        train=TrainConfig(micro_batch_size=1, global_batch_size=1, train_iters=args.steps, device=args.device,
                          bf16=args.device == "cuda"))  # validated as it is made
    parallel_state.initialize_model_parallel(config.parallel)
    device = torch.device(args.device, parallel_state.get_grid().rank) if args.device == "cuda" else torch.device("cpu")
    set_seed(config.train.seed, device)
    model = parallelize(config, device)
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    times = []
    for step in range(1, args.steps + 1):
        batches = rank_microbatches(data, step - 1, config, device)
        start = time.perf_counter()
        train_step(model, batches, step, config, device)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - start)
    return {"seconds": sum(times[1:]) / max(len(times) - 1, 1), "peak_gb": peak_memory_gb(device)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seq-length", type=int, default=1024)
    parser.add_argument("--cp", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--comm-types", nargs="+", default=list(CP_COMM_TYPES), choices=CP_COMM_TYPES)
    parser.add_argument("--num-layers", type=int, default=2)
    parser.add_argument("--hidden-size", type=int, default=256)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--query-groups", type=int, default=4)
    args, gpus = parse_run_args(parser, argv)
    print(f"{'cp':>3s} {'comm':>9s} {'tokens/s':>10s} {'vs cp 1':>8s} {'peak GB':>8s}   (seq {args.seq_length}, "
          f"{args.num_layers} layers, hidden {args.hidden_size}, {args.device})")
    base = None
    for cp in args.cp:
        for comm in (["p2p"] if cp == 1 else args.comm_types):
            if gpus is not None and cp > gpus:
                print(f"{cp:3d} {comm:>9s}   skipped: needs {cp} GPUs, {gpus} visible", flush=True)
                continue
            ranks = run_on_ranks(bench_worker, cp, Layout(cp=cp, cp_comm=comm), args)
            tokens_per_s = args.seq_length / max(r["seconds"] for r in ranks)
            base = base or (tokens_per_s if cp == 1 else None)
            ratio = f"{tokens_per_s / base:8.2f}" if base else f"{'n/a':>8s}"
            print(f"{cp:3d} {comm:>9s} {tokens_per_s:10.0f} {ratio} {max(r['peak_gb'] for r in ranks):8.3f}",
                  flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
