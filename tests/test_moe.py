"""Mixture of experts and expert parallelism.

In-process: the balancing losses against a direct computation, the capacity rule, aux-loss-free
balancing evening out a skewed router, refusals. Spawned (one spawn per world size 2, 4, 8):
every expert-parallel layout against one device with dropless routing in fp32 (losses, grads
before clipping, grad norms, weights; tolerances and their reasons in tests/helpers/parity.py),
and the all-to-all volume against the routed token counts.
"""
from __future__ import annotations

import dataclasses
import functools
import math
import sys
from pathlib import Path

import pytest
import torch
import transformers

from helpers.checkpoint_steps import train, train_jobs
from helpers.parity import assert_parity, merge_ranks, run_steps, setup_rank
from helpers.tiny import tiny_config, tiny_model
from megatron_lite import parallel_state
from megatron_lite.checkpointing import latest_iteration, read_checkpoint
from megatron_lite.checkpointing.reshard import load_weights
from megatron_lite.comm import METER
from megatron_lite.config import ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.hf.convert import load_safetensors
from megatron_lite.hf.families import hf_config
from megatron_lite.model.gpt import GPTModel
from megatron_lite.model.moe import MoELayer, finish_moe_step, moe_routers
from megatron_lite.model.ops import select_ops
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import pretrain, rank_microbatches, train_step

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402

CPU = torch.device("cpu")
STEPS = 3
MOE = dict(num_layers=4, num_experts=4, moe_router_topk=2, moe_ffn_hidden_size=32, moe_aux_loss_coeff=1e-2,
           moe_z_loss_coeff=1e-3)
# Both families, a shared expert and dense layers in between (moe_layer_freq 2) on gpt2.
FAMILY_MOE = {"llama": MOE, "gpt2": {**MOE, "moe_layer_freq": 2, "moe_shared_expert_intermediate_size": 32}}
ALLGATHER = {"moe_token_dispatcher_type": "allgather"}
# The Hugging Face MoE families' features: Qwen2-MoE's gated shared expert, q/k/v biases and
# unnormalised top-k; Qwen3-MoE's per-head q/k norms over heads wider than hidden/heads.
QWEN2_MOE = {"moe_shared_expert_intermediate_size": 32, "moe_shared_expert_gate": True, "add_qkv_bias": True,
             "moe_layer_freq": 2, "moe_router_pre_softmax": True}
QWEN3_MOE = {"qk_layernorm": True, "kv_channels": 32}
CASES = [  # (family, layout, model overrides)
    ("llama", Layout(dp=2, ep=2), {}), ("gpt2", Layout(dp=2, ep=2), {}), ("llama", Layout(cp=2, ep=2), {}),
    ("gpt2", Layout(dp=2, ep=2, distopt=True), {}), ("llama", Layout(dp=2, ep=2), ALLGATHER),
    ("llama", Layout(dp=4, ep=4), {}), ("llama", Layout(tp=2, dp=2, ep=2, sp=True), {}),
    ("gpt2", Layout(pp=2, dp=2, ep=2), {}), ("gpt2", Layout(dp=4, ep=2), ALLGATHER),
    ("llama", Layout(pp=2, dp=2, ep=2, vpp=2), {}),
    ("llama", Layout(tp=2, pp=2, dp=2, ep=2, sp=True), {}),
    # ep over tp ranks: with SP each routes its own tokens; without, the same ones (counted once).
    ("llama", Layout(tp=2, ep=2, sp=True), {}), ("gpt2", Layout(tp=2, ep=2), {}),
    ("gpt2", Layout(tp=2, dp=2, ep=4, sp=True, distopt=True), {}),
    ("llama", Layout(tp=2, dp=2, ep=2, sp=True), QWEN2_MOE), ("llama", Layout(tp=2, ep=2), QWEN3_MOE),
    # ZeRO-2/3: the experts' buckets shard over edp, the dense ones over dp x cp.
    ("llama", Layout(dp=4, ep=2, zero=3), {}), ("gpt2", Layout(tp=2, dp=2, ep=2, sp=True, zero=2), {}),
]


def moe_config(family: str, layout: Layout = Layout(), clip: float = 0.5, **model):
    config = tiny_config(family, model={**FAMILY_MOE[family], **model}, micro_batch_size=1, global_batch_size=8,
                         train_iters=STEPS, clip_grad=clip)
    config = config.updated(parallel={**layout.fields(), "ddp_bucket_size": 3000})
    return config


def _router_inputs(**model):
    config = tiny_model("llama", **{**MOE, **model})
    parallel_state.initialize_model_parallel(Layout().apply(tiny_config().parallel))
    layer = MoELayer(config, select_ops(False), False, None)
    for i, param in enumerate(layer.parameters()):
        torch.nn.init.normal_(param, std=0.5 if param is layer.router.weight else 0.05,
                              generator=torch.Generator().manual_seed(i))
    x = torch.randn(3, 16, config.hidden_size, generator=torch.Generator().manual_seed(1))
    return config, layer, x


@pytest.mark.parametrize("kind", ["aux_loss", "seq_aux_loss"])
def test_balancing_losses_equal_a_direct_computation(kind: str) -> None:
    config, layer, x = _router_inputs(moe_router_load_balancing_type=kind)
    weights, experts, aux = layer.router(x)
    logits = x @ layer.router.weight.t()
    probs = logits.softmax(-1)
    chosen = torch.zeros_like(probs).scatter_(-1, logits.topk(2, -1).indices, 1.0)
    E, k = config.num_experts, config.moe_router_topk
    if kind == "aux_loss":  # Switch: E * sum_i f_i P_i, f the fraction of routed pairs, P the mean prob
        balance = E * ((chosen.sum((0, 1)) / (48 * k)) * probs.mean((0, 1))).sum()
    else:  # the same per sequence, averaged over the sequences
        balance = (E * ((chosen.sum(1) / (16 * k)) * probs.mean(1)).sum(-1)).mean()
    z = torch.logsumexp(logits, -1).square().mean()
    torch.testing.assert_close(aux, config.moe_aux_loss_coeff * balance + config.moe_z_loss_coeff * z,
                               rtol=1e-6, atol=0)
    # The weights: the softmax over the chosen k logits (renormalised), summing to one per token.
    torch.testing.assert_close(weights, logits.flatten(0, 1).gather(-1, experts).softmax(-1))
    assert torch.equal(experts.sort(-1).values, logits.topk(2, -1).indices.flatten(0, 1).sort(-1).values)


def test_capacity_keeps_each_experts_highest_weighted_pairs() -> None:
    config, layer, _ = _router_inputs(moe_expert_capacity_factor=0.5)
    # 8 tokens x k 2 = 16 pairs over 4 experts: capacity ceil(0.5 * 8 * 2 / 4) = 2 per expert.
    experts = torch.tensor([0, 1, 0, 2, 0, 1, 0, 3, 1, 2, 0, 1, 3, 3, 2, 2])
    weights = torch.linspace(0.9, 0.1, 16)[torch.randperm(16, generator=torch.Generator().manual_seed(0))]
    keep = layer._within_capacity(experts, weights, num_tokens=8)
    for e in range(4):
        pairs = (experts == e).nonzero().flatten()
        best = pairs[weights[pairs].argsort(descending=True)[:2]]
        assert set(keep.nonzero().flatten().tolist()) & set(pairs.tolist()) == set(best.tolist()), e


def test_dropless_and_padded_capacity_compute_the_same_layer() -> None:
    """A capacity nothing exceeds drops nothing; padding each expert's rows to the same count
    changes shapes, not results."""
    _, layer, x = _router_inputs()
    reference = layer(x)
    layer.config = dataclasses.replace(layer.config, moe_expert_capacity_factor=4.0,
                                       moe_pad_expert_input_to_capacity=True)
    torch.testing.assert_close(layer(x), reference)


def test_expert_bias_balances_a_skewed_router() -> None:
    """Aux-loss-free balancing alone (no aux loss, weights fixed): the inputs share a direction u
    the router favours expert 0 along; as the bias moves each step, max/mean load falls."""
    config, layer, x = _router_inputs(moe_router_enable_expert_bias=True, moe_router_bias_update_rate=0.01,
                                      moe_aux_loss_coeff=0.0, moe_z_loss_coeff=None)
    u = torch.nn.functional.normalize(torch.randn(config.hidden_size, generator=torch.Generator().manual_seed(2)),
                                      dim=0)
    x = x + 2.0 * u
    with torch.no_grad():
        layer.router.weight[0] += u
        balance = []
        for _ in range(100):
            layer(x)
            balance.append(finish_moe_step([layer])["expert_load_max_over_mean"])
    assert balance[0] > 1.5 and max(balance[-20:]) < 1.25, balance
    assert layer.router.expert_bias[0] < 0  # the overloaded expert's bias went down


@pytest.mark.parametrize("flags, message", [
    (["--num-experts", "4", "--moe-router-topk", "5"], "--moe-router-topk=5 exceeds --num-experts=4"),
    (["--num-experts", "4", "--moe-expert-capacity-factor", "0"], "--moe-expert-capacity-factor=0.0 must be > 0"),
    (["--num-experts", "6", "--ep", "4"], "--num-experts=6 is not divisible by --expert-model-parallel-size=4"),
    (["--ep", "2"], "--expert-model-parallel-size=2 needs --num-experts"),
])
def test_bad_moe_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_expert_parallel_size_must_divide_the_ranks_of_a_stage(monkeypatch) -> None:
    monkeypatch.setenv("WORLD_SIZE", "4")
    config = moe_config("llama", Layout(tp=2, pp=2, ep=4))
    with pytest.raises(ConfigError, match=r"--expert-model-parallel-size=4 does not divide tp x dp x cp = 2 x 1 x 1"):
        parallel_state.initialize_model_parallel(config.parallel)


def _all_to_all_volume() -> dict:
    """One step at dp 2 x ep 2: the meter's all-to-all bytes and this rank's routed pairs."""
    config = moe_config("llama", Layout(dp=2, ep=2))
    model = setup_rank(config)
    routers = moe_routers(model.chunks)
    batches = list(rank_microbatches(RandomTokens(258, 16), 0, config, CPU))
    METER.reset()
    train_step(model, batches, 1, config, CPU)
    pairs = len(batches) * config.model.seq_length * config.model.moe_router_topk * len(routers)
    counts = len(batches) * len(routers) * 8 * config.model.num_experts  # one int64 count per expert and exchange
    return {"measured": METER.total("all_to_all", "ep"), "pairs": pairs, "count_bytes": counts,
            "hidden": config.model.hidden_size}


def moe_worker(world: int) -> dict:
    results = {(family, layout, _name(model)): run_steps(moe_config(family, layout, **model), STEPS)
               for family, layout, model in CASES if layout.world_size == world}
    if world == 2:
        results["volume"] = _all_to_all_volume()
    return results


@functools.cache
def spawned(world: int) -> dict:
    ranks = run_on_ranks(moe_worker, world, world)
    merged = {key: merge_ranks([r[key] for r in ranks]) for key in ranks[0] if key != "volume"}
    if world == 2:
        merged["volume"] = [r["volume"] for r in ranks]
    return merged


@functools.cache
def single(family: str, model: tuple = ()) -> dict:
    """The one-device run of a family with model overrides (as sorted items, to be cached)."""
    return run_steps(moe_config(family, **dict(model)), STEPS)


def _name(model: dict) -> str:
    return "-".join(str(v) for v in model.values())


@pytest.mark.parametrize("family, layout, model", CASES,
                         ids=["-".join(filter(None, (f, layout.name, _name(m)))) for f, layout, m in CASES])
def test_expert_parallel_layouts_match_single_device(family: str, layout: Layout, model: dict) -> None:
    result = spawned(layout.world_size)[(family, layout, _name(model))]
    # The dispatcher does not change the one-device model.
    reference = {k: v for k, v in model.items() if k != "moe_token_dispatcher_type"}
    assert_parity(single(family, tuple(sorted(reference.items()))), result, 258)
    assert all(math.isfinite(x) for x in result["losses"])


def test_all_to_all_volume_is_the_routed_rows() -> None:
    """Summed over the ep group: every (token, expert) pair's hidden fp32 row crosses four times
    (dispatch and combine forward, their gradients backward), plus the exchanged counts."""
    ranks = spawned(2)["volume"]
    rows = 4 * 4 * ranks[0]["hidden"] * sum(r["pairs"] for r in ranks)
    assert sum(r["measured"] for r in ranks) == rows + sum(r["count_bytes"] for r in ranks), ranks


def test_moe_resume_is_bit_exact_with_the_expert_bias(tmp_path) -> None:
    """At ep 1 experts checkpoint like any parameter, and the expert bias (a buffer) with them."""
    model = {**MOE, "moe_router_enable_expert_bias": True, "moe_router_bias_update_rate": 0.05}
    straight = pretrain(tiny_config(train_iters=4, model=model))["losses"]
    pretrain(tiny_config(train_iters=4, exit_interval=2, save=str(tmp_path), model=model))
    assert pretrain(tiny_config(train_iters=4, load=str(tmp_path), model=model))["losses"] == straight[2:]


@pytest.mark.parametrize("architecture, model", [("MixtralForCausalLM", {}), ("Qwen2MoeForCausalLM", QWEN2_MOE),
                                                 ("Qwen3MoeForCausalLM", QWEN3_MOE)])
def test_hf_moe_export_matches_transformers_and_import_round_trips(tmp_path, architecture: str, model: dict) -> None:
    """A trained tiny llama MoE exports as its Hugging Face family with our logits (fp32, 1e-4),
    and importing the export at tp 2 (each rank reads its slices of the stacked experts) and
    exporting it again gives the same tensors bit for bit."""
    ours, hf_dir, back, again = (tmp_path / name for name in ("ours", "hf", "back", "again"))
    config = tiny_config(train_iters=2, save=str(ours), model={**MOE, "num_layers": 2, **model})
    pretrain(config)
    assert convert_checkpoint.main(["to-hf", "--load", str(ours), "--out", str(hf_dir)]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    assert type(hf).__name__ == architecture
    model = GPTModel(config.model)
    load_weights(read_checkpoint(ours, latest_iteration(ours)).model, [model])
    tokens = torch.randint(0, 258, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(tokens).logits, model.eval()(tokens), rtol=0, atol=1e-4)
    assert convert_checkpoint.main(["from-hf", str(hf_dir), "--out", str(back), "--tp", "2",
                                    "--make-vocab-size-divisible-by", "8"]) == 0
    assert convert_checkpoint.main(["to-hf", "--load", str(back), "--out", str(again)]) == 0
    first, second = load_safetensors(hf_dir), load_safetensors(again)
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


@pytest.mark.parametrize("model, why", [
    ({"moe_shared_expert_intermediate_size": 32}, r"a shared expert without a gate \(Qwen2-MoE's is gated"),
    ({"moe_layer_freq": 2}, "every Mixtral layer is MoE"),
    ({"moe_router_pre_softmax": True}, "unnormalised top-k weights without a shared expert or q/k norms"),
    ({"qk_layernorm": True, "moe_router_score_function": "sigmoid"}, "sigmoid router scores"),
    ({**QWEN2_MOE, "qk_layernorm": True, "add_qkv_bias": False}, "a shared expert with q/k norms"),
])
def test_moe_models_no_hf_family_represents_are_refused(model: dict, why: str) -> None:
    with pytest.raises(ConfigError, match=f"no Hugging Face family represents this mixture of experts: .*{why}"):
        hf_config(tiny_model("llama", **{**MOE, **model}))


def test_grouped_gemm_equals_the_loop_over_experts() -> None:
    """Both paths of Experts on the same rows (some expert empty): outputs and grads alike."""
    _, layer, x = _router_inputs()
    experts = layer.experts
    rows = x.flatten(0, 1)[:40].clone().requires_grad_()
    counts = [3, 17, 0, 20]
    assert experts._grouped_mm_fits(rows)
    grouped = experts(rows, counts)
    experts._grouped_mm_fits = lambda rows: False
    looped = experts(rows, counts)
    torch.testing.assert_close(grouped, looped, rtol=1e-6, atol=1e-6)
    grads = [torch.autograd.grad(out.square().sum(), (rows, experts.linear_fc1, experts.linear_fc2))
             for out in (grouped, looped)]
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_expert_parallel_checkpoints_resume_exactly_and_reshard_across_ep(tmp_path) -> None:
    """Saved at dp 2 x ep 2 with the plain and with the distributed optimizer (files hold experts
    whole): resumed there bit-identically; loaded at one device, at dp 2 x ep 1 with the
    distributed optimizer and at dp 4 x ep 4, the next steps' losses are the same to 1e-5 (only
    the order of float sums differs). Also with ep over the tp ranks (tp 2 + SP x ep 2, the
    distributed optimizer: each tp rank's files hold the Adam state of its own experts only),
    resumed there and loaded at one device."""
    plain, sharded = moe_config("llama", Layout(dp=2, ep=2)), moe_config("llama", Layout(dp=2, ep=2, distopt=True))
    over_tp = moe_config("llama", Layout(tp=2, ep=2, sp=True, distopt=True))
    saved_plain, saved_sharded, saved_tp = (str(tmp_path / name) for name in ("plain", "sharded", "tp"))
    straight, _, straight_sharded, _, straight_tp, _ = run_on_ranks(
        train_jobs, 2, [(plain, 4), (plain, 2, None, saved_plain), (sharded, 4), (sharded, 2, None, saved_sharded),
                        (over_tp, 4), (over_tp, 2, None, saved_tp)])[0]
    resumed = run_on_ranks(train_jobs, 2, [(plain, 2, saved_plain), (sharded, 2, saved_sharded),
                                           (over_tp, 2, saved_tp)])[0]
    assert resumed == [straight[2:], straight_sharded[2:], straight_tp[2:]]
    assert train(moe_config("llama"), 2, saved_plain) == pytest.approx(straight[2:], rel=1e-5)
    assert train(moe_config("llama"), 2, saved_tp) == pytest.approx(straight_tp[2:], rel=1e-5)
    other_ep = moe_config("llama", Layout(dp=2, distopt=True))
    assert run_on_ranks(train_jobs, 2, [(other_ep, 2, saved_plain)])[0][0] == pytest.approx(straight[2:], rel=1e-5)
    wider = moe_config("llama", Layout(dp=4, ep=4))
    assert run_on_ranks(train_jobs, 4, [(wider, 2, saved_sharded)])[0][0] == pytest.approx(straight_sharded[2:],
                                                                                            rel=1e-5)


def test_flops_count_the_active_parameters() -> None:
    """k experts of width f/k cost what one dense MLP of width f does, plus the router's h x E matmul."""
    dense = tiny_model("llama", num_layers=4, ffn_hidden_size=64)
    moe = tiny_model("llama", num_layers=4, ffn_hidden_size=64, num_experts=8, moe_router_topk=2,
                     moe_ffn_hidden_size=32)
    router = 6 * 4 * dense.seq_length * dense.hidden_size * 8  # 2 FLOPs x 3 passes x layers x tokens x h x E
    assert flops_per_step(moe, 1) == pytest.approx(flops_per_step(dense, 1) + router, rel=1e-12)
