"""--tensorboard-dir and --wandb-project: the event files hold metrics.jsonl's numbers under
Megatron's tags at the logged steps, wandb gets the same, and a missing package is refused
in one line before any work."""
from __future__ import annotations

import json
import sys
import types
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain_gpt
from helpers.tiny import TINY_FLAGS
from megatron_lite.config import ConfigError
from megatron_lite.training.arguments import parse_args

# Tag -> metrics.jsonl field of a dense run on CPU (no MFU without a known peak).
DENSE_TAGS = {"lm loss": "lm_loss", "learning-rate": "lr", "grad-norm": "grad_norm", "loss-scale": "loss_scale",
              "skipped-iterations": "skipped_iterations", "tokens-per-second": "tokens_per_s",
              "throughput": "tflops_per_gpu", "peak-memory-gb": "peak_memory_gb",
              "consumed-samples": "consumed_samples", "batch-size": "global_batch_size"}
VALIDATION_TAGS = {"lm loss validation": "lm_loss", "lm loss validation ppl": "lm_loss_ppl"}


def _records(log_dir: Path, kind: str) -> dict[int, dict]:
    lines = (log_dir / "metrics.jsonl").read_text().splitlines()
    return {r["iteration"]: r for r in map(json.loads, lines) if r["kind"] == kind}


def _events(tb_dir: Path) -> dict[str, dict[int, float]]:
    """Tag -> {step: value} of every scalar in the event files, as TensorBoard reads them."""
    events = EventAccumulator(str(tb_dir))
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def test_event_files_hold_the_logged_scalars_at_the_interval(tmp_path: Path) -> None:
    flags = ["--train-iters", "4", "--log-interval", "1", "--tensorboard-log-interval", "2", "--eval-interval", "3",
             "--eval-iters", "1", "--log-dir", str(tmp_path), "--tensorboard-dir", str(tmp_path / "tb")]
    assert pretrain_gpt.main(TINY_FLAGS + flags) == 0
    train, valid = _records(tmp_path, "train"), _records(tmp_path, "validation")
    assert sorted(train) == [1, 2, 3, 4] and sorted(valid) == [3, 4]
    events = _events(tmp_path / "tb")
    assert set(events) == {*DENSE_TAGS, "iteration-time", *VALIDATION_TAGS}
    # Training scalars only at multiples of --tensorboard-log-interval; validation whenever it ran.
    for tag, field in DENSE_TAGS.items():
        assert events[tag] == {i: pytest.approx(train[i][field], rel=1e-6) for i in (2, 4)}, tag
    assert events["iteration-time"] == {i: pytest.approx(train[i]["elapsed_ms"] / 1e3, rel=1e-6) for i in (2, 4)}
    for tag, field in VALIDATION_TAGS.items():
        assert events[tag] == {i: pytest.approx(valid[i][field], rel=1e-6) for i in (3, 4)}, tag


class _FakeWandbRun:
    def __init__(self, **init_kwargs) -> None:
        self.init_kwargs, self.logged, self.finished = init_kwargs, {}, False

    def log(self, data: dict, step: int) -> None:
        self.logged.setdefault(step, {}).update(data)

    def finish(self) -> None:
        self.finished = True


def test_moe_run_per_expert_scalars_and_wandb_gets_the_same(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[_FakeWandbRun] = []

    def init(**kwargs) -> _FakeWandbRun:
        runs.append(_FakeWandbRun(**kwargs))
        return runs[-1]

    monkeypatch.setitem(sys.modules, "wandb", types.SimpleNamespace(init=init))  # wandb is not a dependency
    flags = ["--num-experts", "4", "--moe-router-topk", "2", "--train-iters", "2", "--log-interval", "1",
             "--eval-interval", "2", "--eval-iters", "1", "--log-dir", str(tmp_path),
             "--tensorboard-dir", str(tmp_path / "tb"), "--wandb-project", "tiny-moe", "--wandb-exp-name", "test",
             "--wandb-save-dir", str(tmp_path / "wandb")]
    assert pretrain_gpt.main(TINY_FLAGS + flags) == 0
    train = _records(tmp_path, "train")
    events = _events(tmp_path / "tb")
    for i in (1, 2):
        assert events["load_balancing_loss"][i] == pytest.approx(train[i]["load_balancing_loss"], rel=1e-6)
        assert events["expert_load_max_over_mean"][i] == pytest.approx(train[i]["expert_load_max_over_mean"], rel=1e-6)
        loads = train[i]["tokens_per_expert"]
        assert len(loads) == 2 and len(loads[0]) == 4  # both layers are MoE layers of 4 experts
        assert {(layer, e): events[f"moe/tokens_per_expert_layer_{layer}/expert_{e}"][i]
                for layer in range(2) for e in range(4)} == {(layer, e): loads[layer][e]
                                                             for layer in range(2) for e in range(4)}
    [run] = runs
    assert (run.init_kwargs["project"], run.init_kwargs["name"]) == ("tiny-moe", "test")
    assert run.init_kwargs["dir"] == str(tmp_path / "wandb") and run.init_kwargs["config"]["model"]["num_experts"] == 4
    assert run.finished
    # wandb receives exactly the event files' scalars (those in float32) at the same steps.
    by_step: dict[int, dict[str, float]] = {}
    for tag, values in events.items():
        for step, value in values.items():
            by_step.setdefault(step, {})[tag] = value
    assert {s: set(d) for s, d in run.logged.items()} == {s: set(d) for s, d in by_step.items()}
    assert run.logged == {s: pytest.approx(d, rel=1e-6) for s, d in by_step.items()}


@pytest.mark.parametrize("module, flag, package, install", [
    ("torch.utils.tensorboard", "--tensorboard-dir", "tensorboard",
     'pip install tensorboard (or pip install -e ".[tensorboard]")'),
    ("wandb", "--wandb-project", "wandb", "pip install wandb"),
])
def test_missing_package_is_refused_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture,
                                                    monkeypatch: pytest.MonkeyPatch, module: str, flag: str,
                                                    package: str, install: str) -> None:
    monkeypatch.setitem(sys.modules, module, None)  # `import module` fails, as when it is not installed
    target = str(tmp_path / "out")
    assert pretrain_gpt.main(TINY_FLAGS + ["--log-dir", target, flag, target]) == 2
    out, err = capsys.readouterr()
    [line] = err.splitlines()
    assert line.startswith(f"pretrain_gpt.py: error: {flag}={target} needs the {package} package, which cannot be "
                           "imported (")
    assert line.endswith(f"); install it: {install}")
    assert out == "" and not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags, message", [
    (["--tensorboard-log-interval", "0"], "--tensorboard-log-interval=0 must be a positive number"),
    (["--wandb-exp-name", "run"], "--wandb-exp-name and --wandb-save-dir go with --wandb-project; add it or drop them"),
    (["--tensorboard-dir", __file__], f"--tensorboard-dir={__file__} is a file, not a directory"),
])
def test_bad_writer_flags(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError) as error:
        parse_args(TINY_FLAGS + flags)
    assert str(error.value) == message


def test_megatron_logging_flags_and_worker_processes(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """--log-throughput adds Megatron's throughput field to the log line; --log-timers-to-tensorboard writes the
    step's phases under Megatron's timer tags; --num-workers 2 reads the samples in worker processes, through a
    batch ramp, and trains on the same batches (the same losses, bit for bit) as reading them in process."""
    ramp = ["--micro-batch-size", "1", "--global-batch-size", "4", "--rampup-batch-size", "2", "2", "4",
            "--train-samples", "14", "--log-interval", "1", "--eval-interval", "0"]
    flags = [*TINY_FLAGS, *ramp, "--log-dir", str(tmp_path / "plain")]
    assert pretrain_gpt.main(flags) == 0
    plain = capsys.readouterr().out
    assert pretrain_gpt.main([*TINY_FLAGS, *ramp, "--log-dir", str(tmp_path / "megatron"), "--log-throughput",
                              "--log-timers-to-tensorboard", "--num-workers", "2",
                              "--tensorboard-dir", str(tmp_path / "tb")]) == 0
    logged = capsys.readouterr().out
    lines = [line for line in logged.splitlines() if line.startswith(" iteration")]
    assert len(lines) == 4 and all(" | throughput per GPU (TFLOP/s/GPU): " in line for line in lines)
    assert "throughput per GPU" not in plain and "accepted, no effect here" not in logged
    train, plain_train = _records(tmp_path / "megatron", "train"), _records(tmp_path / "plain", "train")
    assert [train[i]["lm_loss"] for i in train] == [plain_train[i]["lm_loss"] for i in plain_train]
    events = _events(tmp_path / "tb")
    for tag in ("batch-generator-time", "forward-backward-time", "optimizer-time"):
        assert events[tag] == {i: pytest.approx(train[i]["timers"][tag]) for i in train} and \
            all(seconds > 0 for seconds in events[tag].values()), tag
