"""Benchmark the kernels against torch eager, torch.compile, Liger-Kernel and SDPA flash.

    python tools/bench_kernels.py [--ops rmsnorm,rope,...] [--csv out.csv] [--quick]
    python tools/bench_kernels.py --cpu-smoke     # same code path, tiny fp32 shapes, interpreter

Per shape and implementation it prints forward and forward+backward time, throughput
(GB/s for memory-bound ops, TFLOP/s for matmul/attention; see kernel_bench_cases.py for how work
is counted), that throughput as a fraction of the device's peak, peak memory and the
speedup over eager, and writes the same rows to a CSV; flash_attention_documents (8 documents
per packed sample) also prints the document-masked kernel's time against the plain causal one.
Peak bandwidth is measured in the same run as a large device-to-device copy (bytes read +
written); peak TFLOP/s comes from the table below (dense bf16). Timings are medians of several
trials, each averaging many back-to-back calls between two device synchronisations.
"""
import argparse
import csv
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from megatron_lite.planner.hardware import peak_tflops  # noqa: E402

CSV_FIELDS = ["op", "shape", "dtype", "impl", "fwd_ms", "fwd_bwd_ms", "unit", "fwd_throughput",
              "fwd_bwd_throughput", "fwd_bwd_frac_of_peak", "peak_mem_mib", "fwd_speedup_vs_eager",
              "fwd_bwd_speedup_vs_eager", "error"]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable, device: torch.device, reps: int, trials: int) -> float:
    fn()  # warm-up: Triton/torch.compile compilation, allocator caches
    times = []
    for _ in range(trials):
        _sync(device)
        start = time.perf_counter()
        for _ in range(reps):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) * 1e3 / reps)
    return statistics.median(times)


def _copy_gbps(device: torch.device, nbytes: int) -> float:
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps=10, trials=5)
    return 2 * nbytes / ms / 1e6


def _peak_tflops(device: torch.device) -> Optional[float]:
    if device.type != "cuda":
        return None
    return peak_tflops(torch.cuda.get_device_name(device))


def _as_tuple(out) -> tuple:
    return out if isinstance(out, tuple) else (out,)


def _measure(case, fn: Callable, device: torch.device, reps: int, trials: int) -> dict:
    inputs = case.make_inputs()
    leaves = [t for t in inputs.values() if t.requires_grad]
    outs = _as_tuple(fn(**inputs))
    cotangents = [torch.randn_like(o) if o.numel() > 1 else torch.ones_like(o) for o in outs]

    def fwd_bwd():
        torch.autograd.grad(_as_tuple(fn(**inputs)), leaves, cotangents, allow_unused=True)

    fwd_ms = _time_ms(lambda: fn(**inputs), device, reps, trials)
    fwd_bwd_ms = _time_ms(fwd_bwd, device, reps, trials)
    peak_mib = None
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        fwd_bwd()
        peak_mib = torch.cuda.max_memory_allocated(device) / 2**20
    return dict(fwd_ms=fwd_ms, fwd_bwd_ms=fwd_bwd_ms, peak_mem_mib=peak_mib)


def _throughput(work: float, ms: float, unit: str) -> float:
    return work / ms / (1e6 if unit == "GB/s" else 1e9)


def _fmt(x: Optional[float], spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def run(args: argparse.Namespace) -> list:
    from tools import kernel_bench_cases as bench_cases  # after main() has set the Triton environment

    device = torch.device("cpu" if args.cpu_smoke else "cuda")
    dtype = torch.float32 if args.cpu_smoke else torch.bfloat16
    reps, trials = (1, 1) if args.cpu_smoke else (5, 3) if args.quick else (20, 5)
    peak = {"GB/s": _copy_gbps(device, 2**22 if args.cpu_smoke else 2**30), "TFLOP/s": _peak_tflops(device)}
    print(f"device: {torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu (interpreter)'}; "
          f"copy bandwidth {peak['GB/s']:.0f} GB/s; peak bf16 {_fmt(peak['TFLOP/s'], '.0f')} TFLOP/s")
    # The smoke run checks the wiring, not inductor: a CPU inductor compile takes ~20 s a graph.
    compile_backend = "eager" if args.cpu_smoke else "inductor"
    rows = []
    for case in bench_cases.cases(args.ops, device, dtype, args.cpu_smoke, args.quick):
        print(f"\n{case.op} {case.shape} {str(dtype).replace('torch.', '')}")
        impls = dict(case.impls, compile=torch.compile(case.impls["eager"], backend=compile_backend))
        results = {}
        for name, fn in impls.items():
            try:
                results[name] = _measure(case, fn, device, reps, trials)
            except Exception as e:  # one failing baseline (OOM, API drift) must not end the sweep
                first_line = (str(e).splitlines() or [""])[0]
                results[name] = dict(error=f"{type(e).__name__}: {first_line[:120]}")
            if device.type == "cuda":
                torch.cuda.empty_cache()
        for row in _rows(case, results, peak, dtype):
            rows.append(row)
            _print_row(row)
        if case.baseline and all("error" not in results[name] for name in ("ours", case.baseline)):
            ours, base = results["ours"], results[case.baseline]
            print(f"  ours vs {case.baseline}: x{base['fwd_ms'] / ours['fwd_ms']:.2f} fwd, "
                  f"x{base['fwd_bwd_ms'] / ours['fwd_bwd_ms']:.2f} fwd+bwd")
    return rows


def _rows(case, results: dict, peak: dict, dtype: torch.dtype) -> list:
    """One CSV row per implementation: times, throughput, fraction of peak, speedup."""
    eager = results["eager"]
    rows = []
    for name, r in results.items():
        row = dict(op=case.op, shape=case.shape, dtype=str(dtype), impl=name, unit=case.unit, **r)
        if "error" not in r:
            row["fwd_throughput"] = _throughput(case.work_fwd, r["fwd_ms"], case.unit)
            row["fwd_bwd_throughput"] = _throughput(case.work_fwd_bwd, r["fwd_bwd_ms"], case.unit)
            if peak[case.unit]:
                row["fwd_bwd_frac_of_peak"] = row["fwd_bwd_throughput"] / peak[case.unit]
            if "error" not in eager:
                row["fwd_speedup_vs_eager"] = eager["fwd_ms"] / r["fwd_ms"]
                row["fwd_bwd_speedup_vs_eager"] = eager["fwd_bwd_ms"] / r["fwd_bwd_ms"]
        rows.append(row)
    return rows


def _print_row(row: dict) -> None:
    if row.get("error"):
        print(f"  {row['impl']:<11} failed: {row['error']}")
        return
    frac = row.get("fwd_bwd_frac_of_peak")
    print(f"  {row['impl']:<11} fwd {row['fwd_ms']:8.3f} ms {row['fwd_throughput']:7.4g} {row['unit']}"
          f" | fwd+bwd {row['fwd_bwd_ms']:8.3f} ms {row['fwd_bwd_throughput']:7.4g} {row['unit']}"
          f" ({'n/a' if frac is None else format(frac, '.0%')} of peak)"
          f" | peak {_fmt(row['peak_mem_mib'], '.0f')} MiB"
          f" | vs eager x{_fmt(row.get('fwd_speedup_vs_eager'), '.2f')} fwd,"
          f" x{_fmt(row.get('fwd_bwd_speedup_vs_eager'), '.2f')} fwd+bwd")


def main(argv: Optional[list] = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ops", default="all", help="comma-separated ops, or 'all'")
    parser.add_argument("--csv", help="write the results to this CSV file")
    parser.add_argument("--quick", action="store_true", help="one shape per op, fewer repetitions")
    parser.add_argument("--cpu-smoke", action="store_true",
                        help="tiny fp32 shapes on CPU under TRITON_INTERPRET=1 (checks the code path)")
    args = parser.parse_args(argv)

    if args.cpu_smoke:
        # triton.jit reads this when the kernel modules are imported, i.e. in run().
        os.environ.setdefault("TRITON_INTERPRET", "1")
        os.environ["MEGATRON_LITE_TRITON"] = "1"
    elif not torch.cuda.is_available():
        print("tools/bench_kernels.py needs a CUDA GPU and found none (--cpu-smoke runs a tiny CPU check).")
        return 0
    from tools.kernel_bench_cases import OPS

    args.ops = list(OPS) if args.ops == "all" else args.ops.split(",")
    unknown = sorted(set(args.ops) - set(OPS))
    if unknown:
        parser.error(f"unknown ops {unknown}; choose from {list(OPS)}")
    rows = run(args)
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        print(f"\nwrote {len(rows)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
