"""Plan a training run's parallel layout: predicted memory, traffic and step time of every valid
layout on a cluster, best first (megatron_lite/planner/).

    python tools/plan_parallelism.py --model llama-8b --seq-length 4096 --global-batch-size 512 --gpu H100 --num-gpus 64
    python tools/plan_parallelism.py --model llama-8b --gpu H200 --num-gpus 16 --layout --tp 2 --pp 2 --sp \\
        --use-distributed-optimizer --micro-batch-size 1 --global-batch-size 512
    python tools/plan_parallelism.py --validate        # against published A100 and H100 throughputs
    python tools/plan_parallelism.py --seed-tables     # DP / DDP / FSDP speedups and ZeRO memory

Model, parallel and batch flags are pretrain_gpt.py's (same names, same checks); --layout
evaluates the layout those flags describe instead of searching (as `pretrain_gpt.py --dry-run
--world-size N --gpu G` does, on the same formulas). Times assume bf16 weights (--bf16 is
implied) and this code's kernels (flash attention, fused loss), calibrated to what published
runs reached (megatron_lite/planner/calibration.py); an MFU above the best published for the
model's size class on that GPU is marked "above any published measurement".
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_lite.config import Config, ConfigError, ModelConfig, ParallelConfig, TrainConfig  # noqa: E402
from megatron_lite.config.layout import Layout  # noqa: E402
from megatron_lite.planner.calibration import CALIBRATIONS  # noqa: E402
from megatron_lite.planner.hardware import GPU, GPUS  # noqa: E402
from megatron_lite.planner.hardware import gpu as gpu_named
from megatron_lite.planner.parameters import count_parameters  # noqa: E402
from megatron_lite.planner.search import Candidate, plan  # noqa: E402
from megatron_lite.planner.step_time import StepEstimate, estimate  # noqa: E402
from megatron_lite.planner.validation import mfu_ceiling, validate  # noqa: E402
from megatron_lite.training.arguments import build_parser, parse_args  # noqa: E402

GB = 1e9
TOLERANCE = {"ampere": 0.15, "hopper": 0.20}  # --validate: the largest error a row may have, per architecture
ABOVE = "above any published measurement"


# pretrain_gpt.py's flags a row decides (its layout, micro batch, recomputation): dropped from the
# user's flags before the row's own are added to its command line.
_RECOMPUTE_FIELDS = ("recompute_granularity", "recompute_method", "recompute_num_layers", "recompute_modules")
_ROW_FLAGS = {option for action in build_parser()._actions for option in action.option_strings
              if action.dest in {f.name for f in dataclasses.fields(ParallelConfig)} | {"micro_batch_size",
                                                                                      *_RECOMPUTE_FIELDS}}


def command_line(config: Config, user_flags: list[str], num_gpus: int, hardware: GPU) -> str:
    """The torchrun line that trains `config` on `num_gpus` GPUs: the user's model and batch flags as
    given, then the row's layout, micro batch and recomputation (one node, or a c10d rendezvous)."""
    kept, skipping = [], False
    for token in user_flags:
        if token.startswith("--"):
            skipping = token.split("=")[0] in _ROW_FLAGS
        if not skipping:
            kept.append(token)
    recompute = [token for field in _RECOMPUTE_FIELDS if getattr(config.model, field) is not None
                 for token in ("--" + field.replace("_", "-"), *map(str, _as_list(getattr(config.model, field))))]
    nodes = -(-num_gpus // hardware.gpus_per_node)
    # Several nodes: the same line on each, meeting at the first node's address (left for the shell to expand).
    launcher = (f"torchrun --nproc-per-node {num_gpus}" if nodes == 1 else
                f"torchrun --nnodes {nodes} --nproc-per-node {hardware.gpus_per_node} --rdzv-backend c10d "
                '--rdzv-endpoint "$MASTER_ADDR:29500"')
    precision = [] if {"--bf16", "--fp16"} & set(kept) else ["--bf16"]
    return f"{launcher} " + shlex.join(["pretrain_gpt.py", *kept, *Layout.of(config.parallel).flags(),
                                        "--micro-batch-size", str(config.train.micro_batch_size), *recompute,
                                        *precision])


def _as_list(value: object) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _row(name: str, est: StepEstimate, config: Config, hardware: GPU, command: str) -> dict:
    ceiling = mfu_ceiling(hardware, count_parameters(config.model))
    return {"layout": name, "command": command, "memory_gb": {k: v / GB for k, v in est.memory.items()},
            "peak_memory_gb": est.peak_memory / GB, "fits": est.fits,
            "traffic_gb_per_step": {k: v / GB for k, v in est.traffic.items()},
            "comm_s": est.comm_s, "compute_s": est.compute_s, "compute_parts_s": est.compute_parts,
            "exposed_comm_s": est.exposed_comm_s, "bubble_s": est.bubble_s, "step_s": est.step_s,
            "tokens_per_s": est.tokens_per_s, "mfu": est.mfu,
            "best_published_mfu": None if ceiling is None else {
                "mfu": ceiling.mfu / 100, "size_class": ceiling.size_class, "run": ceiling.label,
                "source": ceiling.source},
            "above_published": ceiling is not None and 100 * est.mfu > ceiling.mfu}


def _print_rows(rows: list[dict]) -> None:
    print(f"{'layout':44s} {'weights':>7s} {'grads':>6s} {'optim':>6s} {'activ':>6s} {'buffer':>6s} {'peak GB':>7s} "
          f"{'compute s':>9s} {'exposed':>7s} {'bubble':>6s} {'step s':>7s} {'tokens/s':>9s} {'MFU':>5s}  "
          "traffic GB/step")
    for r in rows:
        mem = r["memory_gb"]
        optim = mem["main weights"] + mem["optimizer state"]
        traffic = " ".join(f"{g} {v:.2f}" for g, v in sorted(r["traffic_gb_per_step"].items()) if v >= 0.005)
        best = r["best_published_mfu"]
        above = (f"  <- MFU {ABOVE} (best for {best['size_class']} on this GPU: {100 * best['mfu']:.1f} %, "
                 f"{best['run']}, {best['source']})") if r["above_published"] else ""
        print(f"{r['layout']:44s} {mem['weights']:7.1f} {mem['grads']:6.1f} {optim:6.1f} {mem['activations']:6.1f} "
              f"{mem['buffers']:6.1f} {r['peak_memory_gb']:7.1f} {r['compute_s']:9.3f} {r['exposed_comm_s']:7.3f} "
              f"{r['bubble_s']:6.3f} {r['step_s']:7.3f} {r['tokens_per_s']:9.0f} {100 * r['mfu']:4.1f}%  "
              f"{traffic}{above}")
        print(f"    {r['command']}")


def _print_validation(rows: list[dict], worst: dict[str, float]) -> None:
    print("calibration (megatron_lite/planner/calibration.py; docs/planner.md: sources, fitted and held-out rows):")
    for name, cal in CALIBRATIONS.items():
        print(f"  {name:12s} matmul ceiling {cal.matmul_ceiling:.3f} x GEMM fraction {cal.gemm_fraction:.3f}, "
              f"attention {cal.attention:.2f}, NVLink {cal.nvlink:.2f}, network {cal.network:.2f}, "
              f"HBM {cal.memory:.3f}, {1e6 * cal.kernel_overhead:.1f} us/kernel, "
              f"eager traffic {cal.eager_traffic:.1f}x, clock {cal.clock:.2f}")
    for r in rows:
        layout = f"tp{r['tp']} pp{r['pp']} dp{r['dp']} {r['sharding']}"
        print(f"{r['source']:66s} {r['model']:20s} {r['gpus']:5d} x {r['gpu']:10s} {layout:28s} {r['metric']:16s} "
              f"published {r['published']:7.1f} predicted {r['predicted']:7.1f} error {100 * r['error']:+6.1f}% "
              f"{'fitted' if r['fitted'] else 'held out'}")
    for arch, error in worst.items():
        print(f"worst error {arch}: {100 * error:.1f}% (limit {100 * TOLERANCE[arch]:.0f}%)")


def _worst(rows: list[dict]) -> dict[str, float]:
    """The largest error per architecture."""
    worst: dict[str, float] = {}
    for r in rows:
        arch = GPUS[r["gpu"]].architecture
        worst[arch] = max(worst.get(arch, 0.0), abs(r["error"]))
    return worst


def seed_tables(gpu_key: str = "H100") -> dict:
    """The seed documents' two tables, regenerated: speedup of a parameter server (PS), DP (reduction
    after backward), DDP (bucketed, overlapping the last backward) and FSDP (ZeRO-3, gathers prefetched) at a fixed
    global batch, and the per-GPU state memory of 7B/13B/70B unsharded, ZeRO-2 and ZeRO-3."""
    hardware = GPUS[gpu_key]
    base = Config(model=ModelConfig(family="llama", num_layers=22, hidden_size=2048, num_attention_heads=32,
                                    num_query_groups=4, ffn_hidden_size=5632, seq_length=2048, vocab_size=32000),
                  parallel=ParallelConfig(), train=TrainConfig(micro_batch_size=4, global_batch_size=256, bf16=True,
                                                               device="cuda"))

    def step(n: int, sharding: str, overlap: bool, mode: str = "all-reduce") -> float:
        par = dataclasses.replace(base.parallel, data_parallel_size=n, data_parallel_sharding_strategy=sharding,
                                  data_parallel_mode=mode)
        return estimate(dataclasses.replace(base, parallel=par), hardware, overlap_grad_reduce=overlap).step_s

    speedup = []
    one = step(1, "no_shard", True)
    for n in (2, 4, 8, 16):
        row = {"gpus": n}
        for name, sharding, overlap, mode in (("PS", "no_shard", False, "parameter-server"),
                                              ("DP", "no_shard", False, "all-reduce"),
                                              ("DDP", "no_shard", True, "all-reduce"),
                                              ("FSDP", "optim_grads_params", True, "all-reduce")):
            s = one / step(n, sharding, overlap, mode)
            row[name] = s
            row[f"{name} P"] = (1 - 1 / s) / (1 - 1 / n)  # Amdahl's parallel fraction this speedup implies
        speedup.append(row)
    shapes = {"7B": dict(num_layers=32, hidden_size=4096, num_attention_heads=32, ffn_hidden_size=11008),
              "13B": dict(num_layers=40, hidden_size=5120, num_attention_heads=40, ffn_hidden_size=13824),
              "70B": dict(num_layers=80, hidden_size=8192, num_attention_heads=64, num_query_groups=8,
                          ffn_hidden_size=28672)}
    memory = []
    for label, shape in shapes.items():
        model = ModelConfig(family="llama", seq_length=4096, vocab_size=32000, **shape)
        row = {"model": label}
        for name, sharding, dp in (("unsharded", "no_shard", 1), ("ZeRO-2 (dp 8)", "optim_grads", 8),
                                   ("ZeRO-3 (dp 8)", "optim_grads_params", 8)):
            config = Config(model=model, parallel=ParallelConfig(data_parallel_size=dp,
                                                                 data_parallel_sharding_strategy=sharding),
                            train=TrainConfig(micro_batch_size=1, global_batch_size=8, bf16=True, device="cuda"))
            est = estimate(config, hardware)
            row[name] = sum(v for k, v in est.memory.items() if k not in ("activations", "buffers")) / GB
        memory.append(row)
    return {"gpu": hardware.name, "speedup": speedup, "memory_gb": memory}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], add_help=False)
    parser.add_argument("--gpu", default="H100", type=str.upper, choices=sorted(GPUS), help="the GPU type")
    parser.add_argument("--num-gpus", type=int, default=8, help="GPUs in the cluster")
    parser.add_argument("--top", type=int, default=5, help="layouts to print")
    parser.add_argument("--layout", action="store_true", help="evaluate the layout the parallel flags give")
    parser.add_argument("--validate", action="store_true", help="compare with published throughputs")
    parser.add_argument("--seed-tables", action="store_true", help="regenerate the DP/DDP/FSDP and ZeRO tables")
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--mean-document-length", type=float,
                        help="with --reset-attention-mask: the documents' mean length in tokens "
                             "(default: the sequence's)")
    ours, rest = parser.parse_known_args(argv)
    if "-h" in rest or "--help" in rest:
        parser.print_help()
        print("\nplus pretrain_gpt.py's model, parallel and batch flags (python pretrain_gpt.py --help)")
        return 0
    if ours.validate:
        rows = validate()
        worst = _worst(rows)
        if ours.json:
            print(json.dumps({"calibration": {k: dataclasses.asdict(v) for k, v in CALIBRATIONS.items()},
                              "rows": rows, "worst_error": worst}, indent=1))
        else:
            _print_validation(rows, worst)
        return 0 if all(error <= TOLERANCE[arch] for arch, error in worst.items()) else 1
    if ours.seed_tables:
        tables = seed_tables(ours.gpu)
        if ours.json:
            print(json.dumps(tables, indent=1))
            return 0
        print(f"speedup at a fixed global batch (llama-1b, 256 x 2048 tokens, bf16, {tables['gpu']}, 8 per node), "
              "with the Amdahl parallel fraction P each implies")
        columns = ("PS", "PS P", "DP", "DP P", "DDP", "DDP P", "FSDP", "FSDP P")
        print(f"{'GPUs':>4s} " + " ".join(f"{k:>9s}" for k in columns))
        for r in tables["speedup"]:
            print(f"{r['gpus']:4d} " + " ".join(f"{r[k]:8.2f}x" if " " not in k else f"{r[k]:9.3f}" for k in columns))
        print("\nper-GPU weights + grads + optimizer state, GB (bf16 weights, fp32 grads, main weights and Adam)")
        for r in tables["memory_gb"]:
            print(f"{r['model']:>4s} " + " ".join(f"{k} {v:7.1f}" for k, v in r.items() if k != "model"))
        return 0
    if ours.num_gpus <= 0:
        print(f"error: --num-gpus={ours.num_gpus} must be positive", file=sys.stderr)
        return 2
    try:
        config = parse_args(rest + (["--bf16"] if "--fp16" not in rest else []) + ["--device", "cuda"],
                            world_size=ours.num_gpus)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    length = ours.mean_document_length
    if length is not None and (length <= 0 or not config.train.reset_attention_mask):
        print(f"error: --mean-document-length={length} must be positive and goes with --reset-attention-mask",
              file=sys.stderr)
        return 2
    hardware = gpu_named(ours.gpu)
    if ours.layout:
        given = Candidate(config, estimate(config, hardware, mean_document_length=length))
        best, count = [given], 1
    else:
        best, count = plan(config, ours.num_gpus, hardware, ours.top, length)
    rows = [_row(c.name, c.estimate, c.config, hardware, command_line(c.config, rest, ours.num_gpus, hardware))
            for c in best]
    if ours.json:
        print(json.dumps({"gpu": hardware.name, "num_gpus": ours.num_gpus, "valid_layouts": count, "layouts": rows},
                         indent=1))
        return 0
    print(f"{config.model.num_layers} layers, hidden {config.model.hidden_size}, seq {config.model.seq_length}, "
          f"global batch {config.train.global_batch_size} on {ours.num_gpus} x {hardware.name}: "
          f"{count} valid layout(s), {len(rows)} shown (fits: peak <= 95% of {hardware.memory_gb:.0f} GB)")
    _print_rows(rows)
    if not rows:
        print("no layout fits in memory: more GPUs, a smaller micro batch or a shorter sequence")
    return 0


if __name__ == "__main__":
    sys.exit(main())
