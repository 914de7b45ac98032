"""Multi-token prediction (--mtp-num-layers, --mtp-loss-scaling-factor).

In-process: the model's objective and per-module losses against a plain computation written
here (shifts, concatenation order, norms, the shared head, the weighting), their gradients
too; --mtp-num-layers 0 is the model without the flag, bit for bit; bad flags are refused.
Spawned (one spawn of two ranks): tp 2 + SP, pp 2 (untied and tied embedding), ZB-V, cp 2, dp 2
and dp 2 with ZeRO-3 with one module against one device in fp32 (lm and MTP losses, grads before clipping, grad
norms, weights; tolerances in tests/helpers/parity.py); a pp 2 checkpoint resumed there exactly
and loaded at one device; its Hugging Face export and generation without the modules.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helpers.checkpoint_steps import train, train_jobs
from helpers.parity import assert_parity, merge_ranks, run_steps
from helpers.tiny import TINY_FLAGS, tiny_config
from megatron_lite import parallel_state
from megatron_lite.config import ConfigError, ParallelConfig
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.hf.convert import load_safetensors
from megatron_lite.inference.generation import generate, load_model
from megatron_lite.inference.sampling import SamplingParams
from megatron_lite.model.fused_ops import lm_loss as fused_lm_loss
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.model.mtp import add_mtp_targets, mtp_loss_weights
from megatron_lite.model.ops import TORCH_OPS
from megatron_lite.pipeline_parallel.model_runner import ModelRunner, microbatch_loss
from megatron_lite.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron_lite.training.arguments import parse_args

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import convert_checkpoint  # noqa: E402

STEPS = 3
MTP = {"mtp_num_layers": 1}
TIED = {"untie_embeddings_and_output_weights": False}
# ZB-V: the last stage's chunk (the modules, the embedding's second copy) on the first stage's rank.
ZBV = (Layout(pp=2, vpp=2, schedule="zbv"), {"num_layers": 4})
CASES = [(Layout(tp=2, sp=True), {}), (Layout(pp=2), {}), (Layout(pp=2), TIED), (Layout(cp=2), {}), (Layout(dp=2), {}),
         (Layout(dp=2, zero=3), {}), ZBV]


def mtp_config(layout: Layout = Layout(), **model):
    config = tiny_config(model={**MTP, "seq_length": 16, **model}, micro_batch_size=1, global_batch_size=4,
                         train_iters=STEPS, clip_grad=0.5)
    return config.updated(parallel=layout.fields())


def _rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight


@pytest.mark.parametrize("fused_loss", [False, True], ids=["torch", "fused-loss"])
def test_objective_equals_a_plain_computation(fused_loss: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """Module k at position i: [enorm(embedding of token i+k); hnorm(previous depth's output)] -> eh_proj ->
    its transformer layer -> its final norm -> the shared head, scored against token i+k+1, averaged over the
    positions that have one; objective = lm loss + factor / N * sum of the modules' losses. Also with the
    fused linear cross-entropy kernel computing every loss (Triton, interpreted on CPU)."""
    depths, factor = 2, 0.3
    config = mtp_config(mtp_num_layers=depths, mtp_loss_scaling_factor=factor).model
    parallel_state.initialize_model_parallel(ParallelConfig())
    if fused_loss:
        monkeypatch.setenv("MEGATRON_LITE_TRITON", "1")
    model = GPTModel(config, ops=dataclasses.replace(TORCH_OPS, lm_loss=fused_lm_loss) if fused_loss else TORCH_OPS)
    init_weights(model, config, seed=5)
    sample = torch.randint(0, config.vocab_size, (2, config.seq_length + 1), generator=torch.Generator().manual_seed(0))
    batch = add_mtp_targets({"tokens": sample[:, :-1], "labels": sample[:, 1:],
                             "loss_mask": torch.ones(2, config.seq_length)}, depths)
    per_token = model(batch["tokens"], batch["labels"], mtp_tokens=batch["mtp_tokens"], mtp_labels=batch["mtp_labels"])
    masks = torch.cat([batch["loss_mask"].unsqueeze(-1), batch["mtp_loss_mask"]], dim=-1)
    objective, losses = microbatch_loss(per_token, masks, mtp_loss_weights(config, per_token.device))
    ours = torch.autograd.grad(objective, list(model.parameters()))

    # The reference: the main model's layers run by hand, the rest written out.
    eps, s = config.norm_epsilon, config.seq_length
    table, head = model.word_embeddings.weight, model.output_layer.weight[: config.vocab_size]  # not the pad rows
    rotary = (model.rotary_cos[:s], model.rotary_sin[:s])
    h = table[sample[:, :-1]]
    for layer in model.layers.values():
        h = layer(h, rotary)
    h = _rms(h, model.final_layernorm.weight, eps)
    reference = [F.cross_entropy((h @ head.t()).flatten(0, 1), sample[:, 1:].flatten())]
    for k, mtp in enumerate(model.mtp.layers, 1):
        ahead = torch.cat([sample[:, k:s], torch.zeros(2, k, dtype=sample.dtype)], dim=1)  # token i+k (0 past the end)
        x = torch.cat([_rms(table[ahead], mtp.enorm.weight, eps), _rms(h, mtp.hnorm.weight, eps)], dim=-1)
        h = _rms(mtp.transformer_layer(x @ mtp.eh_proj.weight.t(), rotary), mtp.final_layernorm.weight, eps)
        logits = (h @ head.t())[:, : s - k]  # the last k positions have no token k+1 ahead
        reference.append(F.cross_entropy(logits.flatten(0, 1), sample[:, k + 1:].flatten()))
    expected = reference[0] + factor / depths * sum(reference[1:])
    torch.testing.assert_close(losses, torch.stack(reference).detach(), rtol=1e-6, atol=0)
    torch.testing.assert_close(objective, expected, rtol=1e-6, atol=0)
    for name, mine, theirs in zip(dict(model.named_parameters()), ours,
                                  torch.autograd.grad(expected, list(model.parameters()))):
        torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-7, msg=name)


def test_zero_layers_is_the_model_without_the_flag() -> None:
    zero, unset = run_steps(mtp_config(mtp_num_layers=0), 2), run_steps(mtp_config(mtp_num_layers=None), 2)
    assert zero["losses"] == unset["losses"] and zero["grad_norms"] == unset["grad_norms"] and not zero["mtp_losses"]
    assert zero["weights"].keys() == unset["weights"].keys()
    assert all(torch.equal(zero["weights"][name], unset["weights"][name]) for name in zero["weights"])


@pytest.mark.parametrize("flags, message", [
    (["--mtp-num-layers", "16"], r"--mtp-num-layers=16 must be below --seq-length=16"),
    (["--mtp-num-layers", "-1"], r"--mtp-num-layers=-1 must be below"),
    (["--mtp-num-layers", "1", "--mtp-loss-scaling-factor", "-0.1"], r"--mtp-loss-scaling-factor=-0.1 must be >= 0"),
    (["--mtp-num-layers", "1", "--family", "gpt2"], r"--mtp-num-layers is for the llama family"),
])
def test_bad_mtp_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_args(TINY_FLAGS + flags, world_size=1)


def test_per_token_loss_divides_every_module_by_the_lm_tokens() -> None:
    """--calculate-per-token-loss with modules (Megatron's): the objective is (lm loss sum + f/N x each module's loss
    sum) / the global batch's unmasked lm tokens, over microbatches with unequal masks; its grads are that sum's."""
    depths, factor = 2, 0.3
    config = mtp_config(mtp_num_layers=depths, mtp_loss_scaling_factor=factor).model
    parallel_state.initialize_model_parallel(ParallelConfig())
    sample = torch.randint(0, config.vocab_size, (4, config.seq_length + 1), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(4, config.seq_length)
    mask[0, 5:] = 0
    batches = [add_mtp_targets({"tokens": sample[i:i + 2, :-1], "labels": sample[i:i + 2, 1:],
                                "loss_mask": mask[i:i + 2]}, depths) for i in (0, 2)]
    model = GPTModel(config, ops=TORCH_OPS)
    init_weights(model, config, seed=5)
    runner = ModelRunner([model], batches, 2, (), torch.device("cpu"), per_token_loss=True)
    forward_backward_no_pipelining(runner, 2)
    ours = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    weights = mtp_loss_weights(config, torch.device("cpu"))
    total = sum((model(b["tokens"], b["labels"], mtp_tokens=b["mtp_tokens"], mtp_labels=b["mtp_labels"])
                 * torch.cat([b["loss_mask"].unsqueeze(-1), b["mtp_loss_mask"]], dim=-1)).sum((0, 1)) for b in batches)
    objective = (total * weights).sum() / mask.sum()
    objective.backward()
    objective = objective.detach()
    reported = sum(runner.losses) / 2 + factor / depths * sum(sum(m) for m in runner.mtp_losses) / 2
    assert float(reported) == pytest.approx(objective.item(), rel=1e-6)
    for a, p in zip(ours, model.parameters()):
        torch.testing.assert_close(a, p.grad, rtol=1e-5, atol=1e-7)


def mtp_worker(saved: str) -> dict:
    results = {(layout, tuple(model.items())): run_steps(mtp_config(layout, **model), STEPS)
               for layout, model in CASES}
    # At pp 2: four steps straight; two steps saved, then resumed for two.
    pp2 = mtp_config(Layout(pp=2))
    results["checkpoint"] = train_jobs([(pp2, 4), (pp2, 2, None, saved), (pp2, 2, saved)])
    return results


@pytest.fixture(scope="module")
def spawned(tmp_path_factory: pytest.TempPathFactory) -> dict:
    saved = tmp_path_factory.mktemp("mtp") / "pp2"
    ranks = run_on_ranks(mtp_worker, 2, str(saved))
    merged = {key: merge_ranks([r[key] for r in ranks]) for key in ranks[0] if key != "checkpoint"}
    return {**merged, "checkpoint": ranks[0]["checkpoint"], "saved": saved}


@functools.cache
def single(model: tuple) -> dict:
    return run_steps(mtp_config(**dict(model)), STEPS)


@pytest.mark.parametrize("layout, model", CASES,
                         ids=[layout.name + ("-tied" if m == TIED else "") for layout, m in CASES])
def test_layouts_match_single_device(spawned: dict, layout: Layout, model: dict) -> None:
    result = spawned[(layout, tuple(model.items()))]
    reference = single(tuple(model.items()))
    assert len(result["mtp_losses"]) == STEPS and result["mtp_losses"] != result["losses"]
    assert_parity(reference, result, 258)


def test_checkpoints_resume_exactly_and_reshard(spawned: dict) -> None:
    """Saved at pp 2 (the modules and the embedding's copy on the last stage): resumed there
    bit-identically; loaded at one device, the next steps' losses are the same to 1e-5."""
    straight, first, resumed = spawned["checkpoint"]
    assert first == straight[:2] and resumed == straight[2:]
    assert train(mtp_config(), 2, str(spawned["saved"])) == pytest.approx(straight[2:], rel=1e-5)


def test_export_and_generation_leave_the_modules_out(spawned: dict, tmp_path, capsys) -> None:
    assert convert_checkpoint.main(["to-hf", "--load", str(spawned["saved"]), "--out", str(tmp_path)]) == 0
    assert "left out the 1 multi-token prediction module(s) (mtp.layers.*)" in capsys.readouterr().out
    assert not [name for name in load_safetensors(tmp_path) if "mtp" in name]
    for path in (spawned["saved"], tmp_path):
        model, _ = load_model(path)
        assert model.mtp is None
        assert len(generate(model, [1, 2, 3], 5, SamplingParams(greedy=True), 256)) == 5
