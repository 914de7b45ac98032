"""Megatron-LM's flags with Megatron's meaning: the schedules counted in samples, WSD, the batch
ramp, per-token loss, decoupled lr, the logged norms, loading options, mock data; the restating,
no-effect and FP8 flags."""
from __future__ import annotations

import dataclasses
import math
import re

import pytest
import torch

from helpers.tiny import TINY_FLAGS, tiny_config, tiny_model
from megatron_lite.checkpointing import read_checkpoint
from megatron_lite.config import ConfigError, TrainConfig
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.model.kv_cache import InferenceParams
from megatron_lite.model.moe import Router
from megatron_lite.model.norms import build_norm, is_norm_weight
from megatron_lite.model.ops import select_ops
from megatron_lite.model.rope import apply_rope, rotary_tables
from megatron_lite.optimizer.lr_schedule import learning_rate, set_learning_rate
from megatron_lite.optimizer.optimizer import LocalOptimizer
from megatron_lite.pipeline_parallel.model_runner import ModelRunner
from megatron_lite.pipeline_parallel.schedules import forward_backward_no_pipelining
from megatron_lite.training.arguments import parse_args
from megatron_lite.training.loop import pretrain


def test_sample_based_schedule_equals_the_iteration_based_one() -> None:
    """The same schedule in -samples flags and in -iters flags gives the same rate at every step,
    bit for bit, and --lr-warmup-fraction is a fraction of the decay."""
    iters = TrainConfig(global_batch_size=8, train_iters=40, lr_warmup_iters=5, lr_decay_iters=30, lr=1.0,
                        min_lr=0.1)
    samples = TrainConfig(global_batch_size=8, train_samples=320, lr_warmup_samples=40, lr_decay_samples=240, lr=1.0,
                          min_lr=0.1)
    assert samples.train_iters == 40
    assert [learning_rate(i, iters) for i in range(1, 41)] == [learning_rate(i, samples) for i in range(1, 41)]
    fraction = TrainConfig(global_batch_size=8, train_iters=40, lr_warmup_fraction=0.2, lr_decay_iters=25, lr=1.0)
    assert learning_rate(5, fraction) == 1.0 and learning_rate(2, fraction) == pytest.approx(0.4)


@pytest.mark.parametrize("style, expected", [
    ("linear", [1.0, 1.0, 0.75, 0.5, 0.25, 0.0, 0.0]),
    ("cosine", [1.0, 1.0, 0.5 * (1 + math.cos(math.pi / 4)), 0.5, 0.5 * (1 + math.cos(3 * math.pi / 4)), 0.0, 0.0]),
    ("exponential", [1.0, 1.0, 2 * 0.5**0.25 - 1, 2 * 0.5**0.5 - 1, 2 * 0.5**0.75 - 1, 0.0, 0.0]),
    ("minus_sqrt", [1.0, 1.0, 0.5, 1 - 0.5**0.5, 1 - 0.75**0.5, 0.0, 0.0]),
])
def test_wsd_is_stable_then_anneals_over_its_last_steps(style: str, expected: list[float]) -> None:
    """Warmup 2 steps, stable to step 6, the anneal over steps 7-10 (--lr-wsd-decay-iters 4), the floor after."""
    cfg = TrainConfig(train_iters=12, lr_warmup_iters=2, lr_decay_iters=10, lr_decay_style="WSD",
                      lr_wsd_decay_style=style, lr_wsd_decay_iters=4, lr=1.0, min_lr=0.0)
    assert learning_rate(1, cfg) == 0.5
    assert [learning_rate(i, cfg) for i in (2, 6, 7, 8, 9, 10, 12)] == pytest.approx(expected)


def test_inverse_square_root_decay() -> None:
    cfg = TrainConfig(train_iters=100, lr_warmup_iters=4, lr_decay_style="inverse-square-root", lr=1.0, min_lr=0.1,
                      global_batch_size=1, micro_batch_size=1)
    assert [learning_rate(i, cfg) for i in (4, 16, 64, 100)] == pytest.approx([1.0, 0.5, 0.25, 0.2])
    assert learning_rate(10_000, cfg) == 0.1


def test_rampup_batch_sizes_per_iteration_and_the_steps_they_take() -> None:
    """START 4, INCREMENT 4, over 48 samples up to 16: (16 - 4) / 4 = 3 increments of 16 samples each."""
    cfg = TrainConfig(micro_batch_size=2, global_batch_size=16, rampup_batch_size=[4, 4, 48], train_samples=200)
    sizes, consumed = [], 0
    for _ in range(cfg.train_iters):
        sizes.append(cfg.batch_size_at(consumed))
        consumed += sizes[-1]
    assert sizes == [4, 4, 4, 4, 8, 8, 12, 12] + [16] * 9  # the ramp's 56 samples, then 9 full batches
    assert consumed == 200
    with pytest.raises(ConfigError, match="global batch 6 of the ramp is not divisible by --micro-batch-size=4"):
        TrainConfig(micro_batch_size=4, global_batch_size=16, rampup_batch_size=[6, 2, 10]).validate()
    zbv = ["--pp", "2", "--pipeline-schedule", "zbv", "--num-layers", "4", "--micro-batch-size", "1",
           "--global-batch-size", "8", "--rampup-batch-size", "2", "2", "8"]
    with pytest.raises(ConfigError, match="zbv needs at least 2 x pp - 1 = 3 microbatches .* 2 = global batch 2"):
        parse_args(zbv, world_size=2)  # every batch of the ramp must suit the schedule


def test_per_token_loss_averages_over_the_global_batch_tokens() -> None:
    """Microbatches with unequal unmasked tokens: the per-token loss and its grads are those of one
    batch of them all (sum over tokens / their count), where the default averages the microbatches' means."""
    config = tiny_model("llama")
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, config.vocab_size, (4, config.seq_length + 1), generator=gen)
    mask = torch.ones(4, config.seq_length)
    mask[0, 3:] = 0  # microbatch 0 has far fewer unmasked tokens than microbatch 1
    big = {"tokens": data[:, :-1], "labels": data[:, 1:], "loss_mask": mask}
    micro = [{k: v[i:i + 2] for k, v in big.items()} for i in (0, 2)]
    results = []
    for batches, per_token in (([big], False), (micro, True), (micro, False)):
        model = GPTModel(config)
        init_weights(model, config, seed=0)
        runner = ModelRunner([model], batches, len(batches), (), torch.device("cpu"), per_token_loss=per_token)
        forward_backward_no_pipelining(runner, len(batches))
        results.append((float(sum(runner.losses)) / len(batches), [p.grad.clone() for p in model.parameters()]))
    (whole, whole_grads), (per_token, per_token_grads), (means, _) = results
    assert per_token == pytest.approx(whole, rel=1e-6) and means != pytest.approx(whole, rel=1e-5)
    for a, b in zip(whole_grads, per_token_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_decoupled_lr_gives_the_vocabulary_tables_their_own_schedule() -> None:
    config = tiny_config(decoupled_lr=0.5, decoupled_min_lr=0.05, lr=1.0, min_lr=0.1, train_iters=10,
                         lr_warmup_iters=0, lr_decay_style="linear")
    model = GPTModel(config.model)
    optimizer = LocalOptimizer([model], config.train)
    assert set_learning_rate(optimizer, 5, config.train) == pytest.approx(0.55)  # linear, half way: 0.1 + 0.9 / 2
    main, tables = optimizer.param_groups[:2], optimizer.param_groups[2]
    assert [id(p) for p in tables["params"]] == [id(model.word_embeddings.weight), id(model.output_layer.weight)]
    assert tables["lr"] == pytest.approx(0.275) and all(group["lr"] == pytest.approx(0.55) for group in main)


def test_a_megatron_style_run_ramps_logs_norms_and_trains_on_mock_data(tmp_path, capsys) -> None:
    """One run: the loop takes each step's batch from the ramp and the lr at the samples consumed;
    --mock-data with NullTokenizer --vocab-size trains on random ids below the vocabulary;
    --log-params-norm and --log-num-zeros-in-grad add Megatron's fields to the log."""
    flags = [*TINY_FLAGS[:-6], "--device", "cpu", "--micro-batch-size", "1", "--global-batch-size", "4",
             "--rampup-batch-size", "2", "2", "4", "--train-samples", "14", "--lr-warmup-samples", "4",
             "--mock-data", "--tokenizer-type", "NullTokenizer", "--vocab-size", "50", "--log-interval", "1",
             "--log-params-norm", "--log-num-zeros-in-grad", "--eval-interval", "4", "--eval-iters", "1",
             "--log-dir", str(tmp_path)]
    config = parse_args(flags)
    result = pretrain(config)
    out = capsys.readouterr().out
    assert [int(line.split("global batch size:")[1].split("|")[0]) for line in out.splitlines()
            if "global batch size:" in line] == [2, 2, 4, 4]  # 8 samples ramped, then (14 - 8) // 4 steps
    assert result["iteration"] == 4
    assert f"learning rate: {learning_rate(1, config.train, 2):.6E}" in out  # warmup at 2 of 4 samples: lr / 2
    assert result["config"].model.vocab_size == 51 and "--mock-data: random tokens; NullTokenizer (vocab 51)" in out
    assert "params norm:" in out and "num zeros:" in out and result["valid_loss"] is not None
    records = [line for line in (tmp_path / "metrics.jsonl").read_text().splitlines() if '"train"' in line]
    assert len(records) == 4 and all('"params_norm"' in r and '"num_zeros"' in r for r in records)


def test_no_load_optim_no_load_rng_and_finetune(tmp_path, capsys) -> None:
    """The weights load (step 3's loss is the straight run's), the step count goes on or, with
    --finetune, starts at 0."""
    straight = pretrain(tiny_config(train_iters=3, save=str(tmp_path), save_interval=2))["losses"]
    resumed = pretrain(tiny_config(train_iters=3, load=str(tmp_path), ckpt_step=2, no_load_optim=True,
                                   no_load_rng=True))
    assert resumed["iteration"] == 3 and resumed["losses"] == [straight[2]]
    assert "(--no-load-optim): iteration 2 with a fresh optimizer" in capsys.readouterr().out
    tuned = pretrain(tiny_config(train_iters=1, load=str(tmp_path), finetune=True))
    assert len(tuned["losses"]) == 1 and "(--finetune): training starts at iteration 0" in capsys.readouterr().out
    with pytest.raises(ConfigError, match="--finetune needs --load"):
        tiny_config(finetune=True)


def test_restating_no_effect_and_fp8_flags(capsys) -> None:
    config = parse_args(["--swiglu", "--normalization", "RMSNorm", "--position-embedding-type", "rope",
                         "--disable-bias-linear", "--group-query-attention", "--no-position-embedding",
                         "--use-mcore-models",
                         "--attention-backend", "auto", "--overlap-grad-reduce", "--manual-gc", "--split", "'99,1,0'",
                         "--data-cache-path", "/tmp/cache"])
    assert config.model.family == "llama" and config.train.split == "99,1,0"
    assert config.train.data_cache_dir == "/tmp/cache"
    assert capsys.readouterr().out.count("accepted, no effect here: --use-mcore-models, --attention-backend, "
                                         "--overlap-grad-reduce, --manual-gc") == 1
    assert parse_args(["--normalization", "LayerNorm", "--position-embedding-type", "learned_absolute"]
                      ).model.family == "gpt2"
    refused = {
        ("--swiglu", "--normalization", "LayerNorm"): "these flags name different families (gpt2: --normalization "
                                                      "LayerNorm; llama: --swiglu)",
        ("--model", "tiny-gpt2", "--disable-bias-linear"): "--disable-bias-linear name the llama family, but the "
                                                           "model is gpt2",
        ("--family", "gpt2", "--rotary-percent", "0.5"): "--rotary-percent=0.5 is for the llama family",
        ("--fp8-format", "hybrid", "--fp8-amax-history-len", "1024"): "--fp8-format: FP8 training is not "
                                                                      "implemented here",
        ("--train-iters", "5", "--train-samples", "50"): "--train-iters and --train-samples exclude each other",
        ("--train-samples", "50", "--lr-decay-iters", "5"): "--lr-decay-iters goes with --train-iters; this run "
                                                            "counts samples: use --lr-decay-samples",
        ("--lr-decay-style", "WSD"): "--lr-decay-style=WSD needs --lr-wsd-decay-iters",
        ("--tokenizer-type", "NullTokenizer", "--mock-data"): "NullTokenizer needs --vocab-size",
    }
    for flags, message in refused.items():
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
            parse_args(list(flags))


def _loss_and_grads(model: GPTModel, tokens: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.detach(), {name: p.grad for name, p in model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layernorm_1p_is_the_plain_model_with_norm_weights_one_plus_w(family: str) -> None:
    """--apply-layernorm-1p stores each norm's weight w zero-centred (initialised at 0) and scales by 1 + w: the
    same loss and grads as the model without it whose norm weights are 1 + w, every norm (q/k norms too)."""
    plain_config = tiny_model(family, qk_layernorm=family == "llama")
    centred_config = dataclasses.replace(plain_config, apply_layernorm_1p=True)
    centred, plain = GPTModel(centred_config), GPTModel(plain_config)
    init_weights(centred, centred_config, seed=0)
    norms = [name for name, _ in centred.named_parameters() if is_norm_weight(name)]
    assert len(norms) == (9 if family == "llama" else 5)
    assert all(not centred.get_parameter(name).any() for name in norms)  # Megatron's zero-centred init
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name in norms:  # off the init, so that 1 + w is not all ones
            centred.get_parameter(name).add_(0.1 * torch.randn(centred.get_parameter(name).shape, generator=gen))
        plain.load_state_dict({name: t + 1 if name in norms else t for name, t in centred.state_dict().items()})
    tokens = torch.randint(0, plain_config.vocab_size, (2, plain_config.seq_length + 1), generator=gen)
    (loss_1p, grads_1p), (loss, grads) = _loss_and_grads(centred, tokens), _loss_and_grads(plain, tokens)
    torch.testing.assert_close(loss_1p, loss, rtol=1e-6, atol=0)
    for name, grad in grads.items():
        torch.testing.assert_close(grads_1p[name], grad, rtol=1e-5, atol=1e-7)


@pytest.mark.usefixtures("force_triton")
@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layernorm_1p_through_the_triton_norm_kernels(family: str) -> None:
    """The fused norm (residual add and norm in one kernel) of a zero-centred norm equals the plain one's with
    weight 1 + w: outputs and the grads of x, the residual and w."""
    ops = select_ops(True)
    results = []
    for zero_centered in (True, False):
        gen = torch.Generator().manual_seed(0)
        norm = build_norm(tiny_model(family, apply_layernorm_1p=zero_centered), ops)
        with torch.no_grad():
            norm.weight.copy_(0.1 * torch.randn(32, generator=gen) + (0.0 if zero_centered else 1.0))
        x, residual = (torch.randn(2, 8, 32, generator=gen).requires_grad_() for _ in range(2))
        y, h = norm(x, residual)
        torch.autograd.backward((y, h), (torch.randn(2, 8, 32, generator=gen), torch.randn(2, 8, 32, generator=gen)))
        results.append((y, h, x.grad, residual.grad, norm.weight.grad))
    for centred, plain in zip(*results):
        torch.testing.assert_close(centred, plain, rtol=1e-5, atol=1e-6)


def test_without_layernorm_1p_norm_weights_start_at_one() -> None:
    config = tiny_model("gpt2")
    model = GPTModel(config)
    init_weights(model, config, seed=0)
    assert all(torch.equal(p, torch.ones_like(p)) for n, p in model.named_parameters() if is_norm_weight(n))


def _rope_by_hand(x: torch.Tensor, percent: float, base: float) -> torch.Tensor:
    """Megatron's partial RoPE on x [b, s, h, d] written out: the first int(d * percent) channels rotated in the
    rotate-half convention with that width's frequencies, the rest as they are."""
    rot = int(x.shape[-1] * percent)
    inv_freq = 1.0 / base ** (torch.arange(0, rot, 2, dtype=torch.float64) / rot)
    angles = torch.outer(torch.arange(x.shape[1], dtype=torch.float64), inv_freq)
    cos, sin = (torch.cat([f(angles)] * 2, -1)[None, :, None, :] for f in (torch.cos, torch.sin))
    x_rot, x_pass = x[..., :rot].double(), x[..., rot:]
    half = rot // 2
    rotated = x_rot * cos + torch.cat((-x_rot[..., half:], x_rot[..., :half]), -1) * sin
    return torch.cat((rotated.to(x.dtype), x_pass), -1)


@pytest.mark.parametrize("kernels", ["reference", "triton"])
def test_rotary_percent_rotates_the_first_channels_of_each_head_only(kernels: str,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """--rotary-percent 0.5 on 16-wide heads: channels 0-7 rotated as an 8-wide head, 8-15 unchanged (the torch
    reference and the Triton kernel); a model with it still trains, and a generation's KV cache (positions from
    the offset) computes what one forward does."""
    if kernels == "triton":
        monkeypatch.setenv("MEGATRON_LITE_TRITON", "1")
    config = tiny_model("llama", hidden_size=64, rotary_percent=0.5)
    assert config.head_dim == 16 and config.rotary_dim == 8
    cos, sin = rotary_tables(config)
    assert cos.shape == (config.context_length, 4)
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 16, 4, 16, generator=gen), torch.randn(2, 16, 2, 16, generator=gen)
    ops = select_ops(kernels == "triton")
    q_out, k_out = apply_rope(ops.apply_rotary, q, k, cos[:16], sin[:16])
    for out, x in ((q_out, q), (k_out, k)):
        torch.testing.assert_close(out, _rope_by_hand(x, 0.5, config.rotary_base), rtol=1e-5, atol=1e-6)
        assert torch.equal(out[..., 8:], x[..., 8:])
    if kernels == "reference":
        model = GPTModel(config).eval()
        init_weights(model, config, seed=0)
        tokens = torch.randint(0, config.vocab_size, (2, 12), generator=gen)
        with torch.no_grad():
            whole = model(tokens)
            cache, parts = InferenceParams(2, 12), []
            for piece in tokens.split([5, 4, 3], dim=1):
                parts.append(model(piece, inference_params=cache))
                cache.sequence_len_offset += piece.shape[1]
        torch.testing.assert_close(torch.cat(parts, 1), whole, rtol=1e-5, atol=1e-5)
    with pytest.raises(ConfigError, match=re.escape("--rotary-percent=0.1 must be in (0, 1] and rotate an even, "
                                                    "non-zero number of channels (head dim 16 x 0.1 = 1)")):
        tiny_model("llama", hidden_size=64, rotary_percent=0.1).validate()


def test_group_limited_routing_and_scaled_weights_as_deepseek_v3_routes() -> None:
    """8 experts in 4 groups, top-4 within the 2 groups whose best 2 scores (sigmoid plus the expert bias) sum
    highest; weights the chosen sigmoid scores normalised, times --moe-router-topk-scaling-factor 2.5."""
    config = tiny_model("llama", num_experts=8, moe_router_topk=4, moe_router_score_function="sigmoid",
                        moe_router_enable_expert_bias=True, moe_router_num_groups=4, moe_router_group_topk=2,
                        moe_router_topk_scaling_factor=2.5)
    router = Router(config, sequence_parallel=False)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.weight.copy_(torch.randn(router.weight.shape, generator=gen))
        router.expert_bias.copy_(0.1 * torch.randn(8, generator=gen))
    x = torch.randn(2, 8, config.hidden_size, generator=gen)
    weights, experts, _ = router(x)
    scores = (x.flatten(0, 1) @ router.weight.T).sigmoid()
    for token, (row, chosen) in enumerate(zip(scores, experts)):
        biased = (row + router.expert_bias).view(4, 2)
        best_groups = biased.sum(-1).topk(2).indices  # each group's best 2 of its 2 experts: their sum
        allowed = torch.cat([torch.arange(2 * g, 2 * g + 2) for g in best_groups.tolist()])
        expected = allowed[(row + router.expert_bias)[allowed].topk(4).indices]
        assert sorted(chosen.tolist()) == sorted(expected.tolist()), token
        torch.testing.assert_close(weights[token], 2.5 * row[chosen] / row[chosen].sum())
    with pytest.raises(ConfigError, match="--moe-router-num-groups and --moe-router-group-topk go together"):
        dataclasses.replace(config, moe_router_group_topk=None).validate()


def test_moe_layer_freq_list_and_lr_warmup_init() -> None:
    """--moe-layer-freq as DeepSeek-V3's recipe writes it (a quoted list expression): the first layer dense, the
    rest MoE; --lr-warmup-init is where the linear warmup starts."""
    config = parse_args(["--num-layers", "4", "--num-experts", "4", "--moe-layer-freq", "'([0]*1+[1]*3)'",
                         "--lr-warmup-init", "0.1", "--lr", "1.0", "--lr-warmup-iters", "4", "--train-iters", "10"])
    assert config.model.moe_layer_freq == [0, 1, 1, 1]
    model = GPTModel(config.model)
    assert [type(layer.mlp).__name__ for layer in model.layers.values()] == ["MLP", "MoELayer", "MoELayer", "MoELayer"]
    assert [learning_rate(i, config.train) for i in (1, 2, 4)] == pytest.approx([0.325, 0.55, 1.0])
    assert learning_rate(2, tiny_config().train) == learning_rate(2, dataclasses.replace(tiny_config().train,
                                                                                           lr_warmup_init=0.0))
    with pytest.raises(ConfigError, match=re.escape("--moe-layer-freq=[0, 1] must give each of the --num-layers=4 "
                                                    "layers 1 (MoE) or 0 (dense)")):
        parse_args(["--num-layers", "4", "--num-experts", "4", "--moe-layer-freq", "[0,1]"])


def test_no_save_optim_writes_no_optimizer_state_and_resumes_with_no_load_optim(tmp_path, capsys) -> None:
    """The checkpoint holds the weights (fp32 main ones), the iteration and RNG, not the moments; a plain --load of it
    stops in one line saying which flags resume it; --no-load-optim resumes at its iteration with the weights the
    straight run had (its next loss is that run's with a fresh optimizer, as for a full checkpoint)."""
    pretrain(tiny_config(train_iters=2, save=str(tmp_path / "full"), save_interval=2))
    pretrain(tiny_config(train_iters=2, save=str(tmp_path / "lean"), save_interval=2, no_save_optim=True))
    lean = {p.name: p.stat().st_size for p in (tmp_path / "lean" / "iter_0000002").iterdir()}
    full = {p.name: p.stat().st_size for p in (tmp_path / "full" / "iter_0000002").iterdir()}
    assert sum(lean.values()) < sum(full.values()) / 2  # Adam's two moments are twice the weights
    with pytest.raises(ConfigError, match=r"saved with --no-save-optim: it holds no optimizer state; resume from it "
                                          r"with --no-load-optim \(iteration 2, a fresh optimizer\) or --finetune"):
        pretrain(tiny_config(train_iters=3, load=str(tmp_path / "lean")))
    from_full = pretrain(tiny_config(train_iters=3, load=str(tmp_path / "full"), no_load_optim=True))
    from_lean = pretrain(tiny_config(train_iters=3, load=str(tmp_path / "lean"), no_load_optim=True))
    assert from_lean["iteration"] == 3 and from_lean["losses"] == from_full["losses"]
    with pytest.raises(ConfigError, match="--no-save-optim needs --ckpt-format torch_dist"):
        tiny_config(no_save_optim=True, ckpt_format="torch")


def test_megatron_switches_neutral_values_and_refused_features(capsys) -> None:
    config = parse_args(["--use-rope-scaling", "--recompute-activations", "--num-experts", "4",
                         "--moe-token-dispatcher-type", "flex", "--softmax-type", "vanilla", "--moe-router-fusion",
                         "--expert-tensor-parallel-size", "1", "--use-rotary-position-embeddings"])
    model = config.model
    assert (model.rope_scaling_type, model.rope_scaling_factor, model.rope_scaling_original_max_position_embeddings,
            model.recompute_granularity, model.moe_token_dispatcher_type) == ("llama3", 8.0, 8192, "selective",
                                                                              "alltoall")
    assert ("accepted, no effect here: --moe-router-fusion, --softmax-type, --expert-tensor-parallel-size, "
            "--moe-token-dispatcher-type flex (alltoall here)") in capsys.readouterr().out
    interpolated = parse_args(["--rotary-seq-len-interpolation-factor", "4"]).model
    assert (interpolated.rope_scaling_type, interpolated.rope_scaling_factor) == ("linear", 4.0)
    refused = {
        ("--softmax-type", "learnable", "--quick-geglu"): "--quick-geglu: gpt-oss's clamped GeGLU is not implemented "
                                                         "here; the MLP is SwiGLU (llama) or GELU (gpt2); drop "
                                                         "--quick-geglu (also not implemented: --softmax-type)",
        ("--expert-tensor-parallel-size", "2"): "--expert-tensor-parallel-size: experts are not split over tp here",
        ("--use-rope-scaling", "--rope-scaling-type", "yarn"): "--use-rope-scaling means --rope-scaling-type llama3, "
                                                               "but it is yarn; drop one",
        ("--position-embedding-type", "yarn"): "--position-embedding-type yarn: Megatron's YaRN flags",
    }
    for flags, message in refused.items():
        with pytest.raises(ConfigError, match=re.escape(message)):
            parse_args(list(flags))


def test_layernorm_1p_checkpoints_hold_the_zero_centred_weights_and_resume_with_them(tmp_path) -> None:
    """The checkpoint stores w (near 0 after two steps); the resume computes the straight run's step 3, and one
    that says the weights are plain gammas is refused in one line."""
    centred = {"apply_layernorm_1p": True}
    straight = pretrain(tiny_config(model=centred, save=str(tmp_path), save_interval=2))
    norms = {name: t for name, t in read_checkpoint(tmp_path, 2).model.items() if is_norm_weight(name)}
    assert norms and max(float(t.abs().max()) for t in norms.values()) < 0.05
    resumed = pretrain(tiny_config(model=centred, load=str(tmp_path), ckpt_step=2))
    assert resumed["losses"] == [straight["losses"][2]]
    with pytest.raises(ConfigError, match="--apply-layernorm-1p=False contradicts checkpoint"):
        pretrain(tiny_config(load=str(tmp_path), ckpt_step=2))
