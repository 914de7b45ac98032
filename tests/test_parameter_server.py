"""Parameter-server data parallelism (--data-parallel-mode parameter-server) against one device and
against all-reduce mode; its traffic against step_bytes, the optimizer state held by servers only,
checkpoints, and the combinations it refuses.

One spawn of 4 ranks; parity tolerances and their reasons: tests/helpers/parity.py.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from helpers.checkpoint_steps import layout_config, train
from helpers.parity import PARITY, assert_parity, merge_ranks, run_steps, setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.comm import METER
from megatron_lite.config import ConfigError
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.parameter_server import GRAD_NORM_BYTES, is_server, step_bytes
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.optimizer.optimizer import state_bytes
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import rank_microbatches, train_step
from megatron_lite.training.report import memory_parts

VOCAB = 258
STEPS = 4
BUCKET = 3000  # elements: several buckets even for the tiny model
# Each parameter-server layout with its family; the same layout in all-reduce mode runs beside it.
# tp 2: the servers' grad norm sums over tp; pp 2 with gpt2: over the stages and their tied embedding.
CASES = [(Layout(dp=4, ps=True), "llama"), (Layout(tp=2, dp=2, ps=True), "llama"),
         (Layout(pp=2, dp=2, ps=True), "gpt2")]


def ps_config(family: str, layout: Layout = Layout(), **train):
    # clip 0.5 is below these steps' grad norms: clipping is active in every step.
    config = tiny_config(family, model=dict(num_layers=4, vocab_size=VOCAB), micro_batch_size=1,
                         global_batch_size=8, train_iters=STEPS, clip_grad=0.5, **train)
    config = config.updated(parallel={**layout.fields(), "ddp_bucket_size": BUCKET})
    return config


def all_reduce_twin(layout: Layout) -> Layout:
    return dataclasses.replace(layout, ps=False)


def one_step_accounting() -> dict:
    """Meter counts, buffer bytes and optimizer memory of one bf16 step at dp 4 (bf16, so that the
    parameters sent, 2 bytes each, differ from the fp32 grads)."""
    config = ps_config("llama", Layout(dp=4, ps=True), bf16=True)
    model = setup_rank(config)
    batches = list(rank_microbatches(RandomTokens(VOCAB, config.model.seq_length), 0, config, torch.device("cpu")))
    METER.reset()
    train_step(model, batches, 1, config, torch.device("cpu"))
    return {"bytes": dict(METER.bytes), "calls": dict(METER.calls), "server": is_server(),
            "grad_bytes": sum(4 * buf.grad_data.numel() for buf in model.grad_buffers),
            "param_bytes": sum(buf.param_data.numel() * buf.param_data.element_size() for buf in model.grad_buffers),
            "buffers": len(model.grad_buffers), "params": sum(p.numel() for c in model.chunks for p in c.parameters()),
            "state": state_bytes(model.optimizer.optimizer), "memory": memory_parts(model)}


def resume(checkpoint: str) -> dict:
    """Losses of 4 steps straight, and of 2 steps resumed from a checkpoint saved after 2, in
    parameter-server mode; and the same checkpoint resumed in all-reduce mode."""
    config = layout_config("llama", Layout(dp=4, ps=True))
    straight = train(config, 4)
    train(config, 2, save=checkpoint)
    return {"straight": straight, "resumed": train(config, 2, load=checkpoint),
            "all-reduce": train(layout_config("llama", Layout(dp=4)), 2, load=checkpoint)}


def ps_worker(checkpoint: str) -> dict:
    results = {}
    for layout, family in CASES:
        results[layout] = run_steps(ps_config(family, layout), STEPS)
        results[all_reduce_twin(layout)] = run_steps(ps_config(family, all_reduce_twin(layout)), STEPS)
    results["offload"] = run_steps(ps_config("llama", Layout(dp=4, ps=True), optimizer_cpu_offload=True), STEPS)
    results["accounting"] = one_step_accounting()
    results["resume"] = resume(checkpoint)
    results["rank"] = parallel_state.get_grid().rank
    return results


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    return run_on_ranks(ps_worker, 4, str(tmp_path_factory.mktemp("ps") / "ckpt"))


@pytest.mark.parametrize("layout, family", CASES, ids=[layout.name for layout, _ in CASES])
def test_matches_single_device_and_all_reduce_mode(ranks: list[dict], layout: Layout, family: str) -> None:
    result = merge_ranks([r[layout] for r in ranks])
    assert_parity(run_steps(ps_config(family), STEPS), result, VOCAB)
    assert_parity(merge_ranks([r[all_reduce_twin(layout)] for r in ranks]), result, VOCAB)


def test_one_replica_is_plain_training() -> None:
    """dp 1: the server has no workers and nothing is sent; the run is one device's, bit for bit."""
    METER.reset()
    alone = run_steps(ps_config("llama", Layout(ps=True)), 2)
    assert METER.total(op="send") == 0
    single = run_steps(ps_config("llama"), 2)
    assert alone["losses"] == single["losses"] and alone["grad_norms"] == single["grad_norms"]


def test_optimizer_cpu_offload_changes_nothing(ranks: list[dict]) -> None:
    for rank in ranks:
        assert rank["offload"]["losses"] == rank[Layout(dp=4, ps=True)]["losses"]


def test_traffic_per_step_is_step_bytes(ranks: list[dict]) -> None:
    for rank in ranks:
        acc = rank["accounting"]
        assert acc["server"] == (rank["rank"] == 0)
        assert acc["param_bytes"] == acc["grad_bytes"] // 2  # bf16 parameters, fp32 grads, the same layout
        sent = step_bytes(acc["grad_bytes"], acc["param_bytes"], 4, acc["server"])
        # Only point-to-point sends on dp, no grad all-reduce; the step's loss (fp64) is still averaged over dp.
        assert acc["bytes"] == {("send", "dp"): sent, ("all_reduce", "dp"): 8}
        # The server: the norm and each buffer to each of 3 workers; a worker: each buffer once.
        assert acc["calls"][("send", "dp")] == (3 * (1 + acc["buffers"]) if acc["server"] else acc["buffers"])
    server, worker = ranks[0]["accounting"], ranks[1]["accounting"]
    assert step_bytes(server["grad_bytes"], server["param_bytes"], 4, True) == 3 * (server["param_bytes"]
                                                                                    + GRAD_NORM_BYTES)
    assert step_bytes(worker["grad_bytes"], worker["param_bytes"], 4, False) == worker["grad_bytes"]
    assert step_bytes(worker["grad_bytes"], worker["param_bytes"], 1, True) == 0


def test_only_the_server_holds_optimizer_state(ranks: list[dict]) -> None:
    for rank in ranks:
        acc = rank["accounting"]
        if acc["server"]:  # Adam's two fp32 moments and, under bf16, the fp32 main weights
            assert acc["state"] == 8 * acc["params"] == acc["memory"]["optimizer state"]
            assert acc["memory"]["main weights"] == 4 * acc["params"]
        else:
            assert acc["state"] == acc["memory"]["optimizer state"] == acc["memory"]["main weights"] == 0


def test_checkpoint_resumes_bit_exactly_and_in_all_reduce_mode(ranks: list[dict]) -> None:
    for rank in ranks:
        run = rank["resume"]
        assert run["resumed"] == run["straight"][2:]
        torch.testing.assert_close(run["all-reduce"], run["straight"][2:], rtol=PARITY.loss, atol=0)


@pytest.mark.parametrize("world, argv, message", [
    (4, ["--use-distributed-optimizer"], r"does not support --use-distributed-optimizer \(the server holds"),
    (4, ["--data-parallel-sharding-strategy", "optim_grads_params"],
     r"does not support --data-parallel-sharding-strategy=optim_grads_params"),
    (4, ["--use-distributed-optimizer", "--overlap-param-gather"], r"does not support --use-distributed-optimizer"),
    (4, ["--cp", "2"], r"does not support --context-parallel-size=2 \(the server averages grads over dp only"),
    (4, ["--model", "tiny-moe"], r"does not support --num-experts=8"),
    (4, ["--fp16"], r"does not support --fp16 \(loss scaling is not wired through the server; use --bf16\)"),
])
def test_unsupported_combinations_are_refused(monkeypatch, world: int, argv: list[str], message: str) -> None:
    monkeypatch.setenv("WORLD_SIZE", str(world))
    with pytest.raises(ConfigError, match=message) as refused:
        parse_args(["--data-parallel-mode", "parameter-server", "--micro-batch-size", "1", *argv])
    line = str(refused.value)
    assert "\n" not in line and line.startswith("--data-parallel-mode=parameter-server does not support ")
    assert line.endswith("drop it or use --data-parallel-mode=all-reduce")


def test_mode_flag_and_layout_name() -> None:
    with pytest.raises(ConfigError, match=r"--data-parallel-mode: invalid choice: 'ring'"):
        parse_args(["--data-parallel-mode", "ring"])
    assert parse_args([]).parallel.data_parallel_mode == "all-reduce"
    layout = Layout.parse("tp2-dp2-ps")
    assert layout == Layout(tp=2, dp=2, ps=True) and layout.name == "tp2-dp2-ps"
    assert layout.apply(parse_args([]).parallel).parameter_server
