"""Activation recomputation (--recompute-granularity full|selective) and the model-parallel RNG:
recomputing gives bit-identical losses, grads and weights, with dropout on and off, on one
device and at tp 2 + SP, pp 2 (1F1B), pp 2 x vpp 2 (interleaved) and cp 2; dropout masks agree
across tp ranks where the tensor is replicated and differ where it is split; resume with
dropout on is bit-exact. One spawn of 2 ranks runs the parallel cases.
"""
from __future__ import annotations

import dataclasses
import functools

import pytest
import torch

from helpers.checkpoint_steps import layout_config, train_jobs
from helpers.parity import run_steps, setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.comm import all_gather
from megatron_lite.config import ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.model.transformer import Attention, TransformerLayer
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


def recompute_config(family: str, layout: Layout = Layout(), dropout: bool = True, recompute: str | None = None):
    model = {"num_layers": 4, **(DROPOUT if dropout else {}), **RECOMPUTE.get(recompute, {})}
    if layout.cp > 1:  # context parallelism refuses attention dropout
        model["attention_dropout"] = 0.0
    config = tiny_config(family, model=model, micro_batch_size=1, global_batch_size=4, train_iters=STEPS)
    config = config.updated(parallel=layout.fields())
    return config


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


def recompute_worker() -> dict:
    results = {(layout, dropout, recompute): run_steps(recompute_config("llama", layout, dropout, recompute), STEPS)
               for layout in LAYOUTS for dropout in (False, True) for recompute in (None, *RECOMPUTE)}
    results["masks"] = {sp: _draws_in_attention_and_dropout(Layout(tp=2, sp=sp)) for sp in (False, True)}
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


def test_moe_layers_recompute_without_counting_twice() -> None:
    """Replaying an MoE layer does not add its routed tokens or balancing loss again."""
    moe = {"num_experts": 4, "moe_router_topk": 2, "moe_aux_loss_coeff": 1e-2}
    def run(**recompute):
        config = recompute_config("llama")
        config = config.updated(model={**moe, **recompute})
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
    (["--recompute-granularity", "selective", "--data-parallel-sharding-strategy", "optim_grads_params"],
     "not supported yet"),
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
