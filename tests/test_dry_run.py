"""pretrain_gpt.py --dry-run: the whole configuration checked for a world size it is not run on,
described by the planner's formulas, with no process group, model or data."""
from __future__ import annotations

import pytest

import pretrain_gpt
from megatron_lite import parallel_state
from megatron_lite.config import ConfigError
from megatron_lite.planner.memory import RankCoords, activation_memory, state_memory
from megatron_lite.training.arguments import parse_args, parse_run

MB = 2**20


@pytest.fixture(autouse=True)
def _nothing_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """A dry run that started training (which builds the model and reads data) or a process group fails here."""
    def refuse(*args, **kwargs):
        raise AssertionError("a dry run started training or a process group")
    monkeypatch.setattr(pretrain_gpt, "pretrain", refuse)
    monkeypatch.setattr(parallel_state, "initialize_model_parallel", refuse)
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.delenv("RANK", raising=False)


def _dry_run(capsys: pytest.CaptureFixture, argv: list[str]) -> tuple[int, list[str], str]:
    code = pretrain_gpt.main(argv)
    out, err = capsys.readouterr()
    return code, out.splitlines(), err


def test_dry_run_reports_layout_memory_and_prediction(capsys: pytest.CaptureFixture) -> None:
    argv = ["--model", "tiny", "--tp", "2", "--pp", "2", "--sp", "--use-distributed-optimizer"]
    code, lines, err = _dry_run(capsys, [*argv, "--dry-run", "--world-size", "8", "--gpu", "h100"])
    assert code == 0 and err == ""
    assert lines[0] == "> dry run: the configuration is valid for world size 8; nothing was built or read"
    assert lines[1].startswith("> layout: tp2-pp2-dp2-sp-distopt on world 8, 1f1b schedule; tp groups [[0, 1],")
    assert lines[2].startswith("> model: llama family, 4 layers, hidden 128, ")
    # One memory line per pipeline stage, the planner's numbers for a rank of that stage.
    config = parse_args(argv, world_size=8).updated(model={"vocab_size": 258})
    for pp_rank, line in enumerate(lines[3:5]):
        total = sum(state_memory(config, RankCoords(pp=pp_rank)).values()) + activation_memory(config, pp_rank)
        assert line.startswith(f"> memory per rank of pipeline stage {pp_rank} (planner, MB): weights ")
        assert line.endswith(f" = {total / MB:.2f}")
    assert lines[5].startswith("> planner: a step sends (MB, logical volume) ") and "tp " in lines[5]
    assert lines[6].startswith("> planner on 8 x H100 SXM: step ") and lines[6].endswith(": fits")
    assert lines[7] == ("> training: 200 iterations of global batch 16 x 128 tokens, micro batch 8 x 1 microbatches "
                        "x dp 2, in float32")


def test_dry_run_takes_torchruns_world_size_and_reports_on_rank_0_only(capsys: pytest.CaptureFixture,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "1")
    assert _dry_run(capsys, ["--tp", "2", "--dry-run"]) == (0, [], "")
    monkeypatch.setenv("RANK", "0")
    assert "> layout: tp2-dp2 on world 4" in _dry_run(capsys, ["--tp", "2", "--dry-run"])[1][1]


@pytest.mark.parametrize("argv, message", [
    # The same refusals as a real run on that many ranks: batch, world, experts.
    (["--model", "llama-1b", "--dry-run", "--world-size", "8"],
     "--global-batch-size=16 is not divisible by --micro-batch-size=8 x data-parallel size 8"),
    (["--tp", "2", "--dry-run", "--world-size", "3"], "world size 3 is not divisible by tensor-model-parallel size 2"),
    (["--model", "tiny-moe", "--ep", "4", "--micro-batch-size", "2", "--dry-run", "--world-size", "2"],
     "--expert-model-parallel-size=4 does not divide tp x dp x cp = 1 x 2 x 1"),
    (["--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", "no/such/tokenizer.json", "--data-path", "d",
      "--dry-run"],
     "--tokenizer-model no/such/tokenizer.json for HuggingFaceTokenizer does not exist"),
    (["--world-size", "8"], "--world-size is only for --dry-run"),
    (["--gpu", "H100"], "--gpu is only for --dry-run"),
    (["--dry-run", "--world-size", "0"], "--world-size=0 must be at least 1"),
])
def test_bad_input_is_refused_in_one_line(capsys: pytest.CaptureFixture, argv: list[str], message: str) -> None:
    code, lines, err = _dry_run(capsys, argv)
    assert code == 2 and lines == []
    assert err.startswith(f"pretrain_gpt.py: error: {message}") and err.count("\n") == 1


def test_launch_flags_belong_to_pretrain_gpt_only() -> None:
    with pytest.raises(ConfigError, match="--dry-run is pretrain_gpt.py's"):
        parse_args(["--dry-run"])
    launch, config = parse_run(["--tp", "2", "--dry-run", "--world-size", "4"])
    assert (launch.dry_run, launch.world_size, launch.gpu) == (True, 4, None)
    assert config.parallel.data_parallel_size == 2
