"""Context parallelism on gloo ranks: every comm type against one device (alone and composed with
TP + SP, PP, interleaving, DP with the distributed optimizer, and with a sliding window on
alternate layers), its
traffic against the analytic volume, the causal load balance of the zigzag split, and activation
memory per rank.

Spawns of 2, 4 and 8 ranks; parity tolerances and their reasons: tests/helpers/parity.py.
"""
from __future__ import annotations

import functools
import sys

import pytest
import torch

from helpers.checkpoint_steps import layout_config, train, train_jobs
from helpers.commands import ROOT
from helpers.parity import assert_parity, merge_ranks, run_steps, setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.comm import METER
from megatron_lite.config import ParallelConfig
from megatron_lite.config.layout import Layout
from megatron_lite.context_parallel.attention import context_parallel_attention
from megatron_lite.context_parallel.zigzag import zigzag_positions
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.kernels.reference import (
    attention_backward_reference,
    attention_forward_reference,
    flash_attention_reference,
)
from megatron_lite.model.transformer import TransformerLayer
from megatron_lite.training.loop import rank_microbatches, train_step

sys.path.insert(0, str(ROOT / "tools"))
import convert_checkpoint  # noqa: E402

FAMILIES = ("llama", "gpt2")
VOCAB = 258
STEPS = 4
SEQ = 32  # divisible by 2 * cp * tp for every layout below
LAYOUTS = [Layout.parse(name) for name in (
    "cp2", "cp2-allgather", "cp2-a2a",
    "cp4", "cp4-allgather", "cp4-a2a", "tp2-cp2-sp", "tp2-cp2-sp-a2a", "cp2-pp2", "cp2-pp2-vpp2",
    "cp2-dp2-distopt", "cp2-dp2-allgather-distopt",
    "tp2-cp2-pp2-sp")]
# A sliding window of 5 over chunks of 8 tokens (cp 2): the chunk pairs 8 apart it reaches in
# part, those 16 apart it skips. On layers 1 and 3 only (Megatron's skip freq 2: layers 2 and 4
# attend fully), so each attention must take its own layer's window.
WINDOW = dict(window_size=5, window_attn_skip_freq=2)
WINDOWED = [Layout.parse(name) for name in ("cp2", "cp2-allgather", "cp2-a2a")]
# --rotary-percent 0.5: RoPE on the first half of each head, at each rank's zigzag positions.
PARTIAL_ROPE = dict(rotary_percent=0.5)


def cp_config(family: str, layout: Layout = Layout(), steps: int = STEPS, windowed: bool = False):
    config = tiny_config(family, model=dict(num_layers=4, hidden_size=64, num_attention_heads=8,
                                            num_query_groups=4 if family == "llama" else 8, seq_length=SEQ,
                                            vocab_size=VOCAB, **(WINDOW if windowed else {})),
                         micro_batch_size=1, global_batch_size=4, train_iters=steps, clip_grad=1.0)
    return config.updated(parallel=layout.fields())


# ---------------------------------------------------------------- checks run on every rank

def one_step_traffic(comm_type: str) -> dict:
    """Meter counts of one training step at cp 2 (2 layers, 2 microbatches)."""
    config = cp_config("llama", Layout(cp=2, cp_comm=comm_type)).updated(model={"num_layers": 2},
                                                                         train={"global_batch_size": 2})
    model = setup_rank(config)
    batches = list(rank_microbatches(RandomTokens(VOCAB, SEQ), 0, config, torch.device("cpu")))
    METER.reset()
    train_step(model, batches, 1, config, torch.device("cpu"))
    return {"bytes": dict(METER.bytes),
            "params": sum(buf.grad_data.numel() for buf in model.grad_buffers)}


def attention_work(cp: int) -> dict[str, int]:
    """How many full and diagonal (causal) chunk pairs this rank computes in one ring attention."""
    calls = {"full": 0, "causal": 0}

    def counting_forward(q, k, v, causal, **window):
        calls["causal" if causal else "full"] += 1
        return attention_forward_reference(q, k, v, causal, **window)

    attention = context_parallel_attention("p2p", flash_attention_reference, counting_forward,
                                           attention_backward_reference)
    q, k, v = (torch.randn(1, 2, 2 * 4, 16) for _ in range(3))
    attention(q, k, v)
    return calls


def saved_bytes_in_layers(config) -> int:
    """Bytes autograd saves inside the transformer layers during one forward of one microbatch."""
    model = setup_rank(config).chunks[0]
    layers = [m for m in model.modules() if isinstance(m, TransformerLayer)]
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # matmuls save views of them
    state = {"inside": 0, "bytes": 0}
    for layer in layers:
        layer.register_forward_pre_hook(lambda *_: state.__setitem__("inside", state["inside"] + 1))
        layer.register_forward_hook(lambda *_: state.__setitem__("inside", state["inside"] - 1))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if state["inside"] and t.untyped_storage().data_ptr() not in weights:
            state["bytes"] += t.numel() * t.element_size()
        return t

    batch = next(iter(rank_microbatches(RandomTokens(VOCAB, SEQ), 0, config, torch.device("cpu"))))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(batch["tokens"], batch["labels"], positions=batch.get("position_ids"))
    return state["bytes"]


def cp_worker(world: int) -> dict:
    results = {layout: {f: run_steps(cp_config(f, layout), STEPS) for f in FAMILIES}
               for layout in LAYOUTS if layout.world_size == world}
    if world == 2:
        results["traffic"] = {c: one_step_traffic(c) for c in ("p2p", "allgather", "a2a")}
        results["saved"] = {c: saved_bytes_in_layers(cp_config("llama", Layout(cp=2, cp_comm=c)))
                            for c in ("p2p", "allgather", "a2a")}
        results["window"] = {layout: run_steps(cp_config("llama", layout, windowed=True), STEPS)
                             for layout in WINDOWED}
        results["partial_rope"] = run_steps(cp_config("llama", Layout(cp=2)).updated(model=PARTIAL_ROPE), STEPS)
    if world == 4:
        parallel_state.initialize_model_parallel(ParallelConfig(context_parallel_size=4))
        results["work"] = attention_work(4)
    return results


@functools.cache
def spawned(world: int) -> list[dict]:
    return run_on_ranks(cp_worker, world, world)


@functools.cache
def reference(family: str, windowed: bool = False) -> dict:
    return run_steps(cp_config(family, windowed=windowed), STEPS)


# ---------------------------------------------------------------- the tests

@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_context_parallel_matches_single_device(layout: Layout, family: str) -> None:
    ranks = spawned(layout.world_size)
    assert_parity(reference(family), merge_ranks([r[layout][family] for r in ranks]), VOCAB)


@pytest.mark.parametrize("layout", WINDOWED, ids=[layout.name for layout in WINDOWED])
def test_sliding_window_context_parallel_matches_single_device(layout: Layout) -> None:
    ranks = spawned(layout.world_size)
    windowed = reference("llama", windowed=True)
    assert_parity(windowed, merge_ranks([r["window"][layout] for r in ranks]), VOCAB)
    # The window changes the model: its losses are not the full causal context's.
    assert windowed["losses"] != pytest.approx(reference("llama")["losses"], rel=1e-4)


def test_partial_rope_context_parallel_matches_single_device() -> None:
    partial = run_steps(cp_config("llama").updated(model=PARTIAL_ROPE), STEPS)
    assert_parity(partial, merge_ranks([r["partial_rope"] for r in spawned(2)]), VOCAB)
    assert partial["losses"] != reference("llama")["losses"]  # a different model


@pytest.mark.parametrize("comm_type", ["p2p", "allgather", "a2a"])
def test_context_parallel_traffic_is_analytic(comm_type: str) -> None:
    """cp 2, 2 layers, 2 microbatches of 1 sample, fp32: per layer and microbatch, with K the bytes of
    this rank's keys (1 x 4 groups x 16 tokens x 8 dims) and Q of its queries (8 heads)."""
    traffic = spawned(2)[0]["traffic"][comm_type]
    cp, layers, microbatches = 2, 2, 2
    K, Q = 4 * 1 * 4 * (SEQ // cp) * 8, 4 * 1 * 8 * (SEQ // cp) * 8
    per = layers * microbatches
    expected = {
        # k and v around the ring forward, again backward, each block's dK/dV back home.
        "p2p": {("send", "cp"): per * ((cp - 1) * 2 * K + (cp - 1) * 2 * K + cp * 2 * K)},
        # gathered k and v forward and again backward (cp times the local bytes), dK/dV scattered back.
        "allgather": {("all_gather", "cp"): per * 2 * cp * 2 * K, ("reduce_scatter", "cp"): per * cp * 2 * K},
        # q, k, v and the output there and back, forward; their grads, backward.
        "a2a": {("all_to_all", "cp"): per * 2 * (2 * Q + 2 * K)},
    }[comm_type]
    expected[("all_reduce", "cp")] = microbatches * 2 * 4  # each microbatch's loss sum and token count
    expected[("all_reduce", "dp-cp")] = 4 * traffic["params"]  # the grads, once, over dp x cp
    assert {k: v for k, v in traffic["bytes"].items() if k[1] in ("cp", "dp-cp")} == expected


def test_zigzag_split_balances_causal_attention_work() -> None:
    """At cp 4 each rank holds chunks r and 7-r of 8: every rank computes 7 full chunk pairs and 2
    diagonal ones (a contiguous split would give rank r 2r+1 pairs' worth, from 1 to 7)."""
    work = [r["work"] for r in spawned(4)]
    units = [w["full"] + 0.5 * w["causal"] for w in work]
    assert max(units) - min(units) <= 1
    assert all(w == {"full": 7, "causal": 2} for w in work)
    # Together, exactly the chunk pairs of one device's causal attention: 8*7/2 full, 8 diagonal.
    assert sum(w["full"] for w in work) == 28 and sum(w["causal"] for w in work) == 8


def test_zigzag_positions_cover_the_sequence_once() -> None:
    held = torch.cat([zigzag_positions(16, 4, rank) for rank in range(4)])
    assert sorted(held.tolist()) == list(range(16))
    assert zigzag_positions(16, 4, 1).tolist() == [2, 3, 12, 13]


@pytest.mark.parametrize("comm_type", ["p2p", "allgather", "a2a"])
def test_attention_and_mlp_activations_shrink_by_cp(comm_type: str) -> None:
    """Saved-tensor bytes per rank at cp 2 are half of one device's, to 5 %: one device's attention
    (SDPA) keeps k and v repeated for each query head of a group while the ring keeps them as they
    are (measured 0.961 of half), and Ulysses also keeps its sequence permutation (1.010)."""
    single = saved_bytes_in_layers(cp_config("llama"))
    per_rank = [r["saved"][comm_type] for r in spawned(2)]
    assert per_rank[0] == per_rank[1]
    assert per_rank[0] * 2 == pytest.approx(single, rel=0.05), (per_rank[0] * 2, single)


def test_checkpoint_resumes_exactly_and_reshards_across_cp(tmp_path) -> None:
    """Saved at cp 2 x dp 2 with the Adam state sharded over dp x cp: resumed as saved it continues
    bit-identically; loaded on one device it is resharded; exported to Hugging Face."""
    saved = str(tmp_path / "cp2dp2")
    source = layout_config(layout=Layout(cp=2, dp=2, distopt=True))
    straight, _ = run_on_ranks(train_jobs, 4, [(source, 4), (source, 2, None, saved)])[0]
    assert run_on_ranks(train_jobs, 4, [(source, 2, saved)])[0][0] == straight[2:]
    assert train(layout_config(), 2, saved) == pytest.approx(straight[2:], rel=1e-5)
    assert convert_checkpoint.main(["to-hf", "--load", saved, "--out", str(tmp_path / "hf")]) == 0
