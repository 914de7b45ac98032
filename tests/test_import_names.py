"""Our import names beside the ecosystem's: Hugging Face's `kernels` package (a hard dependency of
transformers from 5.25 on) owns the top-level name `kernels`, so ours live at `megatron_lite.kernels`.

Each check runs in a fresh interpreter from the repository root, the entry mode that used to
shadow the Hub's package (the root is first on sys.path there)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# transformers' Llama and the Hub's `kernels` in the process that trains with our fused kernels
# (Triton under the interpreter): the same weights, three AdamW steps on the same batch, the same
# losses as transformers, and the fused ops' autograd nodes on the graph (no silent fallback).
BESIDE_TRANSFORMERS = """\
import sys
from pathlib import Path
import torch
import kernels
import transformers
from transformers import LlamaConfig, LlamaForCausalLM
import megatron_lite.kernels
from megatron_lite.hf.convert import from_hf_state
from megatron_lite.hf.families import model_config_from_hf
from megatron_lite.model.gpt import GPTModel
from helpers.graph import graph_nodes
from test_model_fused_kernels import KERNEL_NODES

root = Path.cwd().resolve()
assert not Path(kernels.__file__).resolve().is_relative_to(root), kernels.__file__
assert Path(megatron_lite.kernels.__file__).resolve().is_relative_to(root / "megatron_lite")
torch.manual_seed(0)
hf_config = LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=16)
hf = LlamaForCausalLM(hf_config)
config = model_config_from_hf(hf_config.to_dict(), make_vocab_size_divisible_by=8)
assert config.fused_kernels, "fused kernels are the default"
ours = GPTModel(config)
ours.load_state_dict(from_hf_state(hf.state_dict(), config))
tokens = torch.randint(0, 64, (2, 17))
inputs, labels = tokens[:, :-1], tokens[:, 1:]
optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-3, weight_decay=0.1) for m in (hf, ours)]
for step in range(3):
    hf_loss = torch.nn.functional.cross_entropy(hf(input_ids=inputs).logits.flatten(0, 1), labels.flatten())
    our_loss = ours(inputs, labels).mean()
    if step == 0:
        assert KERNEL_NODES["llama"] <= graph_nodes(our_loss), graph_nodes(our_loss)
    assert abs(hf_loss.item() - our_loss.item()) < 1e-4 * hf_loss.item(), (step, hf_loss.item(), our_loss.item())
    for loss, optimizer in zip((hf_loss, our_loss), optimizers):
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
print("transformers", transformers.__version__, "kernels", kernels.__file__)
"""


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    environment = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests")]), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, env=environment,
                          timeout=240)


def test_hf_kernels_and_transformers_beside_our_fused_kernels() -> None:
    pytest.importorskip("kernels", reason="Hugging Face's kernels package is not installed")
    result = _run(BESIDE_TRANSFORMERS, TRITON_INTERPRET="1", MEGATRON_LITE_TRITON="1")
    assert result.returncode == 0, result.stderr[-3000:]


def test_no_top_level_kernels_of_ours() -> None:
    """From the root, `import kernels` is the Hub's package or nothing: never a folder of ours."""
    assert not (ROOT / "kernels").exists()
    result = _run("import importlib.util; spec = importlib.util.find_spec('kernels');"
                  "print(spec.origin if spec else '')")
    assert result.returncode == 0, result.stderr
    assert not Path(result.stdout.strip() or "/").resolve().is_relative_to(ROOT), result.stdout
