"""The training loop: learning, determinism, gradient accumulation, resume, lr schedule, MFU formula."""
from __future__ import annotations

import math
import os
import signal

import pytest
import torch

import megatron_lite.training.loop as training
from helpers.tiny import tiny_config, tiny_model
from megatron_lite.config import ConfigError, TrainConfig, TrainingError
from megatron_lite.data.loader import microbatch_indices
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.optimizer.lr_schedule import learning_rate
from megatron_lite.optimizer.optimizer import LocalOptimizer
from megatron_lite.pipeline_parallel.model_runner import ModelRunner
from megatron_lite.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron_lite.planner.flops import flops_per_step
from megatron_lite.planner.hardware import peak_tflops
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import pretrain, select_device


def _fixed_batch(config, batch_size: int, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    data = torch.randint(0, config.vocab_size, (batch_size, config.seq_length + 1), generator=gen)
    return {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": torch.ones(batch_size, config.seq_length)}


def accumulate(model: GPTModel, batches: list[dict[str, torch.Tensor]]) -> float:
    """Forward and backward every microbatch into the grads; the mean microbatch loss."""
    runner = ModelRunner([model], batches, len(batches), (), torch.device("cpu"))
    forward_backward_no_pipelining(runner, len(batches))
    return float(sum(runner.losses)) / len(batches)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_overfits_a_fixed_batch(family: str) -> None:
    config = tiny_config(family, lr=3e-3)
    model = GPTModel(config.model)
    init_weights(model, config.model, seed=0)
    optimizer = LocalOptimizer([model], config.train)
    batch = _fixed_batch(config.model, 4)
    losses = []
    for _ in range(40):
        optimizer.optimizer.zero_grad()
        losses.append(accumulate(model, [batch]))
        optimizer.step()
    assert losses[-1] < 0.5 * losses[0], losses


def test_gradient_accumulation_equals_one_big_batch() -> None:
    config = tiny_model("llama")
    big = _fixed_batch(config, 8)
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in range(0, 8, 2)]
    grads = []
    for batches in ([big], micro):
        model = GPTModel(config)
        init_weights(model, config, seed=0)
        loss = accumulate(model, batches)
        grads.append((loss, [p.grad.clone() for p in model.parameters()]))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-6)
    for a, b in zip(grads[0][1], grads[1][1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_same_seed_gives_bit_identical_losses() -> None:
    first = pretrain(tiny_config(train_iters=4))["losses"]
    second = pretrain(tiny_config(train_iters=4))["losses"]
    other = pretrain(tiny_config(train_iters=4, seed=7))["losses"]
    assert first == second
    assert first != other


def test_resume_continues_bit_identically(tmp_path) -> None:
    """With dropout on, the resumed steps draw the same masks only if the RNG state was restored."""
    dropout = {"hidden_dropout": 0.1, "attention_dropout": 0.1}
    straight = pretrain(tiny_config(train_iters=6, model=dropout))["losses"]
    pretrain(tiny_config(train_iters=6, exit_interval=3, save=str(tmp_path), model=dropout))
    resumed = pretrain(tiny_config(train_iters=6, load=str(tmp_path), model=dropout))["losses"]
    assert resumed == straight[3:]
    assert pretrain(tiny_config(train_iters=6))["losses"] != straight  # the masks matter


def test_loading_a_different_shape_is_refused(tmp_path) -> None:
    pretrain(tiny_config(train_iters=1, save=str(tmp_path)))
    with pytest.raises(ConfigError, match="--hidden-size=64 contradicts checkpoint .*, saved with --hidden-size=32"):
        pretrain(tiny_config(train_iters=2, load=str(tmp_path), model={"hidden_size": 64}))


def test_load_of_empty_dir_starts_fresh(tmp_path, capsys) -> None:
    assert len(pretrain(tiny_config(train_iters=2, load=str(tmp_path)))["losses"]) == 2
    assert "training starts from scratch" in capsys.readouterr().out


def test_bf16_without_hardware_support(monkeypatch, capsys) -> None:
    """A GPU without bf16 is refused; a CPU without it runs bf16 emulated, and says it is slow."""
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert select_device(tiny_config(bf16=True)) == torch.device("cpu")
    assert "this cpu has no native bf16 arithmetic: --bf16 runs emulated" in capsys.readouterr().out
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    with pytest.raises(ConfigError, match=r"--bf16 is not supported on this GPU \(no native bf16\)"):
        select_device(tiny_config(bf16=True, device="cuda"))


def test_learning_rate_schedule() -> None:
    cfg = TrainConfig(lr=1.0, min_lr=0.1, lr_warmup_iters=10, train_iters=110)
    assert learning_rate(1, cfg) == pytest.approx(0.1)
    assert learning_rate(10, cfg) == pytest.approx(1.0)
    assert learning_rate(60, cfg) == pytest.approx(0.55)  # cosine midpoint
    assert learning_rate(110, cfg) == pytest.approx(0.1)
    assert learning_rate(500, cfg) == pytest.approx(0.1)
    linear = TrainConfig(lr=1.0, min_lr=0.0, lr_warmup_iters=0, train_iters=100, lr_decay_style="linear")
    assert learning_rate(25, linear) == pytest.approx(0.75)


def test_dp_slices_union_is_the_global_batch() -> None:
    single = sum(microbatch_indices(32, 2, 8), [])
    union = sorted(sum((sum(microbatch_indices(32, 2, 8, r, 2), []) for r in range(2)), []))
    assert single == list(range(32, 40)) and union == single


def test_flop_formula_known_case() -> None:
    # GPT-2 shape (no GQA, f = 4h, no gating): Megatron's classic 72*B*s*L*h^2*(1 + s/6h + V/12Lh).
    config = tiny_model("gpt2", num_layers=12, hidden_size=768, num_attention_heads=12, num_query_groups=12,
                        seq_length=1024,
                        max_position_embeddings=1024, vocab_size=50257, make_vocab_size_divisible_by=128)
    B, s, L, h, V = 8, 1024, 12, 768, 50304
    expected = 72 * B * s * L * h * h * (1 + s / (6 * h) + V / (12 * L * h))
    assert flops_per_step(config, B) == pytest.approx(expected, rel=1e-12)
    # Counting the matmuls by hand for a llama layer with GQA: qkv, proj, scores+values, 3 MLP GEMMs, logits.
    c = tiny_model("llama", num_layers=1, hidden_size=64, num_attention_heads=8, num_query_groups=2,
                   ffn_hidden_size=128, seq_length=32, vocab_size=256, make_vocab_size_divisible_by=1)
    B, s, h, kv, f, V = 2, 32, 64, 16, 128, 256
    per_token_fwd = 2 * h * (h + 2 * kv) + 2 * h * h + 4 * s * h + 3 * 2 * h * f + 2 * h * V
    assert flops_per_step(c, B) == pytest.approx(3 * B * s * per_token_fwd, rel=1e-12)
    assert peak_tflops("NVIDIA H100 80GB HBM3") == 989.0 and peak_tflops(None) is None
    assert math.isclose(peak_tflops("NVIDIA H100 PCIe"), 756.0)


def test_diverging_run_stops_before_the_step_and_keeps_the_good_checkpoint(tmp_path) -> None:
    """lr 1e4 without clipping: the grads are non-finite at step 2. Nothing is saved after
    step 1, so --keep-last 1 keeps it, and the marker still names it."""
    diverging = tiny_config(lr=1e4, clip_grad=0.0, train_iters=10, save_interval=1, keep_last=1, save=str(tmp_path))
    with pytest.raises(TrainingError, match=r"^iteration 2: grad norm is nan; stopped before the optimizer step "
                                            r"\(--no-check-for-nan-in-loss-and-grad lets a run go on\); the latest "
                                            r"checkpoint in .* is iteration 1$"):
        pretrain(diverging)
    assert (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "1"
    assert sorted(p.name for p in tmp_path.glob("iter_*")) == ["iter_0000001"]
    unchecked = diverging.updated(train={"check_for_nan_in_loss_and_grad": False, "save": None})
    assert any(math.isnan(loss) for loss in pretrain(unchecked)["losses"])  # unchecked, it trains on NaN


def test_exit_signal_and_wall_clock_budget_save_and_stop(tmp_path, monkeypatch) -> None:
    """--exit-signal SIGUSR1 arriving during step 2, then --exit-duration-in-mins spent after step 1:
    each run stops after that step with a checkpoint, and resuming continues bit-identically."""
    straight = pretrain(tiny_config(train_iters=6))["losses"]
    real_step = training.train_step

    def signal_during_step_2(model, batches, iteration, *args, **kwargs):
        if iteration == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return real_step(model, batches, iteration, *args, **kwargs)

    monkeypatch.setattr(training, "train_step", signal_during_step_2)
    stopped = pretrain(tiny_config(train_iters=6, exit_signal_handler=True, exit_signal="SIGUSR1", save=str(tmp_path)))
    monkeypatch.setattr(training, "train_step", real_step)
    assert stopped["iteration"] == 2 and (tmp_path / "latest_checkpointed_iteration.txt").read_text() == "2"
    assert signal.getsignal(signal.SIGUSR1) is signal.SIG_DFL  # handed back
    budget = pretrain(tiny_config(train_iters=6, exit_duration_in_mins=1e-9, load=str(tmp_path), save=str(tmp_path)))
    assert budget["iteration"] == 3 and budget["losses"] == straight[2:3]
    assert pretrain(tiny_config(train_iters=6, load=str(tmp_path)))["losses"] == straight[3:]


def test_load_equal_to_save_may_not_exist_yet(tmp_path, capsys) -> None:
    """The first launch of a job that resumes itself (--save ck --load ck) starts fresh; a --load
    elsewhere that does not exist is a mistake."""
    ckpt, flags = tmp_path / "ckpt", ["--num-layers", "1", "--train-iters", "1", "--seq-length", "16"]
    config = parse_args(flags + ["--save", str(ckpt), "--load", str(ckpt)])
    assert pretrain(config)["iteration"] == 1
    assert f"WARNING: --load={ckpt} does not exist yet; training starts from scratch" in capsys.readouterr().out
    with pytest.raises(ConfigError, match=f"--load={tmp_path / 'other'} does not exist or is not a directory"):
        parse_args(flags + ["--save", str(ckpt), "--load", str(tmp_path / "other")])
