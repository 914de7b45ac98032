"""What one GPU can tell about this code, in one command and one markdown report for BENCHMARKS.md.

    PYTHONPATH=. python tools/gpu_report.py [--out report.md] [--quick] [--sections kernel-bench,...]
    PYTHONPATH=. python tools/gpu_report.py --allow-cpu     # no GPU: the CPU path of every section

Each section runs as a subprocess of the work tree (no install needed) with its own timeout:

  gpu-tests       pytest -m gpu tests/test_gpu.py: the kernels compiled for this GPU in bf16 and
                  fp16, the fused loss at vocab 128k, training with and without fused kernels
  kernel-bench    tools/bench_kernels.py --quick: each kernel against eager torch, torch.compile, ...
  training-bench  tools/benchmark_training.py: tokens/s, MFU and memory of training steps
  precision       tools/precision_parity.py: bf16 and fp16 training against fp32 for 50 steps of
                  the tiny llama, the curves in one plot
  kernel-tests    pytest tests/test_kernels_*.py, the CPU kernel tests, on this machine's torch
                  and Triton; under TRITON_INTERPRET=1, which conftest.py sets only without CUDA,
                  because they launch kernels on CPU tensors

The report gives the environment (device, versions, date, commit), then per section its command,
exit status and wall time, the lines of its output worth quoting (pytest's summary, the kernel
benchmark's device line) and its CSV as a markdown table; for a failed section, the end of its
output. It is rewritten after every section, with each section's CSV and full log kept beside it
(REPORT.<section>.csv / .log). A section that fails, hangs or cannot start is recorded and the
next one runs. Each runs at most its own timeout and all of them together BUDGET_S seconds, so
that the report takes under 8 minutes: a section still running when the budget is spent is
killed, and those after it are recorded as not run.

--quick, for a first look: the kernel tests without the sm_90 compile check (the GPU tests
compile the kernels for this device anyway), the kernel benchmark on QUICK_BENCH_OPS and the
training benchmark without its torch.compile rows.

Without CUDA the report says so and nothing runs (exit status 2), unless --allow-cpu: then each
section takes its CPU path (the GPU tests skip themselves, tools/bench_kernels.py --cpu-smoke, the
training benchmark's CPU defaults, 3 steps of the precision comparison), which checks the report's
own wiring. Exit status 0 when every section succeeded, else 1.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import importlib.metadata
import os
import platform
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 465.0  # all sections together: 8 minutes less 15 s for starting, the environment and writing
QUICK_BENCH_OPS = "rmsnorm,flash_attention,fused_linear_cross_entropy"  # one op per BENCHMARKS.md target
QUICK_TRAINING_ROWS = ["megatron_lite", "megatron_lite-unfused", "hf-eager"]
TAIL_LINES = 40  # of a failed section's output
SUMMARY_LINES = 60


@dataclass
class Section:
    name: str
    title: str
    command: list[str]  # "python" stands for this interpreter
    timeout_s: float
    summary: Callable[[str], list[str]]  # the lines of its output worth quoting
    log: Path  # all of its output
    csv: Path | None = None  # the table it writes
    env: dict[str, str] = field(default_factory=dict)  # on top of this process's environment


@dataclass
class Result:
    returncode: int | None  # None: killed at its timeout, or never started
    wall_s: float
    output: str
    note: str = ""  # why there is no exit status

    @property
    def status(self) -> str:
        return self.note if self.returncode is None else f"exit {self.returncode}"


def pytest_summary(output: str) -> list[str]:
    """pytest's short summary (failures, and skips with their reasons) and its count line."""
    lines = output.rstrip().splitlines()
    for i, line in enumerate(lines):
        if "short test summary info" in line:
            return lines[i + 1:]
    return lines[-1:]


def bench_device_line(output: str) -> list[str]:
    """tools/bench_kernels.py's first line: the device, its measured copy bandwidth and its peak TFLOP/s."""
    return [line for line in output.splitlines() if line.startswith("device:")][:1]


def build_sections(out: Path, cuda: bool, quick: bool) -> list[Section]:
    def beside(name: str, suffix: str) -> Path:
        return out.with_name(f"{out.stem}.{name}.{suffix}")

    kernel_tests = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "tests").glob("test_kernels_*.py")
                          if not (quick and p.name == "test_kernels_compile.py"))
    bench = ["--quick"] if cuda else ["--cpu-smoke"]
    bench += ["--ops", QUICK_BENCH_OPS] if quick else []
    training = ["--rows", *QUICK_TRAINING_ROWS] if quick else []
    # In order of what a GPU run is for; the kernel tests, which run the interpreter on CPU, last.
    return [
        Section("gpu-tests", "GPU tests", ["python", "-m", "pytest", "-m", "gpu", "-q", "tests/test_gpu.py"],
                180, pytest_summary, beside("gpu-tests", "log")),
        Section("kernel-bench", "Kernel benchmark",
                ["python", "tools/bench_kernels.py", *bench, "--csv", str(beside("kernel-bench", "csv"))],
                150, bench_device_line, beside("kernel-bench", "log"), csv=beside("kernel-bench", "csv")),
        Section("training-bench", "Training benchmark",
                ["python", "tools/benchmark_training.py", *training, "--csv", str(beside("training-bench", "csv"))],
                180, lambda output: [], beside("training-bench", "log"), csv=beside("training-bench", "csv")),
        Section("precision", "Mixed precision against fp32",
                ["python", "tools/precision_parity.py", "--steps", "50" if cuda else "3",
                 "--csv", str(beside("precision", "csv")), "--plot", str(beside("precision", "png"))],
                120, lambda output: [line for line in output.splitlines() if " vs fp32 " in line],
                beside("precision", "log"), csv=beside("precision", "csv")),
        Section("kernel-tests", "Kernel tests (Triton interpreter)", ["python", "-m", "pytest", "-q", *kernel_tests],
                150, pytest_summary, beside("kernel-tests", "log"), env={"TRITON_INTERPRET": "1"}),
    ]


def run_section(section: Section, timeout_s: float) -> Result:
    """Run one section, its output going to its log; whatever happens becomes its Result."""
    # The kernels compile for real unless a section asks for the interpreter: a TRITON_INTERPRET=1
    # left in the environment would run the GPU tests and benchmarks on the CPU.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(section.env, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    command = [sys.executable if part == "python" else part for part in section.command]
    start, returncode, note = time.perf_counter(), None, ""
    try:
        with open(section.log, "wb") as f:
            # Its own process group, so that a timeout also ends what it started (pytest's subprocesses).
            proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                returncode = proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                note = f"killed at its timeout of {timeout_s:.0f} s"
            finally:
                if proc.poll() is None:  # timed out, or this report was interrupted: leave nothing running
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
    except OSError as exc:
        note = f"could not run: {exc}"
    output = section.log.read_text(errors="replace") if section.log.exists() else ""
    return Result(returncode, time.perf_counter() - start, output, note)


def markdown_table(path: Path) -> str:
    """A CSV as a markdown table: numbers to 4 significant digits, columns empty in every row left out."""
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        return "(the CSV has no rows)"
    columns = [c for c in rows[0] if c is not None and any(row[c] for row in rows)]
    lines = ["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
    lines += ["| " + " | ".join(_cell(row[c]) for c in columns) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value: str | None) -> str:
    value = value or ""
    try:
        int(value)
        return value
    except ValueError:
        pass
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value.replace("|", "\\|")


def _code_block(lines: list[str]) -> list[str]:
    return ["```text", *lines, "```", ""]


def render_section(section: Section, result: Result) -> list[str]:
    """A section's markdown lines: its command, status and time, what it printed worth quoting, its table."""
    shown = shlex.join([*(f"{k}={v}" for k, v in section.env.items()), *section.command])
    lines = [f"## {section.title}", "", f"`{shown}`: {result.status}, {result.wall_s:.1f} s", ""]
    try:
        quoted = section.summary(result.output)[:SUMMARY_LINES]
        lines += _code_block(quoted) if quoted else []
        if section.csv is not None and section.csv.exists() and result.returncode == 0:
            lines += [markdown_table(section.csv), ""]
    except Exception as exc:  # a malformed CSV or output must not cost the other sections
        lines += [f"(its output could not be rendered: {type(exc).__name__}: {exc})", ""]
    if result.returncode != 0 and result.output.strip():
        lines += [f"The end of its output (all of it: {section.log.name}):", "",
                  *_code_block(result.output.rstrip().splitlines()[-TAIL_LINES:])]
    return lines


def _version(*distributions: str) -> str:
    for name in distributions:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def _git(*args: str) -> str:
    done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
    return done.stdout.strip()


def _commit() -> str:
    try:
        head = _git("rev-parse", "--short", "HEAD")
        return head + (" with uncommitted changes" if _git("status", "--porcelain") else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"


def environment(cuda: bool, argv: list[str]) -> list[str]:
    """The report's first lines, as BENCHMARKS.md lists a run: device, versions, date, commit, command."""
    device = "none: no CUDA device is visible"
    if cuda:
        props = torch.cuda.get_device_properties(0)
        device = (f"{torch.cuda.get_device_name(0)} (compute capability {props.major}.{props.minor}, "
                  f"{props.total_memory / 2**30:.0f} GiB)")
    return [f"- device: {device}",
            f"- torch: {torch.__version__}",
            f"- CUDA: {torch.version.cuda or 'none (a CPU build of torch)'}",
            f"- triton: {_version('triton', 'pytorch-triton')}",
            f"- transformers: {_version('transformers')}",
            f"- python: {platform.python_version()}",
            f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M} UTC",
            f"- commit: {_commit()}",
            f"- command: `{shlex.join(['python', 'tools/gpu_report.py', *argv])}`"]


def write_report(out: Path, header: list[str], body: list[str]) -> None:
    out.write_text("\n".join(["# GPU report", "", *header, "", *body]).rstrip() + "\n")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("gpu_report.md"), help="the markdown report to write")
    parser.add_argument("--quick", action="store_true", help="shorter sections (see the module docstring)")
    parser.add_argument("--sections", help="comma-separated sections to run (default: all of them)")
    parser.add_argument("--allow-cpu", action="store_true", help="without CUDA, run each section's CPU path")
    args = parser.parse_args(argv)
    out = args.out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    cuda = torch.cuda.is_available()
    sections = build_sections(out, cuda, args.quick)
    if args.sections:
        names = args.sections.split(",")
        unknown = sorted(set(names) - {s.name for s in sections})
        if unknown:
            parser.error(f"unknown sections {unknown}; choose from {[s.name for s in sections]}")
        sections = [s for s in sections if s.name in names]
    header = environment(cuda, argv)
    if not cuda and not args.allow_cpu:
        message = "gpu_report: no CUDA device is visible, so nothing was run (--allow-cpu runs the CPU path)"
        write_report(out, header, [message])
        print(message, file=sys.stderr)
        return 2
    deadline = time.monotonic() + BUDGET_S
    body: list[str] = []
    failed = False
    for i, section in enumerate(sections):
        left = deadline - time.monotonic()
        if left < 1:
            result = Result(None, 0.0, "", "not run: the report's time budget was spent")
        else:
            result = run_section(section, min(section.timeout_s, left))
            if result.returncode is None and left < section.timeout_s:
                result.note = f"killed after {left:.0f} s, when the report's time budget ran out"
        failed |= result.returncode != 0
        body += render_section(section, result)
        pending = [s.name for s in sections[i + 1:]]
        write_report(out, header, body + ([f"Still to run: {', '.join(pending)}."] if pending else []))
        print(f"{section.name}: {result.status} in {result.wall_s:.0f} s", flush=True)
    print(f"wrote {out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
