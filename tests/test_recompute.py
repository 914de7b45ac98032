"""Activation recomputation (--recompute-granularity full|selective) and the model-parallel RNG:
recomputing gives bit-identical losses, grads and weights, with dropout on and off, on one
device and at tp 2 + SP, pp 2 (1F1B), pp 2 x vpp 2 (interleaved) and cp 2; dropout masks agree
across tp ranks where the tensor is replicated and differ where it is split; resume with
dropout on is bit-exact. Under ZeRO-3 at dp 2 (dense and MoE) recomputing matches one device
without it, gathers the same bytes as without it, and holds no more gathered at once (but a
replayed group of more than 2 layers).
One spawn of 2 ranks runs the parallel cases.
"""
from __future__ import annotations

import dataclasses
import functools
from unittest import mock

import pytest
import torch

from helpers.checkpoint_steps import layout_config, train_jobs
from helpers.parity import assert_parity, merge_ranks, run_steps, setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.comm import METER, all_gather
from megatron_lite.config import ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.param_sharding import ShardedParams
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.model.attention import Attention
from megatron_lite.model.transformer import TransformerLayer
from megatron_lite.tensor_parallel.random import replaying
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import rank_microbatches, train_step

STEPS = 2
DROPOUT = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
RECOMPUTE = {  # name: model fields
    "full-uniform": {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 2},
    "full-block": {"recompute_granularity": "full", "recompute_method": "block", "recompute_num_layers": 1},
    "selective": {"recompute_granularity": "selective", "recompute_modules": ["core_attn", "mlp", "layernorm"]},
}
LAYOUTS = [Layout(tp=2, sp=True), Layout(pp=2), Layout(pp=2, vpp=2), Layout(cp=2)]
MOE = {"num_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 1e-2}
# ZeRO-3 at dp 2 against one device without recomputation (no dropout: dp ranks draw other masks).
# A replayed group of 2 layers finds both gathered (the grad buffers gather the last and prefetch
# the first); a group of all 4 gathers its first two inside the replay; "selective" replays core
# attention (the default), the MLP and the norms, "selective-moe" the experts, inside a gathered layer.
ZERO3 = Layout(dp=2, zero=3)
ZERO3_RECOMPUTE = {  # run under ZeRO-3 only
    "full-uniform-4": {**RECOMPUTE["full-uniform"], "recompute_num_layers": 4},
    "selective-moe": {"recompute_granularity": "selective", "recompute_modules": ["moe", "layernorm"]},
}
ZERO3_CASES = [("llama", "full-uniform"), ("llama", "selective"), ("gpt2", "full-uniform-4"), ("moe", "selective-moe")]


def recompute_config(family: str, layout: Layout = Layout(), dropout: bool = True, recompute: str | None = None):
    """4 layers, 4 microbatches of 1; family "moe": llama with 4 experts, top 2."""
    model = {"num_layers": 4, **(DROPOUT if dropout else {}), **(MOE if family == "moe" else {}),
             **{**RECOMPUTE, **ZERO3_RECOMPUTE}.get(recompute, {})}
    family = "llama" if family == "moe" else family
    if layout.cp > 1:  # context parallelism refuses attention dropout
        model["attention_dropout"] = 0.0
    config = tiny_config(family, model=model, micro_batch_size=1, global_batch_size=4, train_iters=STEPS)
    # Several ZeRO-3 buckets per unit: each freed on its own once its grads are in.
    return config.updated(parallel={**layout.fields(), **({"ddp_bucket_size": 3000} if layout.zero == 3 else {})})


def identical(a: dict, b: dict) -> bool:
    return (a["losses"] == b["losses"] and a["grad_norms"] == b["grad_norms"]
            and all(torch.equal(a["grads"][n], b["grads"][n]) for n in a["grads"])
            and all(torch.equal(a["weights"][n], b["weights"][n]) for n in a["weights"]))


def _draws_in_attention_and_dropout(layout: Layout) -> dict:
    """One training forward at tp 2 (llama, dropout on): what core attention's generator draws
    (split region: this rank's heads) and the hidden dropout's masks of the first layer."""
    config = recompute_config("llama", layout)
    model = setup_rank(config)
    draws, masks = [], []
    for module in model.chunks[0].modules():
        if isinstance(module, Attention):
            attention = module.ops.attention
            module.ops = dataclasses.replace(module.ops, attention=lambda *a, f=attention: (draws.append(torch.rand(4)),
                                                                                              f(*a))[1])
        if isinstance(module, TransformerLayer) and not masks:
            module.dropout.register_forward_hook(lambda m, args, out: masks.append((out == 0) & (args[0] != 0)))
    batches = rank_microbatches(RandomTokens(config.model.vocab_size, config.model.seq_length), 0, config,
                                torch.device("cpu"))
    train_step(model, batches, 1, config, torch.device("cpu"))
    gathered = [all_gather(t.float().unsqueeze(0), 0, "tp") for t in (draws[0], masks[0])]
    return {"attention_equal": torch.equal(*gathered[0].unbind(0)), "mask_equal": torch.equal(*gathered[1].unbind(0)),
            "mask_fraction": masks[0].float().mean().item()}


def _zero3_working_set(family: str, recompute: str | None) -> dict:
    """One step under ZeRO-3 at dp 2: the bytes all-gathered, the most bytes held gathered at
    once (sampled after every unit's gather: only frees happen between them) and each unit's
    bytes, how many units a replay asked for, and whether every bucket is freed after the step."""
    config = recompute_config(family, ZERO3, dropout=False, recompute=recompute)
    model = setup_rank(config)
    most, unit_bytes, replayed, gather = [0], [], [0], ShardedParams._gather

    def counting_gather(self: ShardedParams, i: int, wait: bool) -> None:
        gather(self, i, wait)
        held = {id(b): b for unit in self.buckets for _, b in unit if b.gathered}  # a tied bucket serves two units
        most[0] = max(most[0], sum(b.param_full.nbytes for b in held.values()))
        unit_bytes[:] = [sum(b.param_full.nbytes for _, b in unit) for unit in self.buckets]
        replayed[0] += replaying()

    batches = rank_microbatches(RandomTokens(config.model.vocab_size, config.model.seq_length), 0, config,
                                torch.device("cpu"))
    METER.reset()
    with mock.patch.object(ShardedParams, "_gather", counting_gather):
        train_step(model, batches, 1, config, torch.device("cpu"))
    gathered = sum(n for (op, _group), n in METER.bytes.items() if op == "all_gather")  # experts gather over edp
    return {"gathered_bytes": gathered, "most_bytes": most[0],
            "unit_bytes": unit_bytes, "replayed_units": replayed[0],
            "freed": not any(b.gathered for buf in model.grad_buffers for b in buf.buckets)}


def recompute_worker() -> dict:
    results = {(layout, dropout, recompute): run_steps(recompute_config("llama", layout, dropout, recompute), STEPS)
               for layout in LAYOUTS for dropout in (False, True) for recompute in (None, *RECOMPUTE)}
    results["masks"] = {sp: _draws_in_attention_and_dropout(Layout(tp=2, sp=sp)) for sp in (False, True)}
    results["zero3"] = {case: run_steps(recompute_config(case[0], ZERO3, False, case[1]), STEPS)
                        for case in ZERO3_CASES}
    families = dict.fromkeys(family for family, _ in ZERO3_CASES)
    results["zero3_working_set"] = {case: _zero3_working_set(*case)
                                    for case in [*((family, None) for family in families), *ZERO3_CASES]}
    return results


@functools.cache
def spawned() -> list[dict]:
    return run_on_ranks(recompute_worker, 2)


@functools.cache
def single(family: str, dropout: bool, recompute: str | None) -> dict:
    return run_steps(recompute_config(family, dropout=dropout, recompute=recompute), STEPS)


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_recompute_is_bit_identical_on_one_device(family: str, dropout: bool, recompute: str) -> None:
    assert identical(single(family, dropout, recompute), single(family, dropout, None))
    if dropout:  # the masks are drawn: training differs from the run without dropout
        assert single(family, True, None)["losses"] != single(family, False, None)["losses"]


@pytest.mark.parametrize("recompute", list(RECOMPUTE))
@pytest.mark.parametrize("dropout", [False, True], ids=["no-dropout", "dropout"])
@pytest.mark.parametrize("layout", LAYOUTS, ids=[layout.name for layout in LAYOUTS])
def test_recompute_is_bit_identical_in_parallel(layout: Layout, dropout: bool, recompute: str) -> None:
    for rank in spawned():
        assert identical(rank[(layout, dropout, recompute)], rank[(layout, dropout, None)])


@pytest.mark.parametrize("family, recompute", ZERO3_CASES, ids=["-".join(case) for case in ZERO3_CASES])
def test_recompute_under_zero3_matches_one_device(family: str, recompute: str) -> None:
    """A replayed layer gathers its parameters again (or finds them gathered) and the grad
    buffers free them after its backward: the training of one device without recomputation."""
    assert_parity(single(family, False, None), merge_ranks([rank["zero3"][(family, recompute)] for rank in spawned()]),
                  tiny_config().model.vocab_size)


@pytest.mark.parametrize("family, recompute", ZERO3_CASES, ids=["-".join(case) for case in ZERO3_CASES])
def test_recompute_under_zero3_gathers_no_more(family: str, recompute: str) -> None:
    """The replay gathers only what backward would gather anyway (the same bytes as without
    recomputation) and holds no more at once than backward without it (the running unit and the
    prefetched one; gpt2's tied embedding stays gathered from the output's backward to the
    embedding's), except that a replayed group of 4 layers is gathered whole; none is left
    gathered after the step."""
    for rank in spawned():
        without = rank["zero3_working_set"][(family, None)]
        result = rank["zero3_working_set"][(family, recompute)]
        assert result["gathered_bytes"] == without["gathered_bytes"]
        extra = 2 * max(result["unit_bytes"]) if recompute == "full-uniform-4" else 0  # 2 layers more
        assert 0 < result["most_bytes"] <= without["most_bytes"] + extra and result["freed"]
        if family != "gpt2":
            assert result["most_bytes"] <= sum(sorted(result["unit_bytes"])[-2:])
        # Full: 4 layers replayed per microbatch (2 groups of 2, or 1 of 4), 2 microbatches per rank;
        # a selective replay runs inside a layer, through no unit's hooks.
        assert result["replayed_units"] == (8 if recompute.startswith("full") else 0)


def test_moe_layers_recompute_without_counting_twice() -> None:
    """Replaying an MoE layer does not add its routed tokens or balancing loss again."""
    def run(**recompute):
        config = recompute_config("moe")
        config = config.updated(model=recompute)
        model = setup_rank(config)
        batches = rank_microbatches(RandomTokens(config.model.vocab_size, config.model.seq_length), 0, config,
                                    torch.device("cpu"))
        return train_step(model, batches, 1, config, torch.device("cpu"))
    reference = run()
    for recompute in ({"recompute_granularity": "selective", "recompute_modules": ["moe"]}, RECOMPUTE["full-uniform"]):
        result = run(**recompute)
        assert (result.loss, result.grad_norm, result.moe) == (reference.loss, reference.grad_norm, reference.moe)


@pytest.mark.parametrize("sp", [False, True], ids=["tp2", "tp2-sp"])
def test_dropout_masks_follow_the_tensor_parallel_regions(sp: bool) -> None:
    """Core attention (this rank's heads) draws differently on the two tp ranks; the hidden
    dropout on the residual stream draws alike without SP (the ranks hold the same tensor) and
    differently with it (each holds its own tokens)."""
    for rank in spawned():
        result = rank["masks"][sp]
        assert not result["attention_equal"]
        assert result["mask_equal"] is (not sp)
        assert 0.05 < result["mask_fraction"] < 0.2  # dropout 0.1 is on


def test_resume_with_dropout_is_bit_exact(tmp_path) -> None:
    """At tp 2 + SP with dropout: the model-parallel RNG's states are checkpointed, so the resumed
    steps draw the masks the uninterrupted run drew; the same seed gives the same run twice."""
    config = layout_config("llama", Layout(tp=2, sp=True), dropout=0.1)
    straight, again, _, resumed = run_on_ranks(train_jobs, 2, [(config, 4), (config, 4),
                                                               (config, 2, None, str(tmp_path)),
                                                               (config, 2, str(tmp_path))])[0]
    assert straight == again and resumed == straight[2:]


@pytest.mark.parametrize("flags, message", [
    (["--recompute-granularity", "full"], "--recompute-granularity full needs --recompute-method uniform or block"),
    (["--recompute-granularity", "full", "--recompute-method", "block"], "--recompute-num-layers=None must be"),
    (["--recompute-method", "uniform"], "need --recompute-granularity full"),
    (["--recompute-modules", "mlp"], "--recompute-modules needs --recompute-granularity selective"),
    (["--recompute-granularity", "selective", "--recompute-modules", "moe"], "--recompute-modules moe needs"),
])
def test_bad_recompute_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(flags)


def test_recompute_inside_compiled_layers() -> None:
    """--compile with full and with selective recomputation (torch.compile traces the replay and
    its RNG itself): without dropout, the losses of the compiled run without recomputation."""
    def losses(**recompute):
        config = tiny_config(model={"num_layers": 2, **recompute}, micro_batch_size=1, global_batch_size=2,
                             train_iters=2, compile=True)
        return run_steps(config, 2)["losses"]
    reference = losses()
    assert losses(**RECOMPUTE["selective"]) == reference and losses(**RECOMPUTE["full-uniform"]) == reference


def test_model_parallel_seeds_differ_by_tp_and_pp_rank() -> None:
    """The default generator: seed + 100 x pp rank; the tensor-parallel one: that + 2718 + tp rank."""
    from megatron_lite.tensor_parallel.random import get_rng_tracker, model_parallel_seed
    parallel_state.destroy_model_parallel()
    model_parallel_seed(1234, torch.device("cpu"))
    default = torch.rand(3)
    with get_rng_tracker().fork():
        split = torch.rand(3)
    torch.manual_seed(1234)
    assert torch.equal(default, torch.rand(3))
    torch.manual_seed(1234 + 2718)
    assert torch.equal(split, torch.rand(3))
