"""A checkpoint written before the rank grid, parameter placements and manifests existed still loads.

tests/fixtures/checkpoint_98c6fb5_tp2 was written by commit 98c6fb5 (tests/checkpoint_steps.train
at tp 2 with CONFIG below, saving after 2 of 4 steps, on 2 ranks); expected_losses.json holds that
code's 4 uninterrupted losses. Loaded as saved (tp 2) the run continues bit-identically; loaded at
tp 1 it is resharded and continues to 1e-5 (only the order of float sums differs).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from helpers.checkpoint_steps import train, train_jobs
from helpers.tiny import tiny_config
from megatron_lite.distributed.spawn import run_on_ranks

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "checkpoint_98c6fb5_tp2"


def config(tp: int):
    c = tiny_config("llama", model=dict(num_layers=2, hidden_size=16, num_attention_heads=4, num_query_groups=2),
                    micro_batch_size=1, global_batch_size=8, train_iters=4, clip_grad=0.5)
    return c.updated(parallel={"tensor_model_parallel_size": tp, "ddp_bucket_size": 3000})


def test_checkpoint_of_an_older_version_loads_and_continues(tmp_path: Path, capsys) -> None:
    expected = json.loads((FIXTURE / "expected_losses.json").read_text())["losses"]
    ckpt = shutil.copytree(FIXTURE, tmp_path / "ckpt")  # loading must not need to write, but never risk the fixture
    assert run_on_ranks(train_jobs, 2, [(config(2), 2, str(ckpt))])[0][0] == expected[2:]
    assert train(config(1), 2, str(ckpt)) == pytest.approx(expected[2:], rel=1e-5)
    assert "has no manifest (saved by an older version)" in capsys.readouterr().out
