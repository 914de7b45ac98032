"""Every script in examples/ runs, in a reduced form: the same script, its flags overridden to a
tiny model on 2 CPU ranks; each recipe as written passes a dry run at its own size; and the layouts
the recipes name are still the planner's first choice."""
from __future__ import annotations

import json
import os
import re
import socket
import stat
import sys
from pathlib import Path

import pytest

from helpers.commands import ROOT, run_command

sys.path.insert(0, str(ROOT / "tools"))
import plan_parallelism  # noqa: E402

EXAMPLES = ROOT / "examples"
TINY = ["--model", "tiny", "--num-layers", "2", "--hidden-size", "32", "--seq-length", "32", "--micro-batch-size", "1",
        "--global-batch-size", "4", "--train-iters", "2", "--log-interval", "1", "--eval-interval", "2",
        "--eval-iters", "1", "--save-interval", "2", "--device", "cpu"]
LOG_LINE = re.compile(r"iteration +(\d+)/ +2 \| consumed samples: +(\d+) \|.* lm loss: ([0-9.E+-]+) \|")


def _env(**extra: str) -> dict[str, str]:
    # torchrun is installed beside the interpreter that runs the tests.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"
    return {**os.environ, "PATH": path, "PRECISION": "fp32", **extra}


def _trained(result, checkpoint_dir: Path) -> None:
    assert result.returncode == 0, result.stderr[-3000:]
    assert [m.group(1, 2) for m in map(LOG_LINE.search, result.stdout.splitlines()) if m] == [("1", "4"), ("2", "8")]
    assert (checkpoint_dir / "latest_checkpointed_iteration.txt").read_text().strip() == "2"
    assert list((checkpoint_dir / "tensorboard").glob("events.out.tfevents.*"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text("#!/usr/bin/env bash\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IEXEC)


def _slurm_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """An allocation on this host: srun starts the command it is given, scontrol names localhost."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    _stub(bin_dir, "scontrol", '[[ "$1 $2 $3" == "show hostnames localhost" ]] && echo localhost\n')
    _stub(bin_dir, "srun", 'while [[ "$1" == --* ]]; do shift; done\nexec "$@"\n')  # its options, then the command
    env = _env(SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID="7", SLURM_SUBMIT_DIR=str(ROOT), **extra)
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def test_slurm_script_on_a_one_node_allocation(tmp_path: Path) -> None:
    """The sbatch script as Slurm runs it on one node: srun starts the script's torchrun once, and
    the rendezvous is at the host scontrol names first."""
    env = _slurm_env(tmp_path, SLURM_NNODES="1", GPUS_PER_NODE="2", MASTER_PORT=str(_free_port()),
                     CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    # The script's layout over 2 ranks: its pipeline of 4 stages becomes 2, context parallelism off.
    result = run_command(["bash", str(EXAMPLES / "slurm_pretrain_gpt.sh"), *TINY, "--cp", "1", "--pp", "2",
                          "--num-layers", "4"], env=env, timeout=180)
    _trained(result, tmp_path / "ckpt")
    assert "> layout: pp2-vpp2-zbv-distopt on world 2, zbv schedule over 2 chunks per rank" in result.stdout


def test_llama_1b_recipe_on_two_ranks(tmp_path: Path) -> None:
    result = run_command(["bash", str(EXAMPLES / "llama_1b_8gpu.sh"), *TINY],
                         env=_env(NPROC_PER_NODE="2", CHECKPOINT_DIR=str(tmp_path / "ckpt")), timeout=180)
    _trained(result, tmp_path / "ckpt")
    assert "> layout: dp2-zero3 on world 2" in result.stdout


@pytest.mark.parametrize("script, flags, layout", [
    ("llama_1b_8gpu.sh", ["--model", "llama-1b", "--num-gpus", "8", "--global-batch-size", "256"],
     "dp8-zero3 mbs8 recompute=none"),
    ("slurm_pretrain_gpt.sh", ["--model", "llama-8b", "--num-gpus", "16", "--global-batch-size", "512"],
     "cp4-pp4-vpp2-zbv-distopt mbs4 recompute=none"),
])
def test_recipes_use_the_planners_first_layout(capsys: pytest.CaptureFixture, script: str, flags: list[str],
                                               layout: str) -> None:
    assert plan_parallelism.main(["--gpu", "H100", "--top", "1", "--json", *flags]) == 0
    assert json.loads(capsys.readouterr().out)["layouts"][0]["layout"] == layout
    text = (EXAMPLES / script).read_text()
    # The planner command the script quotes is the one run here, and its flags spell the layout.
    assert " ".join(flags[:2]) in text and f"--num-gpus {flags[3]} --global-batch-size {flags[5]}" in text
    spelled = {"dp8-zero3 mbs8 recompute=none":
                   "--data-parallel-sharding-strategy optim_grads_params --micro-batch-size 8 --global-batch-size 256",
               "cp4-pp4-vpp2-zbv-distopt mbs4 recompute=none":
                   "--cp 4 --pp 4 --vpp 2 --pipeline-schedule zbv --use-distributed-optimizer \\\n"
                   "    --micro-batch-size 4 --global-batch-size 512"}
    assert spelled[layout] in text


@pytest.mark.parametrize("script, world", [("llama_1b_8gpu.sh", 8), ("slurm_pretrain_gpt.sh", 16)])
def test_recipes_as_written_pass_a_dry_run(tmp_path: Path, script: str, world: int) -> None:
    """Each recipe's own flags (preset, batch sizes, layout, bf16) at its own size, 8 GPUs or 2 nodes
    of 8, are a run pretrain_gpt.py accepts: torchrun is a stand-in that dry-runs the command it is
    given for the world its --nnodes and --nproc-per-node make."""
    env = _slurm_env(tmp_path, SLURM_NNODES="2", PRECISION="bf16", CHECKPOINT_DIR=str(tmp_path / "ckpt"))
    _stub(tmp_path / "bin", "torchrun", "nodes=1; nproc=1\n"
          'while [[ "$1" == --* ]]; do\n'
          '  case "$1" in --nnodes) nodes=$2; shift 2;; --nproc-per-node) nproc=$2; shift 2;;\n'
          "    --standalone) shift;; *) shift 2;; esac\n"
          "done\n"
          f'exec {sys.executable} "$@" --dry-run --world-size $((nodes * nproc))\n')
    result = run_command(["bash", str(EXAMPLES / script)], env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"> dry run: the configuration is valid for world size {world};" in result.stdout


def test_strategy_comparison_on_cpu_ranks() -> None:
    result = run_command(["bash", str(EXAMPLES / "compare_strategies.sh"), "--layouts", "single", "dp2", "tp2", "pp2",
                          "--num-layers", "2", "--hidden-size", "32", "--steps", "2"], timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    rows = {line.split()[0]: line.split() for line in result.stdout.splitlines()[1:]}
    assert list(rows) == ["single", "dp2", "tp2", "pp2"]
    weights = {name: float(row[2]) for name, row in rows.items()}
    # The same model: dp keeps all of it on every rank, tp and pp about half.
    assert weights["dp2"] == weights["single"] and weights["tp2"] < 0.6 * weights["single"]
    assert weights["pp2"] < 0.6 * weights["single"]
    # Same losses in every layout, and the planner's numbers match the measured ones.
    assert len({row[11] for row in rows.values()}) == 1
    assert all("state+traffic exact" in " ".join(row) for row in rows.values())
