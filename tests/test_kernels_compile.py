"""Every kernel compiles for an H100 (sm_90) in bf16, without a GPU and without spilling.

The interpreter tests check the math; only the compiler sees the rest: Triton typing and
constexpr rules (a plain Python global read inside a kernel works in the interpreter and
fails to compile), and whether the chosen tiles fit the register file. So this test runs
this file as a script, in a fresh interpreter without TRITON_INTERPRET, which compiles each
kernel ahead of time (triton.compile with an explicit target needs no driver) and reports
its register and stack use from the cubin (cuobjdump, shipped with Triton's CUDA backend).

Signatures follow the kernels' naming convention: parameters starting with a capital letter
are pointers (bf16 data, fp32 statistics, int64 targets, int32 document positions), `eps` / `*_scale` are fp32,
every other lowercase parameter is an int32 and `tl.constexpr` ones come from each case.
"""
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FP32_POINTERS = {"Mean", "Rstd", "DW_PARTIAL", "DB_PARTIAL", "COS", "SIN", "MAX", "SUMEXP", "TARGET_LOGIT",
                 "LSE", "DLOSS", "DELTA"}
I32_POINTERS = {"DOC", "KEY_END"}  # flash attention's document starts and the rows that see each key


def _backend_tool(name: str) -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name


def _cases() -> list:
    """(kernel, constexprs, pointer args passed as None, num_warps, num_stages) per launch shape."""
    import torch

    from megatron_lite.kernels import _norm, cross_entropy, gelu, rope, swiglu
    from megatron_lite.kernels import flash_attention as fa
    from megatron_lite.kernels._common import row_block

    cuda = torch.device("cuda")
    block, warps = row_block(4096)
    cases = []
    for centered in (False, True):
        for residual in (False, True):
            nones = [n for n, on in (("R", residual), ("B", centered), ("Mean", centered)) if not on]
            flags = dict(CENTERED=centered, HAS_RESIDUAL=residual, HAS_BIAS=centered, BLOCK=block)
            cases.append((_norm._norm_fwd_kernel, flags, nones, warps, 3))
            optional = (("DH_OUT", residual), ("DB_PARTIAL", centered), ("Mean", centered))
            nones = [n for n, on in optional if not on]
            flags = dict(CENTERED=centered, HAS_BIAS=centered, HAS_DH_OUT=residual, BLOCK=block)
            cases.append((_norm._norm_bwd_kernel, flags, nones, warps, 3))
    for inverse in (False, True):
        tiles = dict(BLOCK_HQ=32, BLOCK_HK=8, BLOCK_D=64)  # Llama-3-8B: 32 q / 8 kv heads of 128
        cases.append((rope._rope_kernel, dict(INVERSE=inverse, **tiles), [], 4, 3))
    for kernel in (swiglu._swiglu_fwd_kernel, swiglu._swiglu_bwd_kernel):
        cases.append((kernel, dict(BLOCK=swiglu.BLOCK), [], 4, 3))
    for kernel in (gelu._gelu_fwd_kernel, gelu._gelu_bwd_kernel):
        constants = dict(SQRT_2_OVER_PI=gelu.SQRT_2_OVER_PI, COEFF=gelu.COEFF, BLOCK=gelu.BLOCK)
        cases.append((kernel, constants, [], 4, 3))
    ce = cross_entropy._launch_config(cuda)
    for kernel in (cross_entropy._ce_stats_kernel, cross_entropy._ce_grad_kernel):
        cases.append((kernel, dict(BLOCK=ce["BLOCK"]), [], ce["num_warps"], 3))
    every_variant = ((True, False, False), (False, False, False), (True, True, False), (True, False, True),
                     (False, False, True), (True, True, True))
    for head_dim in (64, 128):
        # Document masks on the causal attention, and on context parallelism's blocks (not causal).
        # Head dim 128 holds the most registers, so it takes every variant; 64 its plain and its
        # fullest (window and documents) causal ones, and context parallelism's block with documents.
        variants = every_variant if head_dim == 128 else ((True, False, False), (True, True, True),
                                                          (False, False, True))
        for causal, windowed, documents in variants:
            configs = fa._configs(head_dim, torch.bfloat16, cuda, documents)
            for kernel, config in zip((fa._fwd_kernel, fa._bwd_dkdv_kernel, fa._bwd_dq_kernel), configs):
                tiles = {k: v for k, v in config.items() if k.startswith("BLOCK")}
                flags = dict(CAUSAL=causal, WINDOWED=windowed, DOCUMENTS=documents, HEAD_DIM=head_dim, **tiles)
                cases.append((kernel, flags, [], config["num_warps"], config["num_stages"]))
        cases.append((fa._bwd_delta_kernel, dict(HEAD_DIM=head_dim, BLOCK_M=fa.DELTA_BLOCK), [], 4, 3))
    return cases


def _signature(kernel, constexprs: dict, nones: list) -> tuple[dict, dict]:
    import inspect

    signature, consts = {}, dict(constexprs, **{n: None for n in nones})
    for name in inspect.signature(kernel.fn).parameters:
        if name in consts:
            signature[name] = "constexpr"
        elif name[0].isupper():
            signature[name] = ("*fp32" if name in FP32_POINTERS else "*i64" if name == "TARGET"
                               else "*i32" if name in I32_POINTERS else "*bf16")
        else:
            signature[name] = "fp32" if name == "eps" or name.endswith("_scale") else "i32"
    return signature, {(kernel.arg_names.index(k),): v for k, v in consts.items()}


def compile_all() -> None:
    """Script side: compile every case, print one JSON line each."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sys.path.insert(0, str(REPO))
    for kernel, constexprs, nones, num_warps, num_stages in _cases():
        signature, consts = _signature(kernel, constexprs, nones)
        name = f"{kernel.fn.__name__} {constexprs}"
        try:
            compiled = triton.compile(
                ASTSource(fn=kernel, signature=signature, constexprs=consts),
                target=GPUTarget("cuda", 90, 32), options=dict(num_warps=num_warps, num_stages=num_stages),
            )
        except Exception as e:
            print(json.dumps(dict(name=name, error=str(e).splitlines()[-1])), flush=True)
            continue
        with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
            f.write(compiled.asm["cubin"])
            f.flush()
            usage = subprocess.run([_backend_tool("cuobjdump"), "-res-usage", f.name],
                                   capture_output=True, text=True, check=True).stdout
        stack = int(usage.split("STACK:")[1].split()[0])
        print(json.dumps(dict(name=name, stack=stack, shared=compiled.metadata.shared)), flush=True)


@pytest.mark.skipif(not _backend_tool("ptxas").exists() or not _backend_tool("cuobjdump").exists(),
                    reason="this triton install ships no CUDA backend tools (ptxas, cuobjdump)")
def test_every_kernel_compiles_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compile for real, not from an earlier cache
    proc = subprocess.run([sys.executable, __file__], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(results) == len(_cases())
    failures = [r for r in results if "error" in r or r["stack"] > 0 or r["shared"] > 227 * 1024]
    assert not failures, failures


if __name__ == "__main__":
    compile_all()
