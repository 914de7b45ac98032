"""tools/gpu_report.py without a GPU: its CPU path writes the report, without --allow-cpu it refuses in
one line, and a section that fails or hangs is recorded rather than ending the report."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

from helpers.commands import run_command
from tools.gpu_report import Section, pytest_summary, render_section, run_section

# The CPU path on any machine: on a GPU machine the GPU sections would run for minutes.
NO_GPU = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
REPORT = [sys.executable, "tools/gpu_report.py"]


def test_cpu_path_reports_the_environment_and_the_tables(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    result = run_command(REPORT + ["--allow-cpu", "--quick", "--sections", "gpu-tests,kernel-bench,precision",
                                   "--out", str(out)], env=NO_GPU)
    assert result.returncode == 0, result.stdout + result.stderr
    report = out.read_text()
    for line in ("- device: none: no CUDA device is visible", f"- torch: {torch.__version__}", "- CUDA: ",
                 "- triton: ", "- transformers: ", "- date: "):
        assert f"\n{line}" in report, line
    assert "`python -m pytest -m gpu -q tests/test_gpu.py`: exit 0" in report
    assert "skipped" in report  # pytest's summary line: without CUDA the GPU tests skip themselves
    assert "| op | shape | dtype | impl |" in report and "\n| --- |" in report  # the kernel benchmark's CSV
    for op in ("rmsnorm", "flash_attention", "fused_linear_cross_entropy"):  # the --quick ops
        assert f"\n| {op} |" in report, op
    assert (tmp_path / "report.kernel-bench.csv").exists() and (tmp_path / "report.kernel-bench.log").exists()
    # The precision comparison: its differences quoted, a row per step, the curves drawn.
    assert "bf16 vs fp32 over 3 steps: largest relative difference of the loss" in report
    assert "| step | fp32_loss | fp32_grad_norm | bf16_loss |" in report and "\n| 3 |" in report
    assert (tmp_path / "report.precision.png").stat().st_size > 0


def test_without_cuda_it_refuses_in_one_line(tmp_path: Path) -> None:
    out = tmp_path / "report.md"
    result = run_command(REPORT + ["--out", str(out)], env=NO_GPU)
    message = "gpu_report: no CUDA device is visible, so nothing was run (--allow-cpu runs the CPU path)"
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [message]
    assert message in out.read_text()


def test_a_failing_or_hanging_section_is_recorded(tmp_path: Path) -> None:
    hang = Section("hang", "Hang", ["python", "-c", "import time; print('started', flush=True); time.sleep(60)"],
                   1, pytest_summary, tmp_path / "hang.log")
    fail = Section("fail", "Fail", ["python", "-c", "raise SystemExit('no such benchmark')"], 30,
                   pytest_summary, tmp_path / "fail.log", csv=tmp_path / "never-written.csv")
    hung, failed = run_section(hang, hang.timeout_s), run_section(fail, fail.timeout_s)
    assert hung.returncode is None and hung.status == "killed at its timeout of 1 s"
    assert failed.returncode == 1
    text = "\n".join(render_section(hang, hung) + render_section(fail, failed))
    assert "killed at its timeout of 1 s" in text and "started" in text
    assert "exit 1" in text and "no such benchmark" in text
