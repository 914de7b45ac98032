"""Every command README.md, docs/*.md, BENCHMARKS.md and examples/ show runs as written, on CPU.

The commands are taken from the text (fenced bash blocks; in the example scripts, the commands
their comments quote) and run in one scratch directory, in the documents' order, so a command
finds what an earlier one made (README trains checkpoints/tiny, which checkpoints.md converts).
The test only adds an override: pretrain_gpt.py gets `--dry-run --world-size N` (N: torchrun's
ranks), or `--train-iters 2` where a later command reads what it writes; a tool that needs a GPU
or takes minutes gets `--help`. What needs a GPU, a download or something else that cannot run
here is named in the tables below, with why, and is still checked as far as it can be."""
from __future__ import annotations

import importlib
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest
import tomllib

import pretrain_gpt
from helpers.commands import ROOT

DOCUMENTS = ["README.md", "docs/data.md", "docs/checkpoints.md", "docs/metrics.md", "docs/parallelism.md",
             "docs/moe.md", "docs/mtp.md", "docs/planner.md", "docs/multinode.md", "docs/kernels.md",
             "docs/precision.md", "docs/testing.md", "docs/optimizers.md", "BENCHMARKS.md",
             "examples/README.md"]
SCRIPTS = sorted(p.relative_to(ROOT).as_posix() for p in (ROOT / "examples").glob("*.sh"))

# Tools that need a GPU: run with --help (the tool imports and parses on CPU), each with why.
GPU_TOOLS = {
    "tools/gpu_report.py": "runs the GPU tests and benchmarks: CUDA",
    "tools/bench_kernels.py": "times the Triton kernels compiled for a GPU",
    "tools/benchmark_training.py": "times training steps on a GPU",
    "tools/bench_context_parallel.py": "--device cuda",
    "tools/bench_moe.py": "--device cuda",
}
# Tools that take minutes on CPU: run with --help too, each with why.
SLOW_TOOLS = {
    "tools/bench_state_memory.py": "builds, trains, saves and converts models of 12 and 24 layers in a dozen processes",
}
# Commands that fetch from the Hugging Face Hub, by what they fetch: the test checks the code
# compiles or the CLI exists, and puts a stand-in where the download would land.
DOWNLOADS = {
    "Qwen/Qwen2.5-0.5B": "README's tiny model exported to Hugging Face, with Qwen's context",
    "openai-community/gpt2": "the tiny export's tokenizer",
    "roneneldan/TinyStories": "corpus/docs.jsonl saved as a `datasets` folder",
}
# Commands that run elsewhere or cannot finish here, and what is checked instead.
ELSEWHERE = {
    "pip": "installs: the extras it names exist in pyproject.toml",
    "python -m pytest": "runs tests: the files it names exist (the whole suite is CI's, tests/test_readme.py)",
    "tensorboard": "starts a server: the package is installed",
    "python -c import torch, triton": "asks CUDA for the device's name: GPU only, compiled",
    "bash": "tests/test_examples.py runs the example scripts on CPU ranks",
    "sbatch": "tests/test_examples.py runs the Slurm script with a stub srun",
}
# Tools that train on CPU ranks: run as written plus a tiny-model, one-step override.
TOOL_OVERRIDES = {"tools/compare_parallelism.py": ["--steps", "1", "--num-layers", "4", "--hidden-size", "32"]}
# pretrain_gpt.py commands whose output a later command reads: trained for real, 2 iterations.
TRAINED = ("--save checkpoints/tiny", "--log-dir runs/")
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)


def document_commands(path: str) -> list[str]:
    text = (ROOT / path).read_text()
    if path.endswith(".sh"):
        lines = [m.group(1) for m in re.finditer(r"^#\s+((?:python|torchrun|bash|sbatch) .*)$", text, re.M)]
    else:
        blocks = [body for lang, body in FENCE.findall(text) if lang in ("bash", "sh")]
        lines = "\n".join(blocks).replace("\\\n", " ").splitlines()
    commands = []
    for line in lines:
        words = shlex.split(line, comments=True)
        if "|" in words:  # `... | tee file`: the command is what feeds the pipe
            words = words[:words.index("|")]
        while words and re.fullmatch(r"[A-Z_]+=\S*", words[0]):  # PYTHONPATH=. and the like
            words = words[1:]
        command = []
        for word in [*words, "&&"]:
            if word == "&&":
                commands.append(command) if command else None
                command = []
            else:
                command.append(word)
    return [shlex.join(c) for c in commands]


def test_commands_are_only_in_fenced_blocks() -> None:
    """A command in an indented code block would escape this test."""
    for path in DOCUMENTS:
        text = FENCE.sub("", (ROOT / path).read_text())
        assert not re.search(r"^ {4,}(python|torchrun) ", text, re.M), f"{path}: a command outside a ```bash block"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("docs")


def _tool(name: str, argv: list[str]) -> int:
    module = importlib.import_module(f"tools.{Path(name).stem}")
    try:
        result = module.main(argv)
    except SystemExit as exc:  # argparse's --help and errors
        return exc.code or 0
    return result if isinstance(result, int) else 0


def _pretrain(words: list[str], world: int) -> int:
    args = words[words.index("pretrain_gpt.py") + 1:]
    if "--dry-run" in args:
        return pretrain_gpt.main(args)
    if world == 1 and any(marker in " ".join(args) for marker in TRAINED):
        return pretrain_gpt.main([*args, "--train-iters", "2", "--eval-iters", "1"])
    return pretrain_gpt.main([*args, "--dry-run", "--world-size", str(world)])


def _torchrun_world(words: list[str]) -> int:
    def value(flag: str) -> int:
        return int(words[words.index(flag) + 1]) if flag in words else 1
    return value("--nproc-per-node") * value("--nnodes")


def _stand_in(what: str, workdir: Path) -> None:
    if what == "Qwen/Qwen2.5-0.5B":
        shutil.copytree(workdir / "hf/tiny", workdir / "Qwen2.5-0.5B")
        config = (workdir / "Qwen2.5-0.5B/config.json")
        config.write_text(re.sub(r'"max_position_embeddings": \d+', '"max_position_embeddings": 32768',
                                 config.read_text()))
    elif what == "openai-community/gpt2":
        shutil.copytree(workdir / "hf/tiny", workdir / "gpt2-tokenizer",
                        ignore=shutil.ignore_patterns("*.safetensors", "config.json"))
    else:
        from datasets import load_dataset
        load_dataset("json", data_files=str(workdir / "corpus/docs.jsonl"), split="train").save_to_disk(
            str(workdir / "corpus_tinystories"))


def run_command(command: str, workdir: Path) -> str | None:
    """Run one documented command; None if it ran, else what went wrong."""
    words = shlex.split(command)
    download = next((what for what in DOWNLOADS if what in command), None)
    if download:
        if words[0] == "hf":
            assert shutil.which("hf"), "the hf CLI (huggingface_hub, a dependency of transformers) is missing"
        else:
            compile(words[2], "<doc>", "exec")
        _stand_in(download, workdir)
        return None
    if words[0] == "pip":
        extras = {e for w in words if (m := re.fullmatch(r'(?:\.|-e)?\.?\[([\w,]+)\]', w.strip('"')))
                  for e in m.group(1).split(",")}
        known = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
        return f"unknown extras {extras - set(known)}" if extras - set(known) else None
    if words[:3] == ["python", "-m", "pytest"]:
        named = [w for w in words[3:] if w.startswith("tests/")]
        missing = [w for w in named if not list(ROOT.glob(w))]
        return f"no such test files {missing}" if missing else None
    if words[0] == "tensorboard":
        importlib.import_module("tensorboard")
        return None
    if words[0] in ("bash", "sbatch"):
        return None if (ROOT / words[-1]).exists() or any((ROOT / w).exists() for w in words) else "no such script"
    if words[0] == "mkdir":
        os.makedirs(workdir / words[-1], exist_ok=True)
        return None
    if words[:2] == ["python", "-c"]:
        if "torch.cuda" in words[2]:
            compile(words[2], "<doc>", "exec")
            return None
        result = subprocess.run([sys.executable, "-c", words[2]], cwd=workdir, capture_output=True, text=True)
        return None if result.returncode == 0 else result.stderr[-2000:]
    if words[0] == "torchrun":
        code = _pretrain(words, _torchrun_world(words))
    elif words[:2] == ["python", "pretrain_gpt.py"]:
        code = _pretrain(words, 1)
    elif words[0] == "python" and words[1].startswith("tools/"):
        argv = [os.path.expandvars(w) for w in words[2:]]
        help_only = words[1] in GPU_TOOLS or words[1] in SLOW_TOOLS
        code = _tool(words[1], ["--help"] if help_only else argv + TOOL_OVERRIDES.get(words[1], []))
    else:
        return f"no rule runs {words[0]!r}: add one, or name it in a table"
    return None if code == 0 else f"exit status {code}"


def test_every_documented_command_runs(workdir: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    monkeypatch.chdir(workdir)
    # Spawned ranks import megatron_lite in a fork server started from here, outside the checkout:
    # this checkout's package, not whichever one an editable install elsewhere maps the name to.
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("STD", sysconfig.get_paths()["stdlib"])  # what data.md's throughput table defines
    for name in ("WORLD_SIZE", "RANK"):
        monkeypatch.delenv(name, raising=False)
    failures, ran, seen = [], 0, set()
    for path in DOCUMENTS + SCRIPTS:
        for command in document_commands(path):
            if command in seen:  # the same words in two documents (README's planner line): run once
                ran += 1
                continue
            seen.add(command)
            try:
                problem = run_command(command, workdir)
            except Exception as exc:  # a tool's own error, not turned into an exit status
                problem = f"{type(exc).__name__}: {exc}"
            ran += 1
            if problem:
                failures.append(f"{path}: {command}\n    {problem}\n    {capsys.readouterr().err[-1500:]}")
            capsys.readouterr()
    assert ran > 60
    assert not failures, "\n".join(failures)
