"""The zero-bubble schedules ZB-H1 and ZB-V (pipeline_parallel/zero_bubble.py) and the split
backward they run on (split_backward.py).

Under the cost model with F = B = W: every pass runs once, in the schedule's order, after its
inputs exist; the bubble is a third of 1F1B's (ZB-H1) or a sixth (ZB-V), as the planner says;
the microbatches in flight are the planner's and no more than 1F1B's first stage holds. On the
model: B then W give one backward's gradients exactly, and training under both schedules
matches one device at pp 2 and 4, with tp 2 + SP, with dp 2 + the distributed optimizer (whose
bucket reductions start during the W passes), ZB-H1 also with recomputation and experts, both
families (gpt2's tied embedding: under ZB-V both copies on rank 0). One spawn each of 2 and 4 ranks.
"""
from __future__ import annotations

import functools

import pytest
import torch

from helpers.graph import graph_nodes
from helpers.parity import assert_parity, merge_ranks, run_steps
from helpers.tiny import tiny_config, tiny_model
from megatron_lite import parallel_state
from megatron_lite.config import ParallelConfig
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.data_parallel import DataParallelGrads
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.pipeline_parallel.partition import virtual_stage
from megatron_lite.pipeline_parallel.schedules import run_schedule
from megatron_lite.pipeline_parallel.split_backward import backward_input
from megatron_lite.pipeline_parallel.trace import CostModelRunner, Trace, bubble_fraction, peak_in_flight
from megatron_lite.pipeline_parallel.zero_bubble import zb_h1_order, zbv_order
from megatron_lite.planner.schedule import bubble_fraction as planned_bubble
from megatron_lite.planner.schedule import peak_in_flight as planned_peak

FAMILIES = ("llama", "gpt2")
VOCAB = 258
STEPS = 3
# (layout, model overrides): what ZB-H1 must train exactly as one device does.
CASES = [
    (Layout(pp=2, schedule="zb-h1"), {}),
    (Layout(pp=2, schedule="zb-h1"), {"recompute_granularity": "full", "recompute_method": "uniform",
                                      "recompute_num_layers": 1}),
    (Layout(pp=2, schedule="zb-h1"), {"num_experts": 4, "moe_router_topk": 2, "moe_ffn_hidden_size": 32,
                                      "moe_aux_loss_coeff": 1e-2}),
    (Layout(pp=4, schedule="zb-h1"), {}),
    (Layout(tp=2, pp=2, sp=True, schedule="zb-h1"), {}),
    (Layout(pp=2, dp=2, distopt=True, schedule="zb-h1"), {}),
    (Layout(pp=2, vpp=2, schedule="zbv"), {}),
    (Layout(pp=4, vpp=2, schedule="zbv"), {}),
    (Layout(tp=2, pp=2, vpp=2, sp=True, schedule="zbv"), {}),
    (Layout(pp=2, vpp=2, dp=2, distopt=True, schedule="zbv"), {}),
]


def case_id(layout: Layout, model: dict) -> str:
    return layout.name + ("-" + "-".join(sorted(model))[:24] if model else "")


def config_of(family: str, layout: Layout, model: dict):
    config = tiny_config(family, model=dict(num_layers=8, vocab_size=VOCAB, **model), micro_batch_size=1,
                         global_batch_size=8, train_iters=STEPS)
    config = config.updated(parallel=layout.fields())
    return config


def cost_model_settings(p: int, schedule: str = "zb-h1") -> list[int]:
    """Microbatch counts: fewer than stages too; ZB-V needs 2p-1 to fill its V."""
    return [2 * p - 1, 2 * p, 3 * p] if schedule == "zbv" else [1, p - 1, p, 2 * p, 2 * p + 1, 3 * p]


def worker(world: int) -> dict:
    results: dict = {}
    if world in (2, 4):  # a pipeline of world ranks under the cost model: F = B = W (per chunk under ZB-V)
        for schedule, vpp in (("1f1b", 1), ("zb-h1", 1), ("zbv", 2)):
            parallel_state.initialize_model_parallel(ParallelConfig(
                pipeline_model_parallel_size=world, pipeline_schedule=schedule,
                virtual_pipeline_model_parallel_size=vpp if vpp > 1 else None))
            every = set(cost_model_settings(world)) | set(cost_model_settings(world, "zbv"))
            for m in sorted(cost_model_settings(world, "zbv") if schedule == "zbv" else every):
                trace = Trace(parallel_state.get_grid().rank)
                run_schedule(CostModelRunner(trace, 1.0 / vpp, 2.0 / vpp, 1.0 / vpp), schedule, m, vpp)
                results[schedule, m] = trace.events
    launched = []  # per finish_grad_sync, each bucket: (its reduction already started, deferred)
    original = DataParallelGrads.finish_grad_sync

    def recording(self) -> None:
        launched.append([(b.launched, b.deferred) for b in self.buckets if not b.shard_grads])
        original(self)
    DataParallelGrads.finish_grad_sync = recording
    try:
        for layout, model in CASES:
            if layout.world_size == world:
                for family in FAMILIES:
                    launched.clear()
                    run = run_steps(config_of(family, layout, model), STEPS)
                    results[case_id(layout, model), family] = {**run, "launched": list(launched)}
    finally:
        DataParallelGrads.finish_grad_sync = original
    return results


@functools.cache
def spawned(world: int) -> list[dict]:
    return run_on_ranks(worker, world, world)


@functools.cache
def reference(family: str, model: tuple) -> dict:
    return run_steps(config_of(family, Layout(), dict(model)), STEPS)


ORDERS = {"zb-h1": zb_h1_order, "zbv": zbv_order}
# Idle time over busy time with F = B = W: (p-1)(F+B-W) over m(F+B+W) for ZB-H1, a third of
# 1F1B's (p-1)/m; ZB-V's V halves it again.
BUBBLES = {"1f1b": 1, "zb-h1": 3, "zbv": 6}


@pytest.mark.parametrize("p", [2, 4])
@pytest.mark.parametrize("schedule", ["zb-h1", "zbv"])
def test_zero_bubble_under_the_cost_model(schedule: str, p: int) -> None:
    ranks = spawned(p)
    vpp = 2 if schedule == "zbv" else 1
    for m in cost_model_settings(p, schedule):
        events = [e for r in ranks for e in r[schedule, m]]
        one_f_one_b = [e for r in ranks for e in r["1f1b", m]]
        # Each event's virtual stage, and when each (kind, stage, microbatch) ended.
        stage = {e: virtual_stage(p, e.rank, e.chunk, schedule == "zbv") for e in events}
        ended = {(e.kind, stage[e], e.microbatch): e.end for e in events}
        for rank in range(p):
            mine = [e for e in events if e.rank == rank]
            assert [(e.kind, stage[e], e.microbatch) for e in mine] == ORDERS[schedule](p, rank, m)
            for e in mine:  # every pass after what it reads: the previous stage's F, the next stage's B
                if e.kind == "F" and stage[e] > 0:
                    assert e.start >= ended["F", stage[e] - 1, e.microbatch]
                if e.kind == "B" and stage[e] < p * vpp - 1:
                    assert e.start >= ended["B", stage[e] + 1, e.microbatch]
            # An activation lives from F to W: the planner's count, and no more than 1F1B's first
            # stage holds (p microbatches; ZB-V's passes are half a stage each).
            assert peak_in_flight(events, rank) == planned_peak(schedule, p, rank, vpp, m)
            assert peak_in_flight(events, rank) <= vpp * peak_in_flight(one_f_one_b, 0) == vpp * min(p, m)
        assert bubble_fraction(events) < bubble_fraction(one_f_one_b)
        if m >= p:
            for name, chunks, trace in ((schedule, vpp, events), ("1f1b", 1, one_f_one_b)):
                assert bubble_fraction(trace) == pytest.approx((p - 1) / (BUBBLES[name] * m), abs=1e-12)
                assert bubble_fraction(trace) == pytest.approx(planned_bubble(p, chunks, m, name), abs=1e-12)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("layout, model", CASES, ids=[case_id(*c) for c in CASES])
def test_zero_bubble_matches_one_device(layout: Layout, model: dict, family: str) -> None:
    ranks = spawned(layout.world_size)
    assert_parity(reference(family, tuple(sorted(model.items()))),
                  merge_ranks([r[case_id(layout, model), family] for r in ranks]), VOCAB)
    if layout.dp > 1:
        # The last W of each chunk starts its buckets' reductions, as the last backward does under
        # 1F1B: when the schedule ends every bucket is in flight but those deferred until the
        # partial grads of a tied embedding's copies are summed.
        for r in ranks:
            launched = [bucket for step in r[case_id(layout, model), family]["launched"] for bucket in step]
            assert launched and all(started != deferred for started, deferred in launched)


def _split_matches_one_backward(config, tokens: torch.Tensor, hidden: torch.Tensor) -> set[str]:
    """B then W on a last stage fed `hidden`: the input's and every weight's gradient of one
    backward, bit for bit, with B alone leaving the weights' gradients untouched. Returns the
    names of the autograd nodes the split ran through."""
    model = GPTModel(config, pre_process=False, post_process=True)
    init_weights(model, config, 0)

    def forward() -> tuple[torch.Tensor, torch.Tensor]:
        x = hidden.clone().requires_grad_()
        return x, model(tokens=tokens, labels=tokens, hidden=x).mean()
    x, loss = forward()
    loss.backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    x2, loss = forward()
    nodes = graph_nodes(loss)
    input_grad, weights = backward_input(loss, None, x2, list(model.parameters()))
    assert torch.equal(input_grad, x.grad) and all(p.grad is None for p in model.parameters())
    weights.run()
    for name, p in model.named_parameters():
        assert torch.equal(p.grad, expected[name]), name
    return nodes


@pytest.mark.parametrize("family", FAMILIES)
def test_split_backward_gives_one_backwards_gradients(family: str) -> None:
    """With full recomputation, which B and W both replay."""
    config = tiny_model(family, recompute_granularity="full", recompute_method="uniform", recompute_num_layers=1)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    _split_matches_one_backward(config, tokens, torch.randn(2, 16, config.hidden_size,
                                                            generator=torch.Generator().manual_seed(1)))


@pytest.mark.parametrize("family", FAMILIES)
def test_split_backward_through_the_fused_kernels(force_triton: None, family: str) -> None:
    """The Triton kernels (under the interpreter), custom autograd Functions that B and W both run."""
    config = tiny_model(family, hidden_size=64, num_query_groups=2 if family == "llama" else 4, fused_kernels=True)
    tokens = torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(0))
    nodes = _split_matches_one_backward(config, tokens,
                                        torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)))
    assert {"RowNormFunctionBackward", "FlashAttentionFunctionBackward",
            "FusedLinearCrossEntropyFunctionBackward"} <= nodes
