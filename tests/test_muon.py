"""--optimizer muon: the single-device update against a plain Muon written here (Newton-Schulz on
each full logical matrix), every layout against one device (weights after 3 steps, fp32, CPU),
resuming bit-identically, resharding its state, and the flags it refuses.

Two spawns: world 2 (tp 2, dp 2 with the distributed optimizer, ZeRO-3, ep 2, cp 2, pp 2 x vpp 2,
and the resume jobs), world 4 (tp 2 x pp 2).
"""
from __future__ import annotations

import functools
import math

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from helpers.checkpoint_steps import train, train_jobs
from helpers.parity import assert_parity, full_grads, merge_ranks, run_steps, setup_rank
from helpers.tiny import tiny_config
from megatron_lite.config import MUON_COEFFICIENTS, ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.planner.flops import newton_schulz_flops
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import rank_microbatches, train_step

VOCAB = 258
STEPS = 3
MOE = dict(num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32)
CASES = [  # (layout, experts)
    (Layout(tp=2, sp=True), False), (Layout(dp=2, distopt=True), False), (Layout(dp=2, zero=3), False),
    (Layout(dp=2, ep=2), True), (Layout(cp=2), False), (Layout(pp=2, vpp=2), False),
    (Layout(tp=2, pp=2, sp=True), False),
]
RESUME = Layout(dp=2, distopt=True)


def muon_config(layout: Layout = Layout(), experts: bool = False, **train_fields):
    """4 llama layers (GQA: 8 heads, 4 groups; SwiGLU), Nesterov Muon, buckets that cut parameters."""
    config = tiny_config("llama", model=dict(num_layers=4, num_attention_heads=8, num_query_groups=4,
                                             vocab_size=VOCAB, **(MOE if experts else {})),
                         **{**dict(micro_batch_size=1, global_batch_size=8, train_iters=6, clip_grad=0.5,
                                   optimizer="muon", muon_use_nesterov=True), **train_fields})
    return config.updated(parallel={**layout.fields(), "ddp_bucket_size": 3000})


def muon_worker(world: int, resume_dir: str | None) -> dict:
    results = {layout: run_steps(muon_config(layout, experts), STEPS)
               for layout, experts in CASES if layout.world_size == world}
    if resume_dir is not None:
        config = muon_config(RESUME)
        results["resume"] = train_jobs([(config, 4), (config, 2, None, resume_dir), (config, 2, resume_dir)])
    return results


@functools.cache
def spawned(world: int, resume_dir: str | None = None) -> list[dict]:
    return run_on_ranks(muon_worker, world, world, resume_dir)


@functools.cache
def reference(experts: bool) -> dict:
    return run_steps(muon_config(experts=experts), STEPS)


@pytest.fixture(scope="module")
def world2(tmp_path_factory) -> tuple[list[dict], str]:
    saved = str(tmp_path_factory.mktemp("muon") / "dp2")
    return spawned(2, saved), saved


# --- the single-device update against a plain Muon -------------------------------------------

def plain_newton_schulz(matrix: torch.Tensor, steps: int, coefficients) -> torch.Tensor:
    x = matrix / (matrix.norm() + 1e-7)
    tall = x.shape[0] > x.shape[1]
    if tall:
        x = x.T
    for i in range(steps):
        a, b, c = coefficients[i % len(coefficients)]
        gram = x @ x.T
        x = a * x + (b * gram + c * gram @ gram) @ x
    return x.T if tall else x


def plain_muon_update(name: str, update: torch.Tensor, config) -> torch.Tensor:
    """The scaled orthogonalised update of one full weight, split into its logical matrices by hand."""
    model, cfg = config.model, config.train
    coefficients = MUON_COEFFICIENTS[cfg.muon_coefficient_type]

    def orth(m: torch.Tensor) -> torch.Tensor:
        rows, cols = m.shape
        scale = {"spectral": math.sqrt(max(rows, cols)), "unit_rms_norm": math.sqrt(rows / cols),
                 "shape_scaling": math.sqrt(max(1, rows / cols))}[cfg.muon_scale_mode]
        return plain_newton_schulz(m, cfg.muon_num_ns_steps, coefficients) * scale * cfg.muon_extra_scale_factor

    if name.endswith("linear_qkv.weight") and cfg.muon_split_qkv:
        groups, per_group, head = model.num_query_groups, model.num_attention_heads // model.num_query_groups, \
            model.head_dim
        rows = update.view(groups, per_group + 2, head, -1)
        q, k, v = (orth(part.reshape(-1, update.shape[1])) for part in
                   (rows[:, :per_group], rows[:, per_group], rows[:, per_group + 1]))
        return torch.cat([q.view(groups, per_group, head, -1), k.view(groups, 1, head, -1),
                          v.view(groups, 1, head, -1)], dim=1).view_as(update)
    if name.endswith("linear_fc1.weight"):
        gate, up = update.chunk(2)
        return torch.cat([orth(gate), orth(up)])
    return orth(update)


def plain_training(config, steps: int) -> tuple[dict, dict]:
    """The weights after `steps` steps of our Muon and of the plain one applied to the same grads."""
    model = setup_rank(config)
    params = dict(model.chunks[0].named_parameters())
    plain = {n: p.detach().clone() for n, p in params.items()}
    matrices = [n for n, p in params.items() if p.ndim == 2 and "embeddings" not in n and "output_layer" not in n]
    adam_tensors = {n: w.clone().requires_grad_() for n, w in plain.items() if n not in matrices}
    adam = torch.optim.AdamW([{"params": [t for n, t in adam_tensors.items() if t.ndim > 1],
                               "weight_decay": config.train.weight_decay},
                              {"params": [t for t in adam_tensors.values() if t.ndim == 1], "weight_decay": 0.0}],
                             lr=config.train.lr, betas=(config.train.adam_beta1, config.train.adam_beta2),
                             eps=config.train.adam_eps, foreach=False)
    momentum = {n: torch.zeros_like(plain[n]) for n in matrices}
    beta, lr, wd = config.train.muon_momentum, config.train.lr, config.train.weight_decay
    dataset = RandomTokens(VOCAB, config.model.seq_length)
    for iteration in range(1, steps + 1):
        grads = {}
        batches = rank_microbatches(dataset, (iteration - 1) * config.train.global_batch_size, config,
                                    torch.device("cpu"))
        train_step(model, batches, iteration, config, torch.device("cpu"),
                   inspect_grads=lambda m: grads.update(full_grads(m)))
        for n in matrices:
            momentum[n] = beta * momentum[n] + (1 - beta) * grads[n]
            update = (1 - beta) * grads[n] + beta * momentum[n] if config.train.muon_use_nesterov else momentum[n]
            plain[n] = plain[n] * (1 - lr * wd) - lr * plain_muon_update(n, update, config)
        for n, t in adam_tensors.items():
            t.grad = grads[n]
        adam.step()
    plain.update({n: t.detach() for n, t in adam_tensors.items()})
    return {n: p.detach() for n, p in params.items()}, plain


@pytest.mark.parametrize("settings", [
    dict(),  # Nesterov, quintic, spectral, QKV split
    dict(muon_use_nesterov=False, muon_coefficient_type="simple", muon_scale_mode="shape_scaling",
         muon_split_qkv=False, muon_extra_scale_factor=0.2, muon_num_ns_steps=7),
], ids=["nesterov-quintic-spectral", "simple-shape-scaling-unsplit"])
def test_single_device_update_equals_plain_muon(settings: dict) -> None:
    """No clipping, constant lr: our Muon (matrices) and AdamW (embeddings, output layer, norms)
    step the weights as a plain Muon written here does from the same grads, step after step."""
    config = muon_config(clip_grad=0.0, lr_warmup_iters=0, lr_decay_style="constant", **settings)
    ours, plain = plain_training(config, STEPS)
    for name, weight in ours.items():
        torch.testing.assert_close(weight, plain[name], rtol=0, atol=2e-6, msg=name)


def test_newton_schulz_flops_are_the_planners() -> None:
    """torch's FLOP counter around one Muon step (the matmuls are Newton-Schulz's alone) counts
    what planner/flops.py's formula says, with and without the QKV split, on dense and MoE layers."""
    for config in (muon_config(), muon_config(experts=True, muon_split_qkv=False, muon_num_ns_steps=3)):
        model = setup_rank(config)
        batches = rank_microbatches(RandomTokens(VOCAB, config.model.seq_length), 0, config, torch.device("cpu"))
        step = model.optimizer.step
        counter = FlopCounterMode(display=False)

        def counted_step() -> None:
            with counter:
                step()
        model.optimizer.step = counted_step
        train_step(model, batches, 1, config, torch.device("cpu"))
        assert counter.get_total_flops() == newton_schulz_flops(config.model, config.train)


# --- every layout against one device ----------------------------------------------------------

@pytest.mark.parametrize("layout, experts", CASES, ids=[f"{layout.name}{'-moe' * e}" for layout, e in CASES])
def test_muon_layouts_match_single_device(layout: Layout, experts: bool, world2) -> None:
    ranks = world2[0] if layout.world_size == 2 else spawned(layout.world_size)
    assert_parity(reference(experts), merge_ranks([r[layout] for r in ranks]), VOCAB)


def test_muon_resumes_bit_identically_and_reshards(world2) -> None:
    """dp 2 with the distributed optimizer: 2 + 2 steps through a checkpoint equal 4 straight
    (every bit); the checkpoint's momentum buffers load on one device (losses to 1e-5: only the
    order of float sums differs)."""
    ranks, saved = world2
    straight, first, resumed = ranks[0]["resume"]
    assert first + resumed == straight
    on_one_device = train(muon_config(), 2, saved)
    assert on_one_device == pytest.approx(resumed, rel=1e-5)


def test_resuming_with_the_other_optimizer_is_refused(tmp_path) -> None:
    adam = muon_config(optimizer="adam")
    train(adam, 1, None, str(tmp_path))
    with pytest.raises(ConfigError, match="holds --optimizer adam state but this run has --optimizer muon"):
        train(muon_config(), 1, str(tmp_path))


# --- flags -----------------------------------------------------------------------------------

@pytest.mark.parametrize("flags, message", [
    (["--optimizer", "muon", "--muon-tp-mode", "blockwise"], "--muon-tp-mode=blockwise is not implemented"),
    (["--optimizer", "muon", "--optimizer-cpu-offload"], "--optimizer muon with --optimizer-cpu-offload"),
    (["--optimizer", "muon", "--muon-momentum", "1.0"], r"--muon-momentum=1.0 must be in \[0, 1\)"),
])
def test_muon_refuses_what_it_does_not_do(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_megatron_muon_flags_parse() -> None:
    train_cfg = parse_args(["--optimizer", "muon", "--muon-momentum", "0.95", "--muon-use-nesterov",
                            "--muon-no-split-qkv", "--muon-num-ns-steps", "6", "--muon-scale-mode", "unit_rms_norm",
                            "--muon-extra-scale-factor", "0.2", "--muon-coefficient-type", "simple"]).train
    assert (train_cfg.optimizer, train_cfg.muon_momentum, train_cfg.muon_use_nesterov, train_cfg.muon_split_qkv,
            train_cfg.muon_num_ns_steps, train_cfg.muon_scale_mode, train_cfg.muon_extra_scale_factor,
            train_cfg.muon_coefficient_type) == ("muon", 0.95, True, False, 6, "unit_rms_norm", 0.2, "simple")
