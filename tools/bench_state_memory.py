"""Peak resident memory of each process that builds, saves, loads, reshards and converts a model's state,
against the rank's shard of that state.

    python tools/bench_state_memory.py                      # llama, hidden 1024, 12 and 24 layers, tp 2
    python tools/bench_state_memory.py --layers 12 24 --hidden-size 512   # smaller, for a machine with less memory

For each size, run as a user runs them (pretrain_gpt.py and tools/convert_checkpoint.py, so whatever
checkpoint format is the default is what is measured), in a scratch directory:

  start       torchrun --nproc-per-node 2 pretrain_gpt.py --tp 2: build, 1 step, save
  tp 1 save   python pretrain_gpt.py: build, 1 step, save (what the reshard row loads; not in the ratios)
  load        the tp 2 checkpoint at tp 2, 1 more step
  reshard     the tp 1 checkpoint at tp 2, 1 more step
  to-hf       convert_checkpoint.py to-hf --max-shard-size-gb 0.1 of the tp 2 checkpoint
  from-hf     convert_checkpoint.py from-hf --tp 2 of that export

A process's peak is its VmHWM (/proc/<pid>/status), polled every 50 ms for every process of the
command's tree (torchrun and its ranks, a tool and the ranks it spawns); the kernel's maximum over
the processes the command reaped (wait4) is a floor under it, for growth after the last poll. A
step's "peak per rank" is its largest process, a rank (launchers hold no model state). The baseline
is a bare `import torch, megatron_lite, transformers`. The state a rank should be near comes from the
planner (megatron_lite/planner/memory.py): its weights, and weights + grads + Adam moments. A
training step's peak also holds the step's activations, which grow with the layers as well: the
growth lines print the planner's estimate of them beside the state's.
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_lite.planner.memory import activation_memory, state_memory  # noqa: E402
from megatron_lite.training.arguments import parse_args  # noqa: E402

TP = 2
MIB = 2**20
POLL_S = 0.05
BASELINE = "import torch, megatron_lite, transformers"


@dataclass(frozen=True)
class Peak:
    largest: int  # bytes: the step's largest process
    processes: list[int]  # bytes: each polled process's VmHWM, largest first


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                stat = Path(f"/proc/{entry.name}/stat").read_text()
            except OSError:  # gone since the listing
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the name, in parentheses, may hold spaces
            kids.setdefault(ppid, []).append(int(entry.name))
    return kids


def _tree(root: int) -> list[int]:
    kids, found = _children(), [root]
    for pid in found:
        found += kids.get(pid, [])
    return found


def _vmhwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None  # gone, or a zombie (its memory freed)


def measure(cmd: list[str], cwd: Path, log: Path) -> Peak:
    """Run `cmd` to completion and return its processes' peaks; fail with the end of its output."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
        peaks: dict[int, int] = {}
        while True:
            # wait4, not Popen.poll: its rusage holds the maximum RSS over the command's reaped tree.
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            for child in _tree(proc.pid):
                hwm = _vmhwm(child)
                if hwm is not None:
                    peaks[child] = max(peaks.get(child, 0), hwm)
            time.sleep(POLL_S)
        proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode:
        sys.exit(f"bench_state_memory.py: {' '.join(cmd)} exited with {proc.returncode}:\n"
                 + "\n".join(log.read_text().splitlines()[-20:]))
    polled = sorted(peaks.values(), reverse=True)
    return Peak(max([usage.ru_maxrss * 1024, *polled]), polled)


def model_flags(layers: int, hidden: int, seq: int) -> list[str]:
    heads = max(TP, hidden // 64)
    return ["--num-layers", str(layers), "--hidden-size", str(hidden), "--num-attention-heads", str(heads),
            "--seq-length", str(seq), "--micro-batch-size", "1", "--global-batch-size", "1", "--eval-interval", "0",
            "--log-interval", "1", "--device", "cpu"]


def shards(flags: list[str]) -> dict[str, int]:
    """Bytes a rank at tp 2 holds (weights; with grads and Adam; a step's activations, estimated)
    and the whole model's weights."""
    config = parse_args([*flags, "--tp", str(TP)], world_size=TP)
    rank = state_memory(config)
    whole = state_memory(parse_args(flags, world_size=1))
    return {"weights": rank["weights"], "training": sum(rank.values()), "model": whole["weights"],
            "activations": activation_memory(config)}


def run_size(layers: int, args: argparse.Namespace, work: Path, baseline: int) -> dict[str, Peak]:
    flags = model_flags(layers, args.hidden_size, args.seq_length)
    state = shards(flags)
    here = work / f"layers{layers}"
    here.mkdir()
    python, pretrain, convert = sys.executable, str(ROOT / "pretrain_gpt.py"), str(ROOT / "tools/convert_checkpoint.py")
    torchrun = [python, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(TP), pretrain]
    tp2, tp1, hf = str(here / "tp2"), str(here / "tp1"), str(here / "hf")
    steps = {
        "start (1 step + save)": [*torchrun, *flags, "--tp", str(TP), "--train-iters", "1", "--save", tp2],
        "tp 1 save (reshard's source)": [python, pretrain, *flags, "--train-iters", "1", "--save", tp1],
        "load tp 2 at tp 2 (+1 step)": [*torchrun, *flags, "--tp", str(TP), "--train-iters", "2", "--load", tp2],
        "reshard tp 1 at tp 2 (+1 step)": [*torchrun, *flags, "--tp", str(TP), "--train-iters", "2", "--load", tp1],
        "to-hf --max-shard-size-gb 0.1": [python, convert, "to-hf", "--load", tp2, "--out", hf,
                                          "--max-shard-size-gb", "0.1"],
        "from-hf --tp 2": [python, convert, "from-hf", hf, "--out", str(here / "from_hf"), "--tp", str(TP)],
    }
    print(f"\nllama, {layers} layers, hidden {args.hidden_size}, seq {args.seq_length}: weights "
          f"{state['model'] / MIB:,.1f} MiB; a tp {TP} rank's shard: weights {state['weights'] / MIB:,.1f} MiB, "
          f"weights + grads + Adam {state['training'] / MIB:,.1f} MiB; baseline ({BASELINE}) {baseline / MIB:,.0f} MiB",
          flush=True)
    print(f"{'step':32s} {'peak per rank MiB':>18s} {'above baseline':>15s}   every process (MiB)")
    peaks = {}
    for i, (name, cmd) in enumerate(steps.items()):
        peak = peaks[name] = measure(cmd, here, here / f"step{i}.log")
        print(f"{name:32s} {peak.largest / MIB:18,.0f} {(peak.largest - baseline) / MIB:15,.0f}   "
              + ", ".join(f"{p / MIB:,.0f}" for p in peak.processes), flush=True)
    load, reshard = peaks["load tp 2 at tp 2 (+1 step)"].largest, peaks["reshard tp 1 at tp 2 (+1 step)"].largest
    to_hf, from_hf = peaks["to-hf --max-shard-size-gb 0.1"].largest, peaks["from-hf --tp 2"].largest
    print(f"reshard / same-layout load: {reshard / load:.2f} (acceptance <= 1.25); "
          f"to-hf above baseline / weights: {(to_hf - baseline) / state['model']:.2f} (<= 0.6); "
          f"from-hf above baseline / a rank's weights: {(from_hf - baseline) / state['weights']:.2f} (<= 2)",
          flush=True)
    if not args.keep:
        shutil.rmtree(here)
    return {"state": state, **peaks}


# What each step's growth compares with: the state its largest process must hold grows by this much.
GROWTH_BASIS = {"start (1 step + save)": "training", "load tp 2 at tp 2 (+1 step)": "training",
                "reshard tp 1 at tp 2 (+1 step)": "training", "to-hf --max-shard-size-gb 0.1": "model",
                "from-hf --tp 2": "weights"}


def print_growth(small: int, large: int, results: dict[int, dict]) -> None:
    a, b = results[small], results[large]
    print(f"\ngrowth {small} -> {large} layers, per rank: peak growth / the extra state it holds (a rank's weights + "
          f"grads + Adam for training steps, the model's weights for to-hf, a rank's weights for from-hf; "
          f"acceptance <= 1)")
    for name, basis in GROWTH_BASIS.items():
        extra = b["state"][basis] - a["state"][basis]
        grown = b[name].largest - a[name].largest
        line = f"{name:32s} grew {grown / MIB:8,.0f} MiB, extra state {extra / MIB:8,.0f} MiB: {grown / extra:.2f}"
        if basis == "training":
            activations = b["state"]["activations"] - a["state"]["activations"]
            line += (f"; with the step's extra activations (planner: {activations / MIB:,.0f} MiB): "
                     f"{grown / (extra + activations):.2f}")
        print(line)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs=2, default=[12, 24], metavar=("SMALL", "LARGE"))
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--seq-length", type=int, default=128)
    parser.add_argument("--quick", action="store_true", help="a toy size (1 and 2 layers, hidden 64): the smoke test")
    parser.add_argument("--workdir", help="where the checkpoints go (default: a temporary directory)")
    parser.add_argument("--keep", action="store_true", help="keep the checkpoints and logs")
    args = parser.parse_args(argv)
    if args.quick:
        args.layers, args.hidden_size, args.seq_length = [1, 2], 64, 16
    work = Path(args.workdir or tempfile.mkdtemp(prefix="bench_state_memory_"))
    work.mkdir(parents=True, exist_ok=True)
    log = work / "baseline.log"
    baseline = measure([sys.executable, "-c", BASELINE], work, log).largest
    results = {layers: run_size(layers, args, work, baseline) for layers in args.layers}
    print_growth(*args.layers, results)
    if not args.keep and not args.workdir:
        shutil.rmtree(work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
