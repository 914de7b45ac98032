"""tools/bench_kernels.py: the CPU smoke run exercises the whole benchmark path on every op."""
import csv
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tools.bench_kernels import main
from tools.kernel_bench_cases import OPS

REPO = Path(__file__).resolve().parent.parent


def test_cpu_smoke_measures_every_op_and_writes_csv(tmp_path):
    out = tmp_path / "bench.csv"
    proc = subprocess.run(
        [sys.executable, "tools/bench_kernels.py", "--cpu-smoke", "--csv", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(out) as f:
        rows = list(csv.DictReader(f))
    assert {r["op"] for r in rows} == set(OPS)
    for row in rows:
        assert not row["error"], row
        assert float(row["fwd_ms"]) > 0 and float(row["fwd_bwd_ms"]) > 0
    assert {r["impl"] for r in rows} >= {"ours", "eager", "compile"}


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the benchmark runs for real")
def test_without_gpu_explains_and_exits_zero(capsys):
    assert main([]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out
