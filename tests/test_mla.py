"""Multi-latent attention (--multi-latent-attention and its dimensions, Megatron's MLA YaRN flags).

In-process: one MLA layer against transformers' DeepseekV3Attention with the same weights (with and
without a query latent, plain RoPE and DeepSeek-V3's YaRN: factor 40, mscale and mscale_all_dim 1, whose
softmax scale it checks), outputs and input grads; the KV cache's generation equals the full forward;
bad flags, and Hugging Face export (DeepSeek-V3's family is not mapped), are refused in one line.
Spawned (one spawn of two ranks): tp 2 with and without SP, cp 2 (ring and Ulysses), pp 2, dp 2 with ZeRO-3,
and tp 2 + SP with --recompute-modules mla_up_proj core_attn, each against one device in fp32 (losses, grads
before clipping, grad norms, weights; tolerances in tests/helpers/parity.py).
"""
from __future__ import annotations

import functools

import pytest
import torch
from transformers import DeepseekV3Config
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

from helpers.parity import assert_parity, merge_ranks, run_steps
from helpers.tiny import TINY_FLAGS, tiny_config
from megatron_lite import parallel_state
from megatron_lite.config import ConfigError, ParallelConfig
from megatron_lite.config.layout import Layout
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.hf.families import hf_family
from megatron_lite.inference.generation import generate
from megatron_lite.inference.sampling import SamplingParams
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.model.mla import MultiLatentAttention
from megatron_lite.model.ops import TORCH_OPS
from megatron_lite.model.rope import rotary_tables
from megatron_lite.training.arguments import parse_args

# Every width different, so that a swapped dimension cannot pass: heads 4, head 8 + 4 rotated, values 6.
MLA = dict(multi_latent_attention=True, num_query_groups=4, q_lora_rank=16, kv_lora_rank=12, qk_head_dim=8,
           qk_pos_emb_head_dim=4, v_head_dim=6, qk_layernorm=True)
MLA_FLAGS = ["--multi-latent-attention", "--q-lora-rank", "16", "--kv-lora-rank", "12", "--qk-head-dim", "8",
             "--qk-pos-emb-head-dim", "4", "--v-head-dim", "6", "--qk-layernorm"]
YARN_FLAGS = ["--rotary-scaling-factor", "40", "--mscale", "1.0", "--mscale-all-dim", "1.0"]
STEPS = 3
CASES = [(Layout(tp=2), {}), (Layout(tp=2, sp=True), {}), (Layout(cp=2), {}), (Layout(cp=2, cp_comm="a2a"), {}),
         (Layout(pp=2), {}), (Layout(dp=2, zero=3), {}),
         (Layout(tp=2, sp=True), {"recompute_granularity": "selective",
                                  "recompute_modules": ["mla_up_proj", "core_attn"]})]


def model_from_flags(*flags: str, q_latent: bool = True):
    """The MLA test shape, with its query latent (--q-lora-rank 16) or without (queries projected directly)."""
    mla = MLA_FLAGS if q_latent else [f for f in MLA_FLAGS if f not in ("--q-lora-rank", "16")]
    return parse_args([*TINY_FLAGS, "--num-query-groups", "4", *mla, *flags], world_size=1).model


def hf_attention(model, hf_rope: dict) -> tuple[DeepseekV3Attention, DeepseekV3RotaryEmbedding]:
    config = DeepseekV3Config(hidden_size=model.hidden_size, num_attention_heads=model.num_attention_heads,
                              num_key_value_heads=model.num_attention_heads, q_lora_rank=model.q_lora_rank,
                              kv_lora_rank=model.kv_lora_rank, qk_nope_head_dim=model.qk_head_dim,
                              qk_rope_head_dim=model.qk_pos_emb_head_dim, v_head_dim=model.v_head_dim,
                              rms_norm_eps=model.norm_epsilon, rope_interleave=False, attention_bias=False,
                              max_position_embeddings=model.context_length,
                              rope_parameters={"rope_theta": model.rotary_base, **hf_rope})
    config._attn_implementation = "sdpa"
    return DeepseekV3Attention(config, 0), DeepseekV3RotaryEmbedding(config)


# Ours (Megatron-Core's names) -> transformers' DeepseekV3Attention's.
HF_NAMES = {"linear_q_down_proj": "q_a_proj", "q_layernorm": "q_a_layernorm", "linear_q_up_proj": "q_b_proj",
            "linear_q_proj": "q_proj", "linear_kv_down_proj": "kv_a_proj_with_mqa", "kv_layernorm": "kv_a_layernorm",
            "linear_kv_up_proj": "kv_b_proj", "linear_proj": "o_proj"}


@pytest.mark.parametrize("q_latent, flags, hf_rope", [
    (True, [], {"rope_type": "default"}),
    (False, [], {"rope_type": "default"}),
    (True, YARN_FLAGS, {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                  "mscale_all_dim": 1.0, "beta_fast": 32.0, "beta_slow": 1.0}),
    (True, ["--rotary-scaling-factor", "40", "--mscale", "0.7", "--mscale-all-dim", "0.5", "--seq-length", "64"],
     {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 0.7,
      "mscale_all_dim": 0.5, "beta_fast": 32.0, "beta_slow": 1.0}),
], ids=["q-latent", "q-direct", "deepseek-v3-yarn", "yarn-mscale-ratio"])
def test_one_layer_equals_transformers_deepseek_v3_attention(q_latent: bool, flags: list[str], hf_rope: dict) -> None:
    """Outputs and the input's grads, at every position of a causal sequence, to 1e-4 of their largest element
    (fp32 rounding: up to 1.2e-5 measured over 30 weight draws; a wrong scale, rotation or layout is off by
    percents). The weights are drawn from a seeded generator, the same on every run."""
    model = model_from_flags(*flags, q_latent=q_latent)
    assert (model.q_lora_rank is not None) == q_latent
    parallel_state.initialize_model_parallel(ParallelConfig())
    ours = MultiLatentAttention(model, TORCH_OPS)
    theirs, rotary_embedding = hf_attention(model, hf_rope)
    weights = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in ours.named_parameters():
            module, field = name.rsplit(".", 1)
            draw = torch.randn(param.shape, generator=weights)
            param.copy_(draw * (0.5 if "layernorm" not in module else 0.1) + ("layernorm" in module))
            theirs.get_parameter(f"{HF_NAMES[module]}.{field}").copy_(param)
    s = model.seq_length
    x = torch.randn(2, s, model.hidden_size, generator=torch.Generator().manual_seed(0), requires_grad=True)
    cos, sin = (t[:s] for t in rotary_tables(model))
    out = ours(x, (cos, sin))
    (grad_ours,) = torch.autograd.grad(out.square().sum(), x)
    positions = torch.arange(s).unsqueeze(0)
    expected, _ = theirs(x, rotary_embedding(x, positions), attention_mask=None)
    (grad_theirs,) = torch.autograd.grad(expected.square().sum(), x)
    for a, b in ((out, expected), (grad_ours, grad_theirs)):
        assert (a - b).abs().max() <= 1e-4 * b.abs().max(), (a - b).abs().max() / b.abs().max()


def test_generation_with_the_kv_cache_equals_the_full_forward() -> None:
    """Greedy tokens one at a time through the KV cache (keys and values at the padded width) are the argmax of
    a full forward over the same tokens."""
    config = tiny_config(model={**MLA, "seq_length": 32}).model
    parallel_state.initialize_model_parallel(ParallelConfig())
    model = GPTModel(config, ops=TORCH_OPS).eval()
    init_weights(model, config, seed=3)
    prompt = [5, 17, 42, 7]
    tokens = generate(model, prompt, 6, SamplingParams(temperature=0.0))
    with torch.no_grad():
        logits = model(torch.tensor([tokens[:-1]]))
    assert tokens[len(prompt):] == logits[0, len(prompt) - 1:].argmax(-1).tolist()


def test_hugging_face_export_refuses_mla_in_one_line() -> None:
    with pytest.raises(ConfigError, match="no Hugging Face family here represents multi-latent attention"):
        hf_family(tiny_config(model=MLA).model)


@pytest.mark.parametrize("flags, message", [
    (["--family", "gpt2"], "--multi-latent-attention is for the llama family"),
    (["--num-query-groups", "2"], "--num-query-groups=2 with --multi-latent-attention"),
    (["--qk-pos-emb-head-dim", "3"], "--qk-pos-emb-head-dim=3 must be even"),
    (["--rotary-percent", "0.5"], "--rotary-percent=0.5 with --multi-latent-attention"),
    (["--rope-type", "rope", "--rotary-scaling-factor", "40"], "--rotary-scaling-factor=40.0 with --rope-type rope"),
    (["--rotary-scaling-factor", "40", "--rope-scaling-type", "linear"],
     "means --rope-scaling-type yarn, but it is linear"),
])
def test_bad_mla_flags_are_refused(flags: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(".", r"\.")):
        model_from_flags(*flags)


def test_megatron_mla_rope_flags_need_mla_and_recompute_mla_up_proj_needs_it_too() -> None:
    with pytest.raises(ConfigError, match="are read with --multi-latent-attention"):
        parse_args([*TINY_FLAGS, "--rotary-scaling-factor", "40"], world_size=1)
    assert parse_args([*TINY_FLAGS, "--rope-type", "rope"], world_size=1).model.rope_scaling_type == "none"
    with pytest.raises(ConfigError, match="--recompute-modules mla_up_proj needs --multi-latent-attention"):
        parse_args([*TINY_FLAGS, "--recompute-granularity", "selective", "--recompute-modules", "mla_up_proj"],
                   world_size=1)


def mla_config(layout: Layout = Layout(), **model):
    config = tiny_config(model={**MLA, "seq_length": 16, **model}, micro_batch_size=1, global_batch_size=4,
                         train_iters=STEPS, clip_grad=0.5)
    return config.updated(parallel=layout.fields())


def mla_worker() -> dict:
    return {(layout, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in model.items())):
            run_steps(mla_config(layout, **model), STEPS) for layout, model in CASES}


@pytest.fixture(scope="module")
def spawned() -> dict:
    ranks = run_on_ranks(mla_worker, 2)
    return {key: merge_ranks([r[key] for r in ranks]) for key in ranks[0]}


@functools.cache
def single() -> dict:
    return run_steps(mla_config(), STEPS)


@pytest.mark.parametrize("layout, model", CASES, ids=[layout.name + ("-recompute" if m else "") for layout, m in CASES])
def test_layouts_match_single_device(spawned: dict, layout: Layout, model: dict) -> None:
    key = (layout, tuple((k, tuple(v) if isinstance(v, list) else v) for k, v in model.items()))
    assert_parity(single(), spawned[key], 258)
