"""--bf16 and --fp16 training against fp32 on the same batches, and the loss scaler end to end.

Each precision trains the tiny llama for a few steps from the same fp32 initialisation, at one
device and at tp 2 + SP x pp 2 x dp 2 with the distributed optimizer, clipping off and on
(--clip-grad 1.0 clips most steps here: the grad norm is about 1.1). The optimizer keeps fp32
main weights; those are compared with fp32's.

Why the tolerances are what they are. A format with a p-bit significand rounds each value to a
relative error of at most its unit roundoff u = 2^-p: bf16 u = 2^-8 = 3.9e-3, fp16 u = 2^-11 =
4.9e-4. Every matmul reads inputs rounded to u (and fp16's gradients are scaled before backward
and unscaled in fp32 after it), so:
- the grad norm, a root of a sum of squares of gradients each off by a few u in random directions,
  is off by at most u relative (measured: bf16 u/9, fp16 u/4);
- the loss, a mean over every token of a log-softmax, averages those errors out: allowed u/8
  (measured: bf16 u/120, fp16 u/160);
- the fp32 main weights: each step's update is off by the error of its gradient, so the
  difference from fp32's weights is a few u of the distance the weights moved: allowed 8u
  (measured 2u for both).
A gradient handed to the optimizer unscaled (65,536 or here 4,096 times too large), unscaled twice,
or unscaled by twice the scale misses these by factors: its grad norm is off by 50 % or more.
AdamW is almost invariant to a constant gradient scale, which is how such a bug hides; its eps
(1e-3 here, a value that matters next to gradients of about 1e-3) and clipping make the update
depend on the scale, so the loss and weights show it as well. Weight decay is 1.0 (decoupled, as
in Megatron: a wrong gradient scale shifts the balance between the decay and the Adam step).
"""
from __future__ import annotations

import functools
import json
import math
from pathlib import Path

import pytest
import torch

import megatron_lite.training.loop as training
from helpers.parity import merge_tensors, setup_rank
from helpers.tiny import tiny_config
from megatron_lite import parallel_state
from megatron_lite.config import Config
from megatron_lite.config.layout import Layout
from megatron_lite.data.random_tokens import RandomTokens
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.placement import gather_full

CPU = torch.device("cpu")
UNIT_ROUNDOFF = {"bf16": 2.0**-8, "fp16": 2.0**-11}
STEPS = 4
CLIPS = (0.0, 1.0)
LOSS_SCALE = 2.0**12  # fp16's start scale: large enough to matter, small enough not to overflow here
DISTRIBUTED = Layout(tp=2, pp=2, dp=2, sp=True, distopt=True)


def precision_config(layout: Layout, precision: str, clip: float, family: str = "llama", **train) -> Config:
    flags = {"bf16": {"bf16": True}, "fp16": {"fp16": True, "initial_loss_scale": LOSS_SCALE}}.get(precision, {})
    config = tiny_config(family, micro_batch_size=1, global_batch_size=4, train_iters=STEPS, lr=1e-2, min_lr=1e-3,
                         weight_decay=1.0, adam_eps=1e-3, clip_grad=clip, **flags, **train)
    return config.updated(parallel=layout.fields())


def _main_weights(model) -> dict[str, torch.Tensor]:
    """The optimizer's fp32 main weights, full over tp, by global name (collective under distopt)."""
    main = model.optimizer.main_weights()
    return {n: gather_full(p, main[p]) for chunk in model.chunks for n, p in chunk.named_parameters()}


def run_precision(layout: Layout, precision: str, clip: float, family: str = "llama") -> dict:
    """Losses, grad norms and fp32 main weights (before and after) of STEPS steps, on this rank."""
    config = precision_config(layout, precision, clip, family)
    model = setup_rank(config)
    initial = _main_weights(model)
    data = RandomTokens(config.model.vocab_size, config.model.seq_length)
    losses, norms = [], []
    for step in range(1, STEPS + 1):
        batches = training.rank_microbatches(data, (step - 1) * config.train.global_batch_size, config, CPU)
        result = training.train_step(model, batches, step, config, CPU)
        assert not result.skipped, (precision, step)
        losses.append(result.loss)
        norms.append(result.grad_norm)
    return {"losses": losses, "grad_norms": norms, "initial": initial, "weights": _main_weights(model),
            "model_dtypes": {p.dtype for c in model.chunks for p in c.parameters()},
            "main_dtypes": {t.main.dtype for t in model.optimizer.tensors}}


def assert_close_to_fp32(fp32: dict, ours: dict, precision: str, vocab_size: int) -> None:
    u = UNIT_ROUNDOFF[precision]
    assert ours["main_dtypes"] == {torch.float32}
    assert ours["model_dtypes"] == {torch.bfloat16 if precision == "bf16" else torch.float16}
    loss = max(abs(a - b) / a for a, b in zip(fp32["losses"], ours["losses"]))
    norm = max(abs(a - b) / a for a, b in zip(fp32["grad_norms"], ours["grad_norms"]))
    # Padded vocabulary rows differ per tp size and are never trained: not compared.
    rows = {n: slice(0, vocab_size) for n in fp32["weights"]}
    moved = math.sqrt(sum((fp32["weights"][n][rows[n]] - fp32["initial"][n][rows[n]]).square().sum().item()
                          for n in fp32["weights"]))
    apart = math.sqrt(sum((ours["weights"][n][rows[n]] - fp32["weights"][n][rows[n]]).square().sum().item()
                          for n in fp32["weights"]))
    assert norm <= u, f"{precision} grad norms {ours['grad_norms']} vs fp32 {fp32['grad_norms']}: {norm:.2e} > u"
    assert loss <= u / 8, f"{precision} losses {ours['losses']} vs fp32 {fp32['losses']}: {loss:.2e} > u/8"
    assert apart <= 8 * u * moved, f"{precision} main weights {apart / moved:.2e} of the distance moved > 8u"


@functools.cache
def single(precision: str, clip: float, family: str = "llama") -> dict:
    return run_precision(Layout(), precision, clip, family)


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_single_device_half_precision_matches_fp32(precision: str, clip: float) -> None:
    # The same start: the main weights are copies of the half-precision model's, fp32's initialisation rounded.
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    for name, tensor in single("fp32", clip)["initial"].items():
        assert torch.equal(tensor.to(dtype).float(), single(precision, clip)["initial"][name]), name
    assert_close_to_fp32(single("fp32", clip), single(precision, clip), precision, tiny_config().model.vocab_size)


# --- the loss scaler end to end: an inf in one gradient on one rank, through pretrain --------
POISONED_RANK, POISONED_STEPS = 5, {2, 3}


def _poisoning(state: dict):
    """training.parallelize and training.train_step wrapped, for pretrain on the poisoned rank: the
    first matrix's gradient is inf during POISONED_STEPS; each rank records its fp32 main weights
    and Adam state before and after every step, and the loss scale after it."""
    parallelize, train_step = training.parallelize, training.train_step

    def poisoned_parallelize(config, device):
        model = parallelize(config, device)
        if parallel_state.get_grid().rank == POISONED_RANK:
            param = next(p for c in model.chunks for p in c.parameters() if p.ndim > 1)
            param.register_hook(lambda g: g * math.inf if state["step"] in POISONED_STEPS else g)
        return model

    def recorded_train_step(model, microbatches, iteration, config, device, *args, **kwargs):
        state["step"] = iteration
        before = _optimizer_state(model)
        result = train_step(model, microbatches, iteration, config, device, *args, **kwargs)
        state["steps"].append({"unchanged": _same(before, _optimizer_state(model)), "skipped": result.skipped,
                               "scale": model.optimizer.loss_scaler.scale})
        return result
    return poisoned_parallelize, recorded_train_step


def _optimizer_state(model) -> list[torch.Tensor]:
    """This rank's fp32 main weights, model weights and Adam moments and step counts (copies)."""
    tensors = [t.main for t in model.optimizer.tensors] + [p for c in model.chunks for p in c.parameters()]
    for state in model.optimizer.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v)]
    return [t.detach().clone() for t in tensors]


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


def overflow_run(log_dir: str) -> dict:
    """pretrain at the distributed layout in fp16 (hysteresis 2), an inf on one rank at steps 2 and 3."""
    config = precision_config(DISTRIBUTED, "fp16", 1.0, hysteresis=2, log_interval=STEPS, log_dir=log_dir)
    state = {"step": 0, "steps": []}
    training.parallelize, training.train_step = _poisoning(state)
    training.pretrain(config)
    records = [json.loads(line) for line in Path(log_dir, "metrics.jsonl").read_text().splitlines()] \
        if parallel_state.get_grid().rank == 0 else None
    return {"steps": state["steps"], "records": records}


def distributed_worker(log_dir: str) -> dict:
    runs = {(precision, clip): run_precision(DISTRIBUTED, precision, clip)
            for precision in ("fp32", "bf16", "fp16") for clip in CLIPS}
    # gpt2's tied embedding: its copies on the first and last stage hold partial grads to sum.
    runs["gpt2"] = run_precision(DISTRIBUTED, "bf16", 1.0, "gpt2")
    runs["overflow"] = overflow_run(log_dir)
    return runs


@pytest.fixture(scope="module")
def distributed(tmp_path_factory: pytest.TempPathFactory) -> list[dict]:
    return run_on_ranks(distributed_worker, DISTRIBUTED.world_size, str(tmp_path_factory.mktemp("overflow")))


def _merged(ranks: list[dict], key) -> dict:
    """One result from every rank's: the same losses and norms everywhere, the weights merged."""
    for result in ranks:
        assert result[key]["losses"] == ranks[0][key]["losses"], key
        assert result[key]["grad_norms"] == ranks[0][key]["grad_norms"], key
    return {**ranks[0][key], **{part: merge_tensors([r[key][part] for r in ranks]) for part in ("initial", "weights")}}


@pytest.mark.parametrize("clip", CLIPS)
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_distributed_half_precision_matches_single_device_fp32(distributed: list[dict], precision: str,
                                                                 clip: float) -> None:
    """tp 2 + SP x pp 2 x dp 2 with the distributed optimizer, in half precision, against one fp32 device."""
    vocab = tiny_config().model.vocab_size
    assert_close_to_fp32(single("fp32", clip), _merged(distributed, (precision, clip)), precision, vocab)
    # And the layout's own fp32 run against one device, so the comparison above measures precision alone.
    fp32 = _merged(distributed, ("fp32", clip))
    assert fp32["losses"] == pytest.approx(single("fp32", clip)["losses"], rel=1e-6)


def test_distributed_bf16_sums_the_partial_grads_of_replicated_weights(distributed: list[dict]) -> None:
    """Under bf16 a parameter's grad lives in the fp32 buffer only (its bf16 .grad is freed as it is
    added there): the sums of partial grads (norm weights under SP, gpt2's tied embedding on the
    first and last stage) must read it, or the copies drift apart (merge_tensors checks they agree)."""
    vocab = tiny_config("gpt2").model.vocab_size
    assert_close_to_fp32(single("fp32", 1.0, "gpt2"), _merged(distributed, "gpt2"), "bf16", vocab)


def test_overflow_on_one_rank_skips_the_step_everywhere_and_backs_off_after_the_hysteresis(
        distributed: list[dict]) -> None:
    """Steps 2 and 3 overflow on one rank of eight: every rank skips both, its weights, main weights
    and Adam state bit for bit as they were; the scale holds at the first overflow (hysteresis 2)
    and halves at the second; the log counts 2 skipped iterations; steps 1 and 4 update."""
    for rank in distributed:
        steps = rank["overflow"]["steps"]
        assert [s["skipped"] for s in steps] == [False, True, True, False]
        assert [s["unchanged"] for s in steps] == [False, True, True, False]
        assert [s["scale"] for s in steps] == [LOSS_SCALE, LOSS_SCALE, LOSS_SCALE / 2, LOSS_SCALE / 2]
    (record,) = [r for r in distributed[0]["overflow"]["records"] if r.get("iteration") == STEPS]
    assert record["skipped_iterations"] == 2 and record["loss_scale"] == LOSS_SCALE / 2


def test_unscaled_grad_norm_equals_fp32(distributed: list[dict]) -> None:
    """Step 1 starts from the same weights in both: the norm fp16 reports after unscaling is fp32's
    to fp16's rounding, at one device and at the distributed layout."""
    fp32 = single("fp32", 1.0)["grad_norms"][0]
    for fp16 in (single("fp16", 1.0)["grad_norms"][0], distributed[0][("fp16", 1.0)]["grad_norms"][0]):
        assert abs(fp16 - fp32) <= UNIT_ROUNDOFF["fp16"] * fp32, (fp16, fp32)
