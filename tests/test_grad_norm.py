"""The global gradient norm and clipping of a sharded layout against torch.nn.utils.clip_grad_norm_
on the full grads: tp 2 + SP (norm weights replicated over tp), gpt2 at pp 2 (the tied
embedding held by the first and the last stage) and dp 2 with the distributed optimizer
(each rank holds the grads of its shard only). One spawn of 2 ranks runs all three.

Each layout's norm must equal, to 1e-6 relative, torch's norm of the same grads gathered to
full tensors (each parameter once), and torch's norm of the single-device model's grads on
the same batch; after clipping, the gathered grads must equal torch's clipped ones.
"""
from __future__ import annotations

import functools

import pytest
import torch

from helpers.parity import full_grads, merge_tensors, setup_rank
from helpers.tiny import tiny_config
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.optimizer.clip_grads import clip_grad_norm
from megatron_lite.training.loop import forward_backward, rank_microbatches

MAX_NORM = 0.1  # well below these norms: clipping scales every grad
LAYOUTS = {  # name: (family, layout)
    "tp2-sp": ("llama", Layout(tp=2, sp=True)),
    "gpt2-pp2": ("gpt2", Layout(pp=2)),
    "dp2-distopt": ("llama", Layout(dp=2, distopt=True)),
}


def norm_config(family: str, layout: Layout = Layout()):
    config = tiny_config(family, model=dict(num_layers=2), micro_batch_size=1, global_batch_size=4)
    config = config.updated(parallel={**layout.fields(), "ddp_bucket_size": 2000})
    return config


def grads_and_norm(config) -> dict:
    """Full grads before and after clipping, and the norm this layout reports."""
    model = setup_rank(config)
    batches = rank_microbatches(RandomTokens(config.model.vocab_size, config.model.seq_length), 0, config,
                                torch.device("cpu"))
    forward_backward(model, batches, config, torch.device("cpu"))
    before = full_grads(model)
    norm = clip_grad_norm(model.optimizer.grads_for_norm(), MAX_NORM, model.optimizer.norm_groups)
    return {"before": before, "norm": norm, "after": full_grads(model)}


def norm_worker() -> dict:
    return {name: grads_and_norm(norm_config(family, layout)) for name, (family, layout) in LAYOUTS.items()}


@functools.cache
def spawned() -> list[dict]:
    return run_on_ranks(norm_worker, 2)


def _torch_clip(grads: dict[str, torch.Tensor]) -> tuple[float, dict[str, torch.Tensor]]:
    """torch's total norm of these grads, and the grads it clips them to."""
    params = {}
    for name, grad in grads.items():
        params[name] = torch.zeros_like(grad, requires_grad=True)
        params[name].grad = grad.clone()
    norm = torch.nn.utils.clip_grad_norm_(list(params.values()), MAX_NORM).item()
    return norm, {name: p.grad for name, p in params.items()}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_global_grad_norm_and_clipping_match_torch(name: str) -> None:
    ranks = [r[name] for r in spawned()]
    assert ranks[0]["norm"] == ranks[1]["norm"]
    norm = ranks[0]["norm"]
    before, after = (merge_tensors([r[kind] for r in ranks]) for kind in ("before", "after"))
    expected_norm, expected_after = _torch_clip(before)
    assert norm == pytest.approx(expected_norm, rel=1e-6)
    for param, grad in after.items():
        torch.testing.assert_close(grad, expected_after[param], rtol=1e-5, atol=1e-9, msg=param)

    single = grads_and_norm(norm_config(LAYOUTS[name][0]))
    assert norm == pytest.approx(_torch_clip(single["before"])[0], rel=1e-6)
    assert single["norm"] == pytest.approx(_torch_clip(single["before"])[0], rel=1e-6)
