"""The model with fused kernels (ModelConfig.fused_kernels) against the plain-torch model.

The kernels run as Triton under the interpreter on CPU (MEGATRON_LITE_TRITON=1, fp32), on
shapes where each of them applies (head dim 16, which flash attention supports).

Tolerances (fp32): the kernels sum rows, tiles and the softmax in other orders than torch,
so the two models differ by rounding only (measured: 4e-8 relative on the loss, 2e-8 on the
grads). Losses must agree to 1e-6 relative and one step's gradients to 1e-6 absolute, the
bar the parallel layouts meet against one device.
"""
from __future__ import annotations

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers.graph import graph_nodes
from helpers.parity import Tolerance, assert_parity, merge_ranks, run_steps
from helpers.tiny import tiny_config
from megatron_lite.comm import METER
from megatron_lite.config import Config
from megatron_lite.distributed.spawn import run_on_ranks
from megatron_lite.model.gpt import GPTModel, init_weights

ROOT = Path(__file__).resolve().parents[1]
FAMILIES = ("llama", "gpt2")
VOCAB = 258
# One step with kernels on and off at tp 2: the same math in other float orders (see tests/helpers/parity.py).
# Measured: grad 4.6e-7, grad norm 0, loss 8.6e-8, weight 4.8e-6.
FUSED = Tolerance(grad=1e-5, grad_norm_first=1e-6, grad_norm=1e-6, loss=1e-6, weight=1e-4)
# The autograd nodes of the kernels each family must run, so a silent fallback to torch fails.
KERNEL_NODES = {
    "llama": {"RowNormFunctionBackward", "RotaryFunctionBackward", "FlashAttentionFunctionBackward",
              "SwiGLUFunctionBackward", "FusedLinearCrossEntropyFunctionBackward"},
    "gpt2": {"RowNormFunctionBackward", "FlashAttentionFunctionBackward", "GeluFunctionBackward",
             "FusedLinearCrossEntropyFunctionBackward"},
}


def fused_config(family: str, fused: bool, tp: int = 1, **model) -> Config:
    """hidden 64, 4 heads of dim 16, 2 layers, seq 16, and `model`'s fields; tp > 1 adds sequence parallelism."""
    config = tiny_config(family, model=dict(hidden_size=64, num_query_groups=2 if family == "llama" else 4,
                                            fused_kernels=fused, **model))
    return config.updated(parallel={"tensor_model_parallel_size": tp, "sequence_parallel": tp > 1})


def loss_and_grads(family: str, fused: bool, **model) -> tuple[float, dict[str, torch.Tensor], set[str]]:
    config = fused_config(family, fused, **model).model
    model = GPTModel(config)
    init_weights(model, config, seed=0)
    tokens = torch.randint(0, VOCAB, (2, config.seq_length + 1), generator=torch.Generator().manual_seed(0))
    loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    loss.backward()
    return loss.item(), {name: p.grad for name, p in model.named_parameters()}, graph_nodes(loss)


# The llama model slides a window of 5 tokens on its first layer and attends to the whole context
# on its second (Megatron's pattern [1, 0]): the kernel's windowed and plain programs in one model,
# each layer given its own window.
MODEL = {"llama": dict(window_size=5, window_attn_skip_freq=[1, 0]), "gpt2": {}}


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_matches_plain_torch(force_triton: None, family: str) -> None:
    loss, grads, _ = loss_and_grads(family, fused=False, **MODEL[family])
    fused_loss, fused_grads, nodes = loss_and_grads(family, fused=True, **MODEL[family])
    assert KERNEL_NODES[family] <= nodes, f"ran in torch, not as kernels: {KERNEL_NODES[family] - nodes}"
    assert abs(fused_loss - loss) / loss < 1e-6
    for name, grad in grads.items():
        assert (fused_grads[name] - grad).abs().max().item() < 1e-6, name


def tp_sp_worker() -> dict[tuple[str, bool], tuple[dict, dict]]:
    """One training step per family with fused kernels off and on: the result, and the bytes metered."""
    # A fresh process: the interpreter must be chosen before megatron_lite/kernels/ is first imported.
    os.environ.update(TRITON_INTERPRET="1", MEGATRON_LITE_TRITON="1")
    results = {}
    for family in FAMILIES:
        for fused in (False, True):
            METER.reset()
            results[(family, fused)] = run_steps(fused_config(family, fused, tp=2), 1), dict(METER.bytes)
    return results


@functools.cache
def spawned() -> list[dict]:
    """One spawn of 2 ranks for the module; the tests read its results."""
    return run_on_ranks(tp_sp_worker, 2)


@pytest.mark.parametrize("family", FAMILIES)
def test_fused_model_under_tensor_and_sequence_parallelism(family: str) -> None:
    """tp=2 + SP: sharded heads and MLP channels, sequence-split norms, and the loss from the
    vocab-parallel cross-entropy kernel, whose max and sums go through the metered all-reduces."""
    ranks = spawned()
    plain, fused = (merge_ranks([rank[(family, f)][0] for rank in ranks]) for f in (False, True))
    assert_parity(plain, fused, VOCAB, FUSED)
    # Both losses reduce the same three numbers per token (max, then sum-exp with target logit).
    assert ranks[0][(family, True)][1] == ranks[0][(family, False)][1]


def test_no_fused_kernels_flag_runs_without_triton() -> None:
    """--no-fused-kernels is the plain-torch model: Triton is never imported, even when
    MEGATRON_LITE_TRITON=1 asks for the kernels. Of `megatron_lite/kernels/` only the package and the
    Triton-free references it computes with may load, no kernel module."""
    code = (
        "import sys, torch\n"
        "from megatron_lite.training.arguments import parse_args\n"
        "from megatron_lite.model.gpt import GPTModel, init_weights\n"
        "config = parse_args(['--no-fused-kernels', '--num-layers', '1', '--hidden-size', '64']).model\n"
        "assert config.fused_kernels is False\n"
        "model = GPTModel(config)\n"
        "init_weights(model, config, 0)\n"
        "tokens = torch.randint(0, config.vocab_size, (2, 16))\n"
        "model(tokens, tokens).mean().backward()\n"
        "loaded = sorted(m for m in sys.modules if (m.split('.')[0] == 'triton' "
        "or m.startswith('megatron_lite.kernels'))\n"
        "                and m not in ('megatron_lite.kernels', 'megatron_lite.kernels.reference'))\n"
        "assert not loaded, loaded\n"
    )
    env = {**os.environ, "MEGATRON_LITE_TRITON": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=env,
                            timeout=120)
    assert result.returncode == 0, result.stderr
