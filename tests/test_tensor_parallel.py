"""Tensor and sequence parallelism on gloo ranks, checked against one device and against definitions.

Two spawns (tp=2 and tp=4); each rank runs every check and returns numbers the test asserts on.

Parity tolerances and why they are what they are: tests/helpers/parity.py.
"""
from __future__ import annotations

import functools

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from helpers.parity import RandomTokens, assert_parity, full_weights, merge_ranks, merge_tensors, run_steps, setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.comm import METER
from megatron_lite.config import ParallelConfig
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.placement import placement
from megatron_lite.tensor_parallel import mappings, vocab_parallel_cross_entropy
from megatron_lite.training.loop import rank_microbatches, train_step
from megatron_lite.training.parallelize import parallelize

FAMILIES = ("llama", "gpt2")
VOCAB = 258
# (family, sequence parallel, clip_grad): clipping on (1.0, active in these steps) and off.
CASES = [(f, sp, 1.0) for f in FAMILIES for sp in (False, True)] + [("llama", True, 0.0), ("gpt2", False, 0.0)]


def parity_config(family: str, layout: Layout = Layout(), **train):
    config = tiny_config(family, model=dict(hidden_size=64, num_attention_heads=8,
                                            num_query_groups=4 if family == "llama" else 8, vocab_size=VOCAB),
                         **{**dict(micro_batch_size=2, global_batch_size=4, train_iters=6, clip_grad=1.0), **train})
    config = config.updated(parallel=layout.fields())
    return config


# ---------------------------------------------------------------- checks run on every rank

def _gather_raw(t: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return parts


def check_mappings() -> dict[str, float]:
    """Each mapping's forward and backward against its definition; returns max errors."""
    rank, n = dist.get_rank(), dist.get_world_size()
    x = torch.randn(2, 4 * n, 3 * n, generator=torch.Generator().manual_seed(rank))
    xs = _gather_raw(x)

    def grads_for(shape: torch.Size) -> tuple[torch.Tensor, list[torch.Tensor]]:
        g = torch.randn(shape, generator=torch.Generator().manual_seed(100 + rank))
        return g, _gather_raw(g)

    def chunk(t: torch.Tensor, dim: int) -> torch.Tensor:
        return t.chunk(n, dim=dim)[rank]

    expected = {  # name: (forward(x), backward(g, all g's))
        "copy_to": (lambda: x, lambda g, gs: sum(gs)),
        "reduce_from": (lambda: sum(xs), lambda g, gs: g),
        "scatter_to": (lambda: chunk(x, -1), lambda g, gs: torch.cat(gs, -1)),
        "gather_from": (lambda: torch.cat(xs, -1), lambda g, gs: chunk(g, -1)),
        "gather_from_sequence": (lambda: torch.cat(xs, 1), lambda g, gs: chunk(sum(gs), 1)),
        "reduce_scatter_to_sequence": (lambda: chunk(sum(xs), 1), lambda g, gs: torch.cat(gs, 1)),
        "scatter_to_sequence": (lambda: chunk(x, 1), lambda g, gs: torch.cat(gs, 1)),
    }
    functions = {
        "copy_to": mappings.copy_to_tensor_model_parallel_region,
        "reduce_from": mappings.reduce_from_tensor_model_parallel_region,
        "scatter_to": mappings.scatter_to_tensor_model_parallel_region,
        "gather_from": mappings.gather_from_tensor_model_parallel_region,
        "gather_from_sequence": mappings.gather_from_sequence_parallel_region,
        "reduce_scatter_to_sequence": mappings.reduce_scatter_to_sequence_parallel_region,
        "scatter_to_sequence": mappings.scatter_to_sequence_parallel_region,
    }
    errors = {}
    for name, fn in functions.items():
        leaf = x.clone().requires_grad_()
        y = fn(leaf)
        g, gs = grads_for(y.shape)
        y.backward(g)
        want_y, want_grad = expected[name][0](), expected[name][1](g, gs)
        errors[name] = max((y - want_y).abs().max().item(), (leaf.grad - want_grad).abs().max().item())
    return errors


def check_cross_entropy(pad: int) -> float:
    """Vocab-parallel loss and grad vs F.cross_entropy on the full, unpadded logits."""
    rank, n = dist.get_rank(), dist.get_world_size()
    padded, vocab = 8 * n, 8 * n - pad  # the last `pad` ids are padding
    gen = torch.Generator().manual_seed(0)
    full = torch.randn(2, 5, padded, generator=gen) * 3
    target = torch.randint(0, vocab, (2, 5), generator=gen)
    local = full.chunk(n, dim=-1)[rank].clone().requires_grad_()
    loss = vocab_parallel_cross_entropy(local, target, vocab)
    loss.sum().backward()
    ref_logits = full[..., :vocab].clone().requires_grad_()
    ref = F.cross_entropy(ref_logits.flatten(0, 1), target.flatten(), reduction="none").view(2, 5)
    ref.sum().backward()
    ref_grad = F.pad(ref_logits.grad, (0, padded - vocab)).chunk(n, dim=-1)[rank]
    return max((loss - ref).abs().max().item(), (local.grad - ref_grad).abs().max().item())


def check_communication(family: str, sp: bool) -> dict:
    """Bytes the meter counts for one train step, and the size of the SP-replicated params."""
    config = parity_config(family, Layout(tp=dist.get_world_size(), sp=sp))
    parallel_state.initialize_model_parallel(config.parallel)
    model = parallelize(config, torch.device("cpu"))
    batches = list(rank_microbatches(RandomTokens(VOCAB, config.model.seq_length), 0, config, torch.device("cpu")))
    METER.reset()
    train_step(model, batches, 1, config, torch.device("cpu"))
    sp_params = sum(p.numel() for p in model.chunks[0].parameters() if placement(p).partial_grads == ("tp",))
    return {"bytes": dict(METER.bytes), "wire": dict(METER.wire_bytes), "sp_params": sp_params}


def check_saved_activations(sp: bool) -> int:
    """Bytes saved for backward inside norm and dropout modules during one forward."""
    config = parity_config("llama", Layout(tp=dist.get_world_size(), sp=sp)).updated(model={"hidden_dropout": 0.1})
    parallel_state.initialize_model_parallel(config.parallel)
    model = GPTModel(config.model, sp)
    init_weights(model, config.model, 0)
    regions = [m for name, m in model.named_modules() if "layernorm" in name or isinstance(m, nn.Dropout)]
    state = {"inside": 0, "bytes": 0}
    for module in regions:
        module.register_forward_pre_hook(lambda *_: state.__setitem__("inside", state["inside"] + 1))
        module.register_forward_hook(lambda *_: state.__setitem__("inside", state["inside"] - 1))

    def pack(t: torch.Tensor) -> torch.Tensor:
        if state["inside"] and not isinstance(t, nn.Parameter):
            state["bytes"] += t.numel() * t.element_size()
        return t

    tokens = torch.randint(0, VOCAB, (2, config.model.seq_length))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(tokens, tokens).sum()
    return state["bytes"]


# Initial weights at every kind of shard on two ranks: the fused fc1 and QKV split over tp, the
# padded vocabulary over tp, the layers over pp, the experts over ep, the flat buffers over dp.
MOE = dict(num_experts=4, moe_layer_freq=2)  # layer 0 dense, layer 1 a mixture of experts
INIT_CASES = [("llama", MOE, Layout(tp=2, sp=True)), ("llama", MOE, Layout(pp=2)), ("llama", MOE, Layout(dp=2, ep=2)),
              ("llama", MOE, Layout(dp=2, zero=3)), ("gpt2", {}, Layout(tp=2)), ("gpt2", {}, Layout(pp=2))]


# Megatron's model flags under tp 2 with SP, against one device: zero-centred norms (the q/k norms'
# too) and RoPE on half of each head.
VARIANTS = {"llama-1p-rotary-half": ("llama", dict(apply_layernorm_1p=True, rotary_percent=0.5, qk_layernorm=True)),
            "gpt2-1p": ("gpt2", dict(apply_layernorm_1p=True))}


def init_config(family: str, model: dict, layout: Layout = Layout()):
    return parity_config(family).updated(model=model, parallel=layout.fields())


def tp_worker(tp: int) -> dict:
    parallel_state.initialize_model_parallel(ParallelConfig(tensor_model_parallel_size=tp))
    # 3 pad ids, and 9: then the last rank's shard is padding only.
    results = {"mappings": check_mappings(), "cross_entropy": max(check_cross_entropy(3), check_cross_entropy(9))}
    results["parity"] = {(f, sp, clip): run_steps(parity_config(f, Layout(tp=tp, sp=sp), clip_grad=clip), 6)
                         for f, sp, clip in CASES}
    if tp == 4:
        # The same four ranks as tp 2 x dp 2: replicas see half the batch each and average grads.
        results["tp2_dp2"] = {f: run_steps(parity_config(f, Layout(tp=2, dp=2, sp=True)), 6) for f in FAMILIES}
    if tp == 2:
        results["comm"] = {(f, sp): check_communication(f, sp) for f in FAMILIES for sp in (False, True)}
        results["saved"] = {sp: check_saved_activations(sp) for sp in (False, True)}
        results["init"] = {(f, layout): full_weights(setup_rank(init_config(f, model, layout)))
                           for f, model, layout in INIT_CASES}
        results["variants"] = {name: run_steps(init_config(f, model, Layout(tp=2, sp=True)), 6)
                               for name, (f, model) in VARIANTS.items()}
    return results


# ---------------------------------------------------------------- the tests

@functools.cache
def reference(family: str, clip: float = 1.0) -> dict:
    return run_steps(parity_config(family, clip_grad=clip), 6)


@functools.cache
def spawned(tp: int) -> list[dict]:
    """One spawn per tp size for the whole module; every test reads its results."""
    return run_on_ranks(tp_worker, tp, tp)


@pytest.mark.parametrize("tp", [2, 4])
def test_mappings_match_their_definitions(tp: int) -> None:
    for result in spawned(tp):
        assert max(result["mappings"].values()) < 1e-5, result["mappings"]


@pytest.mark.parametrize("tp", [2, 4])
def test_vocab_parallel_cross_entropy_matches_torch(tp: int) -> None:
    assert max(r["cross_entropy"] for r in spawned(tp)) < 1e-5


@pytest.mark.parametrize("tp", [2, 4])
@pytest.mark.parametrize("family, sp, clip", CASES,
                         ids=[f"{f}-{'sp' if sp else 'no-sp'}-{'clip' if clip else 'no-clip'}"
                              for f, sp, clip in CASES])
def test_training_matches_single_device(tp: int, family: str, sp: bool, clip: float) -> None:
    merged = merge_ranks([result["parity"][(family, sp, clip)] for result in spawned(tp)])
    assert_parity(reference(family, clip), merged, VOCAB)


@pytest.mark.parametrize("family", FAMILIES)
def test_tensor_and_data_parallel_match_single_device(family: str) -> None:
    assert_parity(reference(family), merge_ranks([result["tp2_dp2"][family] for result in spawned(4)]), VOCAB)


@pytest.mark.parametrize("variant", VARIANTS)
def test_megatron_model_flags_at_tp2_match_single_device(variant: str) -> None:
    family, model = VARIANTS[variant]
    merged = merge_ranks([result["variants"][variant] for result in spawned(2)])
    assert_parity(run_steps(init_config(family, model), 6), merged, VOCAB)


@pytest.mark.parametrize("family", FAMILIES)
def test_communication_volume_is_analytic(family: str) -> None:
    ranks = spawned(2)
    config = parity_config(family)
    m = config.train.global_batch_size // config.train.micro_batch_size
    b, s, h, layers = config.train.micro_batch_size, config.model.seq_length, config.model.hidden_size, 2
    act = 4 * b * s * h  # one fp32 activation [b, s, h]
    # Per microbatch: embedding + 4 per layer (2 forward, 2 backward) + output layer; the loss
    # reduces 3 fp32 values per token (max, sum-exp, target logit). Per step: the grad-norm scalar.
    n_act = m * (2 + 4 * layers)
    loss_bytes = m * 3 * 4 * b * s
    plain, seq = ranks[0]["comm"][(family, False)], ranks[0]["comm"][(family, True)]
    assert plain["bytes"] == {("all_reduce", "tp"): n_act * act + loss_bytes, ("all_reduce", "mp"): 4}
    sp_grads = 4 * seq["sp_params"]
    assert seq["bytes"] == {("all_gather", "tp"): n_act * act, ("reduce_scatter", "tp"): n_act * act,
                            ("all_reduce", "tp"): loss_bytes + sp_grads, ("all_reduce", "mp"): 4}
    # On the wire (ring, 2 ranks: an all-reduce sends its volume once, an all-gather or a
    # reduce-scatter half of it) SP costs exactly the all-reduces it replaces, plus the norm-grad sync.
    assert sum(seq["wire"].values()) - sp_grads == pytest.approx(sum(plain["wire"].values()))


@pytest.mark.parametrize("family, model, layout", INIT_CASES, ids=[f"{f}-{lay.name}" for f, _, lay in INIT_CASES])
def test_every_layout_starts_from_the_single_device_weights(family: str, model: dict, layout: Layout) -> None:
    """Each rank draws only its shard (model/initialization.py); the shards are exactly the
    single-device tensors' slices, and vocabulary pad rows are zero."""
    merged = merge_tensors([result["init"][(family, layout)] for result in spawned(2)])
    single = full_weights(setup_rank(init_config(family, model)))
    assert merged.keys() == single.keys()
    for name, tensor in single.items():
        if name.startswith(("word_embeddings", "output_layer")):  # padded per tp size
            tensor, pad = tensor[:VOCAB], merged[name][VOCAB:]
            assert pad.numel() and not pad.any(), name
        assert torch.equal(merged[name][:len(tensor)], tensor), name


def test_sequence_parallel_shrinks_norm_and_dropout_activations() -> None:
    saved = spawned(2)[0]["saved"]
    assert saved[False] > 0 and saved[True] * 2 == saved[False]
