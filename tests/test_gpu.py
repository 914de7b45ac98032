"""The kernels and the fused model on a CUDA GPU, where the CPU tests run the Triton interpreter.

    python -m pytest -m gpu -q tests/test_gpu.py    # sized for under 2 minutes on an H200, mostly compiling

Every test is marked `gpu` and skipped without CUDA. Only here do the kernels run as compiled
GPU code, in bf16 and fp16, on GPU-sized shapes, with the launch configurations only a GPU uses
(4096-column blocks in the cross entropy, flash attention's tiles per head dim), with cuBLAS's
fp32-output addmm accumulating the fused loss's weight gradient, and inside training on CUDA.
Inputs and implementations are the benchmark's (tools/kernel_bench_cases.py: "ours", the public op,
and "eager", its reference), so each op is tested as it is benchmarked.

Tolerances. A kernel on 16-bit inputs is compared with its reference run in fp32 on the very
same values (inputs and cotangents are drawn in the 16-bit dtype, then upcast), so what differs
is the kernel's own rounding. The kernels compute in fp32 and round each output to the storage
dtype once, plus a few intermediates on the way (the norms' residual sum h, the fused loss's
logits and their gradient). One rounding is at most half a unit in the last place, 2^-9
relative in bf16 (8 significant bits) and 2^-12 in fp16 (11); a few of them add up, so the
allowed relative error is twice the dtype's epsilon: 1.6e-2 for bf16 (torch.testing's default),
2e-3 for fp16. On top of it, per row (the last dim):
  - rope, swiglu, gelu and cross_entropy's logit gradient are elementwise: each entry is one fp32
    expression rounded once. 1e-6 of the row's largest entry absorbs the fp32 evaluation-order
    differences of results that cancel to near zero (gelu far left, a rotation's difference).
  - the norms and the fused loss sum over a row, the vocab or the tokens, so an entry that sums
    to near zero carries errors the size of its terms: rtol times the row's largest entry (the
    row, not the tensor: the weight-gradient row of a vocab entry that is no token's target is
    small, and its softmax terms must still be checked).
  - fp16 rounds below its smallest normal in absolute steps of 6e-8 (the fp32 reference does
    not), e.g. a softmax gradient of 1e-9: one such step is allowed everywhere.
Attention is the exception: its gradients cancel (dS = P (dP - delta)), so entries of dq and dk
are far smaller than their terms, and any 16-bit attention rounds P and dS to 16 bits. As in
FlashAttention's own tests, each of its tensors may be off the fp32 reference by at most twice
as much as torch's attention on the same 16-bit inputs (SDPA's flash backend), plus half a unit
of the largest entry. Under the interpreter on CPU (small shapes; fp16, as its bf16 dot is
broken) the per-row bound failed for dq, while the kernel stayed within 1.2x of SDPA's error.
"""
from __future__ import annotations

import pytest
import torch
from test_model_fused_kernels import KERNEL_NODES

from helpers.graph import graph_nodes
from helpers.tiny import tiny_config
from megatron_lite.config import Config
from megatron_lite.kernels.flash_attention import flash_attention, flash_attention_backward, flash_attention_forward
from megatron_lite.kernels.fused_linear_cross_entropy import fused_linear_cross_entropy
from megatron_lite.kernels.reference import attention_forward_reference
from megatron_lite.model.gpt import GPTModel, init_weights
from megatron_lite.training.loop import pretrain
from tools.kernel_bench_cases import OPS, Case

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

DTYPES = [pytest.param(torch.bfloat16, id="bf16"), pytest.param(torch.float16, id="fp16")]
RTOL = {torch.bfloat16: 1.6e-2, torch.float16: 2e-3}  # twice the epsilon: see the module docstring
ELEMENTWISE = {"rope", "swiglu", "gelu", "cross_entropy"}
AGAINST_TORCH_16BIT = {"flash_attention", "flash_attention_documents"}
# The kernel_bench_cases builders' arguments, GPU-sized and ragged where the GPU's blocks have edges.
# A new op in OPS without a shape here fails at collection (KeyError), not silently untested.
SHAPES = {
    "rmsnorm": [(4096, 3072)],  # 3072 columns in a 4096-wide row block
    "layernorm": [(4096, 3072)],
    "rope": [(2, 1024, 24, 8, 128)],  # Llama-3.2-3B: 24 query heads in a 32-wide block, 8 kv heads
    "swiglu": [(2048, 11008)],  # 11008 is not a multiple of the 1024-column block
    "gelu": [(4095, 3001)],  # an element count that leaves the last 1024-element block ragged
    "cross_entropy": [(2048, 128256)],  # Llama-3's vocab: 31.3 blocks of 4096 columns
    "fused_linear_cross_entropy": [(1024, 1024, 32000)],
    # Causal, GQA 4:1 (Llama-3.2-1B's and Llama-3-8B's heads); 1000 is ragged in every tile size.
    "flash_attention": [(2, 32, 8, 1000, 64), (1, 32, 8, 1000, 128)],
    # Five uneven documents per sample (--reset-attention-mask), their edges inside the tiles.
    "flash_attention_documents": [(2, 32, 8, 1000, 64, 5)],
}
KERNEL_CASES = [pytest.param(op, shape, id=f"{op}-{'x'.join(map(str, shape))}") for op in OPS for shape in SHAPES[op]]


def _case(op: str, shape: tuple, dtype: torch.dtype) -> Case:
    return OPS[op][2](*shape, torch.device("cuda"), dtype)


def _fp32(inputs: dict) -> dict:
    """The same values in fp32, as fresh leaves (integer targets and fp32 angles as they are)."""
    return {k: v.detach().float().requires_grad_(v.requires_grad) if v.is_floating_point() else v
            for k, v in inputs.items()}


def _run(fn, inputs: dict, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """fn(**inputs)'s outputs and the grads of the inputs that require grad, for cotangents drawn
    from a fixed seed in `dtype`: a kernel and its fp32 reference get the same values."""
    outs = fn(**inputs)
    outs = list(outs) if isinstance(outs, tuple) else [outs]
    gen = torch.Generator("cuda").manual_seed(1)
    cotangents = [torch.randn(o.shape, device="cuda", generator=gen).to(dtype).to(o.dtype) for o in outs]
    leaves = {f"d{k}": v for k, v in inputs.items() if v.requires_grad}
    grads = torch.autograd.grad(outs, list(leaves.values()), cotangents)
    return {**{f"out{i}": o.detach() for i, o in enumerate(outs)}, **dict(zip(leaves, grads))}


def _assert_close(got: dict, want: dict, dtype: torch.dtype, elementwise: bool) -> None:
    rtol, info = RTOL[dtype], torch.finfo(dtype)
    for name, expected in want.items():
        actual, expected = got[name].float(), expected.float()
        row_max = expected.abs().amax(-1, keepdim=True) if expected.dim() else expected.abs()
        allowed = (1e-6 if elementwise else rtol) * row_max + rtol * expected.abs() + info.tiny * info.eps
        error = (actual - expected).abs()
        bad = ~(error <= allowed)  # NaN counts as off
        assert not bad.any(), (f"{name}: {int(bad.sum())} of {bad.numel()} entries off; largest error "
                               f"{error.max().item():.3g}, largest excess {(error - allowed).max().item():.3g}")


def _assert_no_worse_than(got: dict, want: dict, baseline: dict, dtype: torch.dtype) -> None:
    """Each tensor of `got` off `want` by at most twice `baseline`'s error, plus half a unit of its largest entry."""
    for name, expected in want.items():
        error = (got[name].float() - expected).abs().max().item()
        allowed = 2 * (baseline[name].float() - expected).abs().max().item() + (
            torch.finfo(dtype).eps / 2 * expected.abs().max().item())
        assert error <= allowed, f"{name}: largest error {error:.3g}, allowed {allowed:.3g}"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("op,shape", KERNEL_CASES)
def test_kernel_forward_and_backward_match_fp32_reference(op: str, shape: tuple, dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    case = _case(op, shape, dtype)
    inputs = case.make_inputs()
    got = _run(case.impls["ours"], inputs, dtype)
    want = _run(case.impls["eager"], _fp32(inputs), dtype)
    if op in AGAINST_TORCH_16BIT:
        _assert_no_worse_than(got, want, _run(case.impls["eager"], inputs, dtype), dtype)
    else:
        _assert_close(got, want, dtype, elementwise=op in ELEMENTWISE)


@pytest.mark.parametrize("dtype", DTYPES)
def test_flash_attention_block_forward_and_backward_with_lse(dtype: torch.dtype) -> None:
    """Ring attention's pieces at head dim 128 are the kernels of flash_attention (tested above) with
    the lse converted: to natural log out of the forward (the kernel keeps base 2), back into the
    backward, which takes an output and lse from outside. So they must give flash_attention's
    output and grads, and the reference's lse, whose only error is fp32 summation order."""
    torch.manual_seed(0)
    inputs = _case("flash_attention", SHAPES["flash_attention"][1], dtype).make_inputs()
    q, k, v = (t.detach() for t in inputs.values())
    do = torch.randn_like(q)
    out, lse = flash_attention_forward(q, k, v, causal=True)
    dq, dk, dv = flash_attention_backward(q, k, v, out, lse, do, causal=True)
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    want_out = flash_attention(*leaves, causal=True)
    want_out.backward(do)
    want_lse = attention_forward_reference(*(t.float() for t in (q, k, v)), causal=True)[1]
    got = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    want = dict(out=want_out.detach(), lse=want_lse, **{f"d{n}": t.grad for n, t in zip("qkv", leaves)})
    _assert_close(got, want, dtype, elementwise=False)


def test_fused_linear_cross_entropy_at_vocab_128k_matches_unfused_in_less_memory() -> None:
    """4096 tokens, hidden 2048, vocab 131072 in bf16, in chunks of 1024 tokens (four, as the
    default chunking splits 16k tokens at this vocab): as exact as the other kernels against the
    unfused reference in fp32, and below the unfused bf16 linear + cross entropy in peak memory
    (it holds the [4096, 131072] logits in bf16 and fp32). Peak memory is counted from what is
    allocated before each call (the shared inputs, the results of the call before)."""
    torch.manual_seed(0)
    case = _case("fused_linear_cross_entropy", (4096, 2048, 131072), torch.bfloat16)
    inputs = case.make_inputs()

    def fused(hidden, weight, target):
        return fused_linear_cross_entropy(hidden, weight, target, chunk_size=1024).mean()

    results, peaks = {}, {}
    for name, fn in (("fused", fused), ("unfused", case.impls["eager"])):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        results[name] = _run(fn, inputs, torch.bfloat16)
        peaks[name] = torch.cuda.max_memory_allocated() - start
    assert peaks["fused"] < peaks["unfused"], {k: f"{v / 2**30:.2f} GiB" for k, v in peaks.items()}
    want = _run(case.impls["eager"], _fp32(inputs), torch.bfloat16)
    _assert_close(results["fused"], want, torch.bfloat16, elementwise=False)


TRAIN_STEPS = 20
# Largest relative difference of any step's loss between the fused and the plain-torch run (not
# measured on a GPU yet; estimates). fp32: flash attention stays torch's (in fp32 its dots would
# run in TF32), the other kernels compute torch's math in another order: step 1 differs by ~1e-7,
# which Adam amplifies over the steps (an entry whose gradient is near zero moves by about lr
# either way) to an estimated 1e-5. bf16: both round matmul outputs and activations to 8 bits, in
# different places (a kernel keeps fp32 inside, torch rounds between ops), so the losses part by
# ~1e-3 in the first steps and drift: 2e-2 (0.07 nats at loss 3.5). A wrong kernel gradient trains
# another model: in these 20 steps the loss falls from 5.4 to about 3.3 (measured on CPU).
TRAIN_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
TRAIN_DTYPES = [pytest.param(torch.float32, id="fp32"), pytest.param(torch.bfloat16, id="bf16")]


def _train_config(fused: bool, dtype: torch.dtype) -> Config:
    """A small llama (hidden 256, 4 heads of dim 64 in 2 groups, seq 256), batch 8, on the built-in corpus."""
    return tiny_config(model=dict(hidden_size=256, num_attention_heads=4, num_query_groups=2, seq_length=256,
                                  fused_kernels=fused),
                       micro_batch_size=4, global_batch_size=8, train_iters=TRAIN_STEPS, log_interval=TRAIN_STEPS,
                       device="cuda", bf16=dtype == torch.bfloat16)


@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_fused_model_runs_the_kernels_on_cuda(dtype: torch.dtype) -> None:
    """So that the training comparison below compares kernels with torch, not torch with itself."""
    config = _train_config(True, dtype).model
    model = GPTModel(config).cuda()
    init_weights(model, config, seed=0)
    tokens = torch.randint(0, config.vocab_size, (2, config.seq_length + 1), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        loss = model(tokens[:, :-1], tokens[:, 1:]).mean()
    expected = KERNEL_NODES["llama"] - ({"FlashAttentionFunctionBackward"} if dtype == torch.float32 else set())
    missing = expected - graph_nodes(loss)
    assert not missing, f"ran in torch, not as kernels: {missing}"


@pytest.mark.parametrize("dtype", TRAIN_DTYPES)
def test_training_with_and_without_fused_kernels_agrees(dtype: torch.dtype) -> None:
    plain, fused = (pretrain(_train_config(f, dtype))["losses"] for f in (False, True))
    assert len(plain) == len(fused) == TRAIN_STEPS
    assert plain[-1] < 0.8 * plain[0], plain  # it learns: agreeing curves are not two flat lines
    worst = max(abs(a - b) / a for a, b in zip(plain, fused))
    assert worst < TRAIN_TOLERANCE[dtype], f"relative difference {worst:.2e}; plain {plain}, fused {fused}"
