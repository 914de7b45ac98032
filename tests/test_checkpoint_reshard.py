"""Exact resume and resharding with one checkpoint saved at tp2 x pp2 x dp2 with the distributed optimizer.

- Exact resume: 5 steps straight vs 2 steps, save, a fresh process group loads, 2 steps: the
  losses of steps 3 and 4 are bit-identical; the same with dropout on.
- Resharding (weights and Adam state): the checkpoint is loaded at tp1 x pp1 (online), trains
  step 3 and saves; that is converted offline to tp4 x pp1, which is loaded as saved and
  resharded online to tp2 x pp2 x vpp2 and to dp4 with the distributed optimizer, each training
  steps 4 and 5. Every step's loss equals the original layout's (to 1e-5 relative: only the
  order of float sums differs).
- Both formats: the tp1 checkpoint is also converted offline to the torch format at tp2 x dp2
  with the distributed optimizer and back to torch_dist at tp1; every conversion holds the same
  tensors bit for bit, and the torch-format one trains steps 4 and 5 at tp2 x pp2 as well.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from helpers.checkpoint_steps import layout_config, train, train_jobs
from megatron_lite.checkpointing import read_checkpoint
from megatron_lite.checkpointing.pieces import boxes
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.spawn import run_on_ranks

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402


def test_exact_resume_and_reshard_round_trip(tmp_path: Path, capsys) -> None:
    saved, dropout_saved, single, offline = (str(tmp_path / name) for name in
                                             ("tp2pp2dp2", "dropout", "tp1pp1", "tp4pp1"))
    layout = Layout(tp=2, pp=2, dp=2, distopt=True)
    source, dropout = layout_config(layout=layout), layout_config(layout=layout, dropout=0.1)
    jobs = [(source, 5), (source, 2, None, saved), (dropout, 4), (dropout, 2, None, dropout_saved)]
    straight, first_half, dropout_straight, _ = run_on_ranks(train_jobs, layout.world_size, jobs)[0]
    assert first_half == straight[:2]
    resumed, dropout_resumed = run_on_ranks(train_jobs, layout.world_size,
                                            [(source, 2, saved), (dropout, 2, dropout_saved)])[0]
    assert resumed == straight[2:4]
    # Every rank draws its dropout masks from the RNG state its own file restored.
    assert dropout_resumed == dropout_straight[2:4] and dropout_straight[:4] != straight[:4]

    # One process: load at tp1 x pp1, train step 3 and save; the 4-rank layouts then train steps 4 and 5.
    # A step's loss depends on the weights only, the next one on the Adam state too.
    assert train(layout_config(), 1, saved, single)[0] == pytest.approx(straight[2], rel=1e-5)
    assert "> resharding checkpoint" in capsys.readouterr().out
    assert convert_checkpoint.main(["reshard", "--load", single, "--out", offline, "--tp", "4"]) == 0
    legacy, back = str(tmp_path / "torch_tp2dp2"), str(tmp_path / "back_tp1")
    assert convert_checkpoint.main(["reshard", "--load", single, "--out", legacy, "--tp", "2", "--dp", "2",
                                    "--use-distributed-optimizer", "--ckpt-format", "torch"]) == 0
    assert (Path(legacy) / "iter_0000003" / "mp_rank_01" / "distrib_optim_001.pt").exists()
    assert convert_checkpoint.main(["reshard", "--load", legacy, "--out", back]) == 0
    expected = read_checkpoint(single, 3)
    for converted in (offline, legacy, back):
        full = read_checkpoint(converted, 3)
        assert full.model.keys() == expected.model.keys() and full.optimizer.keys() == expected.optimizer.keys()
        assert all(torch.equal(full.model[k], expected.model[k]) for k in expected.model)
        assert all(torch.equal(full.optimizer[k][m], expected.optimizer[k][m])
                   for k in expected.optimizer for m in expected.optimizer[k])
    targets = [layout_config(layout=Layout(tp=4)), layout_config(layout=Layout(tp=2, pp=2, vpp=2)),
               layout_config(layout=Layout(dp=4, distopt=True))]
    jobs = [(c, 2, offline) for c in targets] + [(layout_config(layout=Layout(tp=2, pp=2)), 2, legacy)]
    for losses in run_on_ranks(train_jobs, 4, jobs)[0]:
        assert losses == pytest.approx(straight[3:], rel=1e-5)


@pytest.mark.parametrize("shape", [(7,), (3, 5), (2, 3, 4)])
def test_a_run_of_flat_elements_is_few_contiguous_boxes(shape: tuple[int, ...]) -> None:
    """pieces.boxes: every run [lo, hi) of a row-major tensor is covered exactly, in order, by boxes
    that are each contiguous (so each is a view of the run), at most 2 x dims + 1 of them."""
    numel = math.prod(shape)
    full = torch.arange(numel).view(shape)
    for lo in range(numel):
        for hi in range(lo + 1, numel + 1):
            found = boxes(shape, lo, hi)
            flat = [full[tuple(slice(o, o + s) for o, s in zip(at, sizes))].flatten() for at, sizes in found]
            assert torch.equal(torch.cat(flat), torch.arange(lo, hi)) and len(found) <= 2 * len(shape) + 1
            assert all(t[-1] - t[0] + 1 == t.numel() for t in flat)
