"""The training code a step is predicted for: what of its kernels and its overlap changes the
time of the same layout. The planner predicts this code (THIS_CODE); --validate predicts each
published run with the code that ran it (planner/published.py), so that the comparison is of
the same work, not of two implementations.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Software:
    name: str
    attention: str = "flash"
    """"flash": a FlashAttention-class kernel (causal blocks skipped, no s x s tensor, at the
    calibration's attention efficiency); "unfused": the scores materialised for a fused masked
    softmax, as Megatron-LM 2021 did (full s x s matmuls at GEMM efficiency, the scores' bytes)."""
    fused_elementwise: bool | None = None
    """Norms, activations and RoPE in fused kernels (Transformer Engine's, torch.compile's, ours),
    each moving its tensors once; False: eager PyTorch ops, which move them several times. None:
    as the config runs this code (--fused-kernels or --compile)."""
    fused_loss: bool | None = None
    """The output layer and cross-entropy fused, the logits never materialised; None: as the
    config runs this code (--fused-kernels on a GPU)."""
    tp_comm_overlap: bool = False
    """Tensor-parallel collectives overlapped with the GEMMs (Megatron-Core's --tp-comm-overlap)."""
    pp_overlap: bool = False
    """Pipeline sends and receives overlapped with compute (Megatron-Core posts them ahead);
    ours are posted and waited for within each schedule step."""
    pp_sends_split_over_tp: bool = False
    """Megatron-LM 2021's scatter-gather: a pipeline send carries 1/tp of the activation."""
    separate_projections: bool = False
    """q, k, v and the MLP's gate and up as linears of their own (each its own GEMM kernel), as
    torchtitan's and picotron's Llama write them; ours and Megatron's fuse QKV and gate with up."""
    selective: str = "modules"
    """What selective recomputation replays: "modules", ours (--recompute-modules, default core
    attention); "every_other_matmul", torchtitan's op policy (every second matmul of a layer's
    forward and every op but attention, whose output is kept: its _save_list)."""


THIS_CODE = Software("megatron_lite")
# Megatron-LM's fused kernels (LayerNorm, bias-GeLU, masked softmax); its vocab-parallel
# cross-entropy reads materialised logits, as every code below but ours does.
MEGATRON_2021 = Software("Megatron-LM (2021)", attention="unfused", fused_elementwise=True, fused_loss=False,
                         pp_sends_split_over_tp=True)
MEGATRON_CORE = Software("Megatron-Core", fused_elementwise=True, fused_loss=False, tp_comm_overlap=True,
                         pp_overlap=True)
TORCHTITAN = Software("torchtitan", fused_elementwise=False, fused_loss=False, separate_projections=True,
                      selective="every_other_matmul")
# torch.compile of each transformer block fuses its elementwise ops.
TORCHTITAN_COMPILED = Software("torchtitan + torch.compile", fused_elementwise=True, fused_loss=False,
                               separate_projections=True, selective="every_other_matmul")
# picotron's norms (flash-attn's Triton RMSNorm), RoPE (flash-attn's) and attention are fused
# kernels; only its SwiGLU runs as two eager ops (picotron/model.py).
PICOTRON = Software("picotron", fused_elementwise=True, fused_loss=False, separate_projections=True)
