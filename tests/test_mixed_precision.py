"""Megatron mixed precision (--bf16, --fp16 with loss scaling), --compile and --overlap-param-gather.

On CPU: bf16 weights with fp32 main weights and grads, the loss close to fp32's, resume bit-exact
from the fp32 main weights a checkpoint keeps, the bytes per parameter of the start-up line; the
loss scaler's rules and the skipped steps of --fp16 (CPU runs fp16 matmuls, slowly, so the real
fp16 path is tested); compile against eager. One spawn of 2 ranks checks what needs several:
bf16 over dp with the distributed optimizer and over pp (activations sent in bf16), an overflow
on one rank skipping the step on all, and the parameter all-gather left in flight.
"""
from __future__ import annotations

import functools
import math

import pytest
import torch

from helpers.parity import setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.checkpointing import read_checkpoint
from megatron_lite.comm import METER
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.optimizer.loss_scaler import LossScaler
from megatron_lite.training.loop import pretrain, rank_microbatches, train_step
from megatron_lite.training.report import describe_memory

CPU = torch.device("cpu")


def test_dynamic_loss_scaler_backs_off_after_hysteresis_and_grows_after_a_window() -> None:
    scaler = LossScaler(2.0**10, min_scale=2.0**8, window=3, hysteresis=2)
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**10  # the first overflow is absorbed by the hysteresis
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**9
    scaler.update(found_inf=True)  # hysteresis spent: every overflow halves until a clean window
    assert scaler.scale == 2.0**8
    scaler.update(found_inf=True)
    assert scaler.scale == 2.0**8  # never below min_scale
    for _ in range(2):
        scaler.update(found_inf=False)
    assert scaler.scale == 2.0**8
    scaler.update(found_inf=False)  # the third clean step in a row completes the window
    assert scaler.scale == 2.0**9 and scaler.hysteresis_left == 2
    scaler.update(found_inf=False)
    scaler.update(found_inf=True)  # an overflow restarts the window
    scaler.update(found_inf=False)
    scaler.update(found_inf=False)
    assert scaler.scale == 2.0**9
    restored = LossScaler(1.0)
    restored.load_state_dict(scaler.state_dict())
    assert restored.state_dict() == scaler.state_dict()


def test_static_loss_scale_never_changes() -> None:
    scaler = LossScaler(128.0, dynamic=False)
    for found_inf in (True, True, False, True):
        scaler.update(found_inf)
    assert scaler.scale == 128.0


def test_bf16_trains_in_bf16_with_fp32_main_weights_and_matches_fp32(capsys) -> None:
    """20 steps on the built-in corpus: the loss falls well below its start, and bf16's last
    loss is within 2 % of fp32's (bf16 rounds each matmul's inputs to 8 mantissa bits; the
    measured difference is a fraction of that)."""
    config = tiny_config(bf16=True, train_iters=20, lr=3e-3, log_interval=20)
    model = setup_rank(config)
    assert {p.dtype for c in model.chunks for p in c.parameters()} == {torch.bfloat16}
    assert {t.main.dtype for t in model.optimizer.tensors} == {torch.float32}
    assert {p.main_grad.dtype for c in model.chunks for p in c.parameters()} == {torch.float32}
    assert "= 18.0 bytes per parameter (bfloat16 weights" in describe_memory(model, 1)
    fp32 = pretrain(tiny_config(train_iters=20, lr=3e-3, log_interval=20))["losses"]
    bf16 = pretrain(config)["losses"]
    assert fp32[-1] < 0.8 * fp32[0]
    assert abs(bf16[-1] - fp32[-1]) < 0.02 * fp32[-1], (bf16[-1], fp32[-1])
    assert "18.0 bytes per parameter" in capsys.readouterr().out


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precision_resume_is_bit_exact(tmp_path, precision: str) -> None:
    """The checkpoint keeps the fp32 main weights (and --fp16's loss scale): resuming continues
    exactly as the run that never stopped, which a resume from the rounded weights would not."""
    train = dict(train_iters=6, **{precision: True})
    if precision == "fp16":
        train.update(initial_loss_scale=2.0**12, loss_scale_window=2)  # the scale moves during the run
    straight = pretrain(tiny_config(**train))["losses"]
    pretrain(tiny_config(**train, exit_interval=3, save=str(tmp_path)))
    saved = read_checkpoint(tmp_path, 3)
    assert {t.dtype for t in saved.model.values() if t.is_floating_point()} == {torch.float32}
    assert (saved.loss_scaler is None) == (precision == "bf16")
    resumed = pretrain(tiny_config(**train, load=str(tmp_path)))["losses"]
    assert resumed == straight[3:]


def _poison_grads(model, steps: set[int], state: dict) -> None:
    """From now on, backward during the listed steps (state["step"]) gives one weight an
    infinite gradient."""
    param = next(p for c in model.chunks for p in c.parameters() if p.ndim > 1)
    param.register_hook(lambda g: g * math.inf if state["step"] in steps else g)


def test_fp16_skips_overflowing_steps_and_backs_off() -> None:
    """An inf in a gradient at step 2: that step leaves the weights (and the Adam state) as they
    were and halves the scale (hysteresis 1); the steps before and after update."""
    config = tiny_config(fp16=True, initial_loss_scale=1024.0, hysteresis=1, train_iters=3)
    model = setup_rank(config)
    assert {p.dtype for c in model.chunks for p in c.parameters()} == {torch.float16}
    state = {"step": 0}
    _poison_grads(model, {2}, state)
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    weights, results = [], []
    for step in (1, 2, 3):
        state["step"] = step
        before = [p.detach().clone() for c in model.chunks for p in c.parameters()]
        results.append(train_step(model, rank_microbatches(data, 0, config, CPU), step, config, CPU))
        weights.append(all(torch.equal(a, p)
                           for a, p in zip(before, (p for c in model.chunks for p in c.parameters()))))
    assert [r.skipped for r in results] == [False, True, False]
    assert weights == [False, True, False]
    assert not math.isfinite(results[1].grad_norm) and math.isfinite(results[2].grad_norm)
    assert model.optimizer.loss_scaler.scale == 512.0


def test_fp16_log_line_counts_skipped_iterations(capsys) -> None:
    """A start scale of 2^28 overflows fp16's grads (max 65504) until it has backed off."""
    result = pretrain(tiny_config(fp16=True, initial_loss_scale=2.0**28, hysteresis=1, train_iters=16, log_interval=16))
    line = [ln for ln in capsys.readouterr().out.splitlines() if "iteration       16/" in ln][0]
    skipped = int(line.split("number of skipped iterations:")[1].split("|")[0])
    scale = float(line.split("loss scale:")[1].split("|")[0])
    assert 0 < skipped < 16 and scale == 2.0 ** (28 - skipped)
    assert all(math.isfinite(loss) for loss in result["losses"])


def test_compile_matches_eager() -> None:
    eager = pretrain(tiny_config(train_iters=3))["losses"]
    compiled = pretrain(tiny_config(train_iters=3, compile=True))["losses"]
    assert compiled == pytest.approx(eager, rel=1e-5, abs=0)


def _two_rank_config(layout: Layout, **train):
    config = tiny_config(model=dict(num_layers=2), micro_batch_size=1, global_batch_size=4, train_iters=4, **train)
    config = config.updated(parallel={**layout.fields(), "ddp_bucket_size": 3000})  # several buckets
    return config


def _train(config, steps: int = 4, poison: set[int] = frozenset()) -> dict:
    model = setup_rank(config)
    state = {"step": 0}
    if poison and parallel_state.get_grid().rank == 1:  # an overflow on one rank only
        _poison_grads(model, poison, state)
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    METER.reset()
    losses, skipped, in_flight = [], [], []
    for step in range(1, steps + 1):
        state["step"] = step
        result = train_step(model, rank_microbatches(data, (step - 1) * 4, config, CPU), step, config, CPU)
        losses.append(result.loss)
        skipped.append(result.skipped)
        in_flight.append(sum(b.gather is not None for buf in model.grad_buffers for b in buf.buckets))
    sent = METER.total("send", "pp") / max(1, METER.calls.get(("send", "pp"), 0))
    return {"losses": losses, "skipped": skipped, "in_flight": in_flight, "bytes_per_send": sent,
            "memory": describe_memory(model, parallel_state.get_grid().size("dp")),
            "dtypes": {p.dtype for c in model.chunks for p in c.parameters()}}


def two_rank_worker() -> dict:
    return {"dp2-distopt-overlap": _train(_two_rank_config(Layout(dp=2, distopt=True, overlap=True), bf16=True)),
            "pp2": _train(_two_rank_config(Layout(pp=2), bf16=True)),
            "dp2-zero3": _train(_two_rank_config(Layout(dp=2, zero=3), bf16=True)),
            "fp16-dp2": _train(_two_rank_config(Layout(dp=2, distopt=True), fp16=True, initial_loss_scale=1024.0,
                                                hysteresis=1), poison={2})}


@functools.cache
def spawned() -> list[dict]:
    return run_on_ranks(two_rank_worker, 2)


@functools.cache
def single(**train) -> dict:
    return _train(_two_rank_config(Layout(), **train))


def test_bf16_over_dp_with_the_distributed_optimizer_and_overlapped_gather() -> None:
    """6 + 12/dp bytes per parameter; the losses of one bf16 device to bf16 rounding (the same
    microbatch sums in another order); the all-gather of every bucket still in flight after
    each step (waited for by the next forward's layers)."""
    ours = spawned()[0]["dp2-distopt-overlap"]
    assert "= 12.0 bytes per parameter" in ours["memory"] and ours["dtypes"] == {torch.bfloat16}
    assert ours["losses"] == pytest.approx(single(bf16=True)["losses"], rel=1e-2)
    assert min(ours["in_flight"]) > 0


def test_bf16_zero3_gathers_bf16_parameters() -> None:
    """ZeRO-3 in bf16: 18/dp bytes per parameter held (bf16 weight shards, fp32 grad, main and
    moment shards), and the losses of one bf16 device to bf16 rounding."""
    ours = spawned()[0]["dp2-zero3"]
    assert "= 9.0 bytes per parameter" in ours["memory"] and ours["dtypes"] == {torch.bfloat16}
    assert ours["losses"] == pytest.approx(single(bf16=True)["losses"], rel=1e-2)


def test_bf16_pipeline_sends_bf16_activations() -> None:
    results = spawned()
    assert results[0]["pp2"]["bytes_per_send"] == 2 * 1 * 16 * 32  # micro batch x seq x hidden, 2 bytes each
    assert results[0]["pp2"]["losses"] == results[1]["pp2"]["losses"]
    assert results[0]["pp2"]["losses"] == pytest.approx(single(bf16=True)["losses"], rel=1e-2)


def test_fp16_overflow_on_one_rank_skips_the_step_on_every_rank() -> None:
    for result in spawned():
        assert result["fp16-dp2"]["skipped"] == [False, True, False, False]
