"""Megatron-LM flags that are not fields of our config: switches with no effect on our code path,
model-shape flags that restate what a family is, switches that set fields of ours, and the flags of
features we do not have (FP8 among them), refused in one line. A Megatron launch script runs unchanged
or stops with that line; the start-up log names once what it accepted without effect.
"""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

from megatron_lite.config import ConfigError
from megatron_lite.config.checks import require

_ON = dict(action="store_true")
_INT = dict(type=int, metavar="N")
_TEXT = dict(type=str, metavar="VALUE")

# Flag -> (its argparse options, why it changes nothing here).
NO_EFFECT: dict[str, tuple[dict, str]] = {
    "--use-mcore-models": (_ON, "there is one model implementation"),
    "--transformer-impl": (_TEXT, "there is one model implementation"),
    "--attention-backend": (_TEXT, "attention is our flash attention (Triton on GPU, its torch reference with "
                                   "--no-fused-kernels)"),
    "--use-flash-attn": (_ON, "attention is always flash attention"),
    "--no-masked-softmax-fusion": (_ON, "no masked softmax: causal masking is inside the flash attention"),
    "--attention-softmax-in-fp32": (_ON, "the attention softmax is always computed in fp32"),
    "--no-rope-fusion": (_ON, "fused or not is --no-fused-kernels, for every kernel at once"),
    "--no-bias-gelu-fusion": (_ON, "fused or not is --no-fused-kernels, for every kernel at once"),
    "--no-bias-swiglu-fusion": (_ON, "fused or not is --no-fused-kernels, for every kernel at once"),
    "--no-bias-dropout-fusion": (_ON, "fused or not is --no-fused-kernels, for every kernel at once"),
    "--cross-entropy-loss-fusion": (_ON, "the loss is the fused vocab-parallel cross entropy already"),
    "--no-gradient-accumulation-fusion": (_ON, "weight grads accumulate into the fp32 main grads in any case"),
    "--accumulate-allreduce-grads-in-fp32": (_ON, "grads are accumulated and reduced in fp32 always"),
    "--grad-reduce-in-bf16": (_ON, "grads are accumulated and reduced in fp32 always"),
    "--disable-bf16-reduced-precision-matmul": (_ON, "matmuls use torch's default precision"),
    "--overlap-grad-reduce": (_ON, "grad buckets are always reduced during the backward"),
    "--moe-grouped-gemm": (_ON, "experts run one after another; no grouped GEMM kernel"),
    "--moe-permute-fusion": (_ON, "token permutation is plain torch indexing"),
    "--moe-router-dtype": (_TEXT, "router logits are computed in fp32 always"),
    "--empty-unused-memory-level": (_INT, "the CUDA caching allocator's cache is left alone"),
    "--manual-gc": (_ON, "Python's garbage collector runs as usual"),
    "--manual-gc-interval": (_INT, "Python's garbage collector runs as usual"),
    "--no-create-attention-mask-in-dataloader": (_ON, "batches never carry an attention mask"),
    "--no-mmap-bin-files": (_ON, ".bin files are always memory-mapped"),
    "--tiktoken-pattern": (_TEXT, "TikTokenizer's option; no tokenizer here reads it"),
    "--profile": (_ON, "no built-in profiler; tools/benchmark_training.py times steps"),
    "--profile-step-start": (_INT, "no built-in profiler"),
    "--profile-step-end": (_INT, "no built-in profiler"),
    "--profile-ranks": (dict(type=int, nargs="+", metavar="RANK"), "no built-in profiler"),
    "--log-memory-to-tensorboard": (_ON, "peak memory is always in the log records"),
    "--log-validation-ppl-to-tensorboard": (_ON, "the validation loss is logged; its perplexity is exp of it"),
    "--timing-log-level": (_INT, "one step time is measured and logged"),
    "--use-cpu-initialization": (_ON, "each rank initialises its own shard on its device"),
    "--distributed-backend": (_TEXT, "NCCL on GPUs, gloo on CPUs, chosen by the device"),
    "--moe-router-fusion": (_ON, "the router is plain torch ops"),
    "--moe-shared-expert-overlap": (_ON, "the shared expert runs in the layer's order, not overlapped with dispatch"),
    "--moe-use-legacy-grouped-gemm": (_ON, "experts run one after another; no grouped GEMM kernel"),
    "--moe-enable-deepep": (_ON, "tokens move by plain all-to-all (--moe-token-dispatcher-type)"),
    "--moe-flex-dispatcher-backend": (_TEXT, "tokens move by plain all-to-all (--moe-token-dispatcher-type)"),
    "--use-megatron-fsdp": (_ON, "fully sharded data parallelism is --data-parallel-sharding-strategy (ZeRO-1/2/3 on "
                                 "our buckets), with or without this switch"),
    "--init-model-with-meta-device": (_ON, "the model is always built on the meta device and each rank draws its "
                                           "shard"),
    "--fsdp-double-buffer": (_ON, "ZeRO-3 gathers into buffers it frees after each layer; no double buffering"),
    "--use-nccl-ub": (_ON, "no NCCL user buffers: collectives use torch.distributed's"),
    "--megatron-fsdp-grad-comm-dtype": (_TEXT, "grads are accumulated and reduced in fp32 always"),
    "--megatron-fsdp-main-grads-dtype": (_TEXT, "grads are accumulated and reduced in fp32 always"),
    "--delay-wgrad-compute": (_ON, "weight grads are computed in the backward"),
    "--overlap-moe-expert-parallel-comm": (_ON, "the expert all-to-alls are not overlapped with other microbatches"),
    "--cross-entropy-fusion-impl": (_TEXT, "the loss is the fused vocab-parallel cross entropy already"),
    "--no-async-tensor-model-parallel-allreduce": (_ON, "tp all-reduces run in the order autograd calls them"),
    "--tp-comm-overlap": (_ON, "tp communication is not overlapped with GEMMs"),
    "--apply-query-key-layer-scaling": (_ON, "attention scores are computed in fp32 (the scaling only guards fp16)"),
    "--export-force-local-attention": (_ON, "there is one attention implementation"),
    "--enable-experimental": (_ON, "nothing here is behind an experimental switch"),
    "--logging-level": (_INT, "the log is the iteration lines and start-up messages"),
    "--tensorboard-queue-size": (_INT, "TensorBoard events are written at each log interval"),
    "--log-batch-size-to-tensorboard": (_ON, "the global batch size is in every log line and metrics record"),
    "--auto-detect-ckpt-format": (_ON, "--load's format (torch or torch_dist) is always detected"),
    "--dist-ckpt-strictness": (_TEXT, "loading is strict: a checkpoint's tensors must match the model's"),
}

# Megatron flags for features not implemented here: accepted by the parser so that a script stops with this one
# line, before any work, instead of argparse's "unrecognized arguments". Flag -> (options, why, the value that
# asks for nothing: given with it, the flag has no effect; _ANY when every value asks for the feature).
_ANY = object()
_YARN = ("Megatron's YaRN flags for other attention than MLA (--position-embedding-type yarn's) are not read here; "
         "YaRN here is --rope-scaling-type yarn with --rope-scaling-factor, "
         "--rope-scaling-original-max-position-embeddings, --rope-scaling-beta-fast/-slow and "
         "--rope-scaling-mscale/-mscale-all-dim")
_GPT_OSS = "gpt-oss's clamped GeGLU is not implemented here; the MLP is SwiGLU (llama) or GELU (gpt2)"
_FLOAT = dict(type=float, metavar="X")
REFUSED: dict[str, tuple[dict, str, object]] = {
    "--yarn-original-max-position-embeddings": (_INT, _YARN, _ANY),
    "--yarn-beta-fast": (_FLOAT, _YARN, _ANY),
    "--yarn-beta-slow": (_FLOAT, _YARN, _ANY),
    "--quick-geglu": (_ON, _GPT_OSS, _ANY),
    "--glu-linear-offset": (_FLOAT, _GPT_OSS, 0.0),
    "--activation-func-clamp-value": (_FLOAT, _GPT_OSS, _ANY),
    "--enable-gpt-oss": (_ON, "gpt-oss (attention sinks, clamped GeGLU, biases) is not implemented here", _ANY),
    "--softmax-type": (dict(choices=("vanilla", "off-by-one", "learnable")),
                       "attention sinks (an off-by-one or learnable softmax offset) are not implemented here",
                       "vanilla"),
    "--expert-tensor-parallel-size": (_INT, "experts are not split over tp here (expert tp is 1); tp ranks may hold "
                                            "different experts through --expert-model-parallel-size", 1),
    "--rotary-interleaved": (_ON, "RoPE rotates the two halves of each head (the Hugging Face convention), not "
                                  "interleaved pairs", _ANY),
    "--no-yarn-correction-range-round-to-int": (_ON, "YaRN's ramp bounds are rounded outwards here (transformers' "
                                                     "truncate)", _ANY),
}

# Flags that say what our families already are: given ones must agree with each other and with
# --family (or the named preset's), and name the family where neither is given. A flag that is
# absent says nothing (Megatron's defaults are not read as a shape: its Llama scripts leave
# --normalization out). The family each value or switch says:
FAMILY_OF_VALUE: dict[str, str] = {"LayerNorm": "gpt2", "RMSNorm": "llama", "learned_absolute": "gpt2",
                                   "rope": "llama"}
RESTATING: dict[str, dict] = {
    "--swiglu": _ON,
    "--normalization": dict(choices=("LayerNorm", "RMSNorm")),
    "--position-embedding-type": dict(choices=("learned_absolute", "rope", "yarn")),
    "--no-position-embedding": _ON,
    "--disable-bias-linear": _ON,
    "--group-query-attention": _ON,
    "--use-rotary-position-embeddings": _ON,
}
RESTATING_HELP = {
    "--swiglu": "SwiGLU MLP: the llama family's.",
    "--normalization": "LayerNorm (the gpt2 family's) or RMSNorm (the llama family's).",
    "--position-embedding-type": "learned_absolute (the gpt2 family's) or rope (the llama family's); yarn is refused "
                                 "(see --rope-scaling-type yarn).",
    "--no-position-embedding": "No learned position table: the llama family (RoPE).",
    "--disable-bias-linear": "No biases on the linear layers: the llama family (biases only with --add-qkv-bias).",
    "--group-query-attention": "Grouped-query attention; the groups are --num-query-groups, in either family.",
    "--use-rotary-position-embeddings": "RoPE (Megatron's older spelling of --position-embedding-type rope): the llama "
                                        "family.",
}
FAMILY_OF_SWITCH = {"--swiglu": "llama", "--no-position-embedding": "llama", "--disable-bias-linear": "llama",
                    "--use-rotary-position-embeddings": "llama"}

# Megatron flags that set fields of ours: flag -> (its argparse options, the fields a value sets where not given
# otherwise (the first must not be given otherwise with another value; none: the value asks for nothing and the
# flag has no effect), its help).
SETTING: dict[str, tuple[dict, Callable[[object], dict], str]] = {
    "--use-rope-scaling": (_ON, lambda _: dict(rope_scaling_type="llama3", rope_scaling_factor=8.0,
                                               rope_scaling_original_max_position_embeddings=8192),
                           "Llama 3.1's RoPE scaling: --rope-scaling-type llama3, with Megatron's factor 8 (or "
                           "--rope-scaling-factor) over an original context of 8192."),
    "--rotary-seq-len-interpolation-factor": (
        dict(type=float, metavar="FACTOR"),
        lambda factor: {} if factor == 1 else dict(rope_scaling_type="linear", rope_scaling_factor=factor),
        "Positions divided by FACTOR (position interpolation): --rope-scaling-type linear --rope-scaling-factor "
        "FACTOR; 1 has no effect."),
    "--recompute-activations": (_ON, lambda _: dict(recompute_granularity="selective"),
                                "Selective recomputation of the attention core: --recompute-granularity selective."),
}

# Megatron's RoPE flags of multi-latent attention (MLATransformerConfig's rope_type, rotary_scaling_factor, mscale,
# mscale_all_dim; its YaRN over an original context of 4096, betas 32 and 1): read into our --rope-scaling-* fields
# with --multi-latent-attention. Flag -> (options, Megatron's default, help).
MLA_ROPE: dict[str, tuple[dict, object, str]] = {
    "--rope-type": (dict(choices=("rope", "yarn")), "yarn",
                    "MLA's RoPE: yarn (Megatron's default for MLA; plain RoPE while --rotary-scaling-factor is 1) or "
                    "rope."),
    "--rotary-scaling-factor": (_FLOAT, 1.0, "MLA's YaRN factor: above 1, --rope-scaling-type yarn with this factor "
                                             "over --rope-scaling-original-max-position-embeddings (default 4096)."),
    "--mscale": (_FLOAT, 1.0, "MLA's YaRN: --rope-scaling-mscale (the numerator of cos and sin's factor)."),
    "--mscale-all-dim": (_FLOAT, 0.0, "MLA's YaRN: --rope-scaling-mscale-all-dim (the denominator of cos and sin's "
                                      "factor; the softmax scale is multiplied by its term squared)."),
}

FP8_FLAGS: dict[str, dict] = {
    "--fp8-format": _TEXT, "--fp8-recipe": _TEXT, "--fp8-margin": _INT, "--fp8-interval": _INT,
    "--fp8-amax-history-len": _INT, "--fp8-amax-compute-algo": _TEXT, "--fp8-param-gather": _ON,
    "--fp8-wgrad": _ON, "--first-last-layers-bf16": _ON, "--num-layers-at-start-in-bf16": _INT,
    "--num-layers-at-end-in-bf16": _INT,
}


def _dest(flag: str) -> str:
    return "megatron_" + flag.lstrip("-").replace("-", "_")


_GROUPS = (("Megatron model-shape flags (restating a family)", RESTATING),
           ("Megatron flags that set our fields", {flag: options for flag, (options, _, _) in SETTING.items()}),
           ("Megatron's multi-latent attention RoPE flags",
            {flag: options for flag, (options, _, _) in MLA_ROPE.items()}),
           ("Megatron flags accepted with no effect here", {flag: options for flag, (options, _) in NO_EFFECT.items()}),
           ("Megatron flags of features not implemented here (refused)",
            {flag: options for flag, (options, _, _) in REFUSED.items()}),
           ("Megatron FP8 flags (refused: no FP8 here)", FP8_FLAGS))


def _help(flag: str) -> str:
    if flag in RESTATING_HELP:
        return RESTATING_HELP[flag]
    if flag in SETTING:
        return SETTING[flag][2]
    if flag in MLA_ROPE:
        return MLA_ROPE[flag][2]
    if flag in NO_EFFECT:
        return f"No effect here: {NO_EFFECT[flag][1]}."
    if flag in REFUSED:
        _, why, neutral = REFUSED[flag]
        return f"Refused: {why}." + ("" if neutral is _ANY else f" Accepted as {neutral} (no effect).")
    return "Refused: FP8 training is not implemented."


def add_megatron_flags(parser: argparse.ArgumentParser) -> None:
    """The three groups of flags, each read back by `megatron_settings`."""
    for title, flags in _GROUPS:
        group = parser.add_argument_group(title)
        for flag, options in flags.items():
            group.add_argument(flag, dest=_dest(flag), default=argparse.SUPPRESS, help=_help(flag), **options)


def flags_markdown_rows() -> list[str]:
    """These flags' rows of docs/flags.md's table."""
    return [f"| `{flag}` | | {_help(flag)} |" for _, flags in _GROUPS for flag in flags]


class MegatronSettings(NamedTuple):
    family: str | None  # the family the restating flags name, None when none names one
    said_by: str  # those flags, for a message
    no_effect: list[str]  # the no-effect flags given, for the start-up log


def _refuse_missing_features(given: dict) -> None:
    """ConfigError naming the first REFUSED flag given with a value that asks for its feature, what is missing, the
    flags of the same feature to drop, and the other missing features given."""
    refused = [flag for flag, (_, _, neutral) in REFUSED.items()
               if _dest(flag) in given and (neutral is _ANY or given[_dest(flag)] != neutral)]
    if not refused:
        return
    why = REFUSED[refused[0]][1]
    same = [flag for flag in refused if REFUSED[flag][1] == why]
    others = [flag for flag in refused if REFUSED[flag][1] != why]
    raise ConfigError(f"{refused[0]}: {why}; drop {', '.join(same)}"
                      + (f" (also not implemented: {', '.join(others)})" if others else ""))


def _mla_rope(given: dict) -> list[str]:
    """Reads MLA_ROPE's flags into the --rope-scaling-* fields; returns those given that ask for nothing (plain RoPE).
    Raises ConfigError for them without --multi-latent-attention, or against a --rope-scaling-type given."""
    values = {flag: given.pop(_dest(flag)) for flag in MLA_ROPE if _dest(flag) in given}
    if not values:
        return []
    if not given.get("multi_latent_attention"):
        if values == {"--rope-type": "rope"}:
            return ["--rope-type"]
        raise ConfigError(f"{next(iter(values))}: {_YARN}; Megatron's --rope-type, --rotary-scaling-factor, --mscale "
                          "and --mscale-all-dim are read with --multi-latent-attention")
    rope_type, factor, mscale, mscale_all_dim = (values.get(flag, MLA_ROPE[flag][1]) for flag in MLA_ROPE)
    if rope_type == "rope" or factor == 1.0:
        require(factor == 1.0, f"--rotary-scaling-factor={factor} with --rope-type rope: plain RoPE has no factor "
                               "here; drop one of them")
        return list(values)
    fields = dict(rope_scaling_type="yarn", rope_scaling_factor=factor, rope_scaling_mscale=mscale,
                  rope_scaling_mscale_all_dim=mscale_all_dim)
    for name, value in fields.items():
        require(given.setdefault(name, value) == value, f"--rotary-scaling-factor {factor} with "
                f"--multi-latent-attention means --{name.replace('_', '-')} {value}, but it is {given[name]}; drop one")
    given.setdefault("rope_scaling_original_max_position_embeddings", 4096)  # MLATransformerConfig's
    return []


def megatron_settings(given: dict) -> MegatronSettings:
    """Pops the groups' values from the parsed flags, setting the fields the SETTING switches set. Raises
    ConfigError, one line, for a feature not implemented, for FP8, for restating flags that disagree, for a switch
    contradicting a flag, and for a shape no family computes."""
    _refuse_missing_features(given)
    neutral = [flag for flag in REFUSED if given.pop(_dest(flag), None) is not None]
    for flag, (_, fields_of, _) in SETTING.items():
        if _dest(flag) not in given:
            continue
        fields = fields_of(given.pop(_dest(flag)))
        if not fields:
            neutral.append(flag)
            continue
        (name, value), *defaults = fields.items()
        if given.setdefault(name, value) != value:
            raise ConfigError(f"{flag} means --{name.replace('_', '-')} {value}, but it is {given[name]}; drop one")
        for name, value in defaults:
            given.setdefault(name, value)
    neutral += _mla_rope(given)
    fp8 = [flag for flag in FP8_FLAGS if _dest(flag) in given]
    if fp8:
        raise ConfigError(f"{fp8[0]}: FP8 training is not implemented here; drop the FP8 flags "
                          f"({', '.join(fp8)}) and train in --bf16")
    no_effect = [flag for flag in NO_EFFECT if given.pop(_dest(flag), None) is not None] + neutral
    values = {flag: given.pop(_dest(flag)) for flag in RESTATING if _dest(flag) in given}
    if values.get("--position-embedding-type") == "yarn":
        raise ConfigError(f"--position-embedding-type yarn: {_YARN}; give --position-embedding-type rope with them")
    said = {f"{flag} {value}": FAMILY_OF_VALUE[value] for flag, value in values.items() if isinstance(value, str)}
    said.update({flag: FAMILY_OF_SWITCH[flag] for flag in values if flag in FAMILY_OF_SWITCH})
    families = sorted(set(said.values()))
    if len(families) > 1:
        by_family = "; ".join(f"{family}: {', '.join(f for f, fam in said.items() if fam == family)}"
                              for family in families)
        raise ConfigError(f"these flags name different families ({by_family}); our families compute llama "
                          "(RMSNorm, RoPE, SwiGLU, no linear biases) or gpt2 (LayerNorm, learned positions, GELU, "
                          "biases)")
    return MegatronSettings(families[0] if families else None, ", ".join(said), no_effect)
