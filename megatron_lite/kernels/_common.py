"""Helpers shared by the kernels: int64 addressing and launch sizing."""
import torch
import triton
import triton.language as tl

# A row is held in registers by one program; past this many columns it would spill.
MAX_FUSED_COLS = 65536


@triton.jit
def ptr_add(base, index, stride):
    """`base + index * stride`, with the product formed in int64.

    Program ids and int arguments below 2**31 arrive as int32, and e.g. row 16384 of a
    [16384, 131072] logits matrix starts at element 2**31: the int32 product would wrap
    to a negative offset. Every kernel indexes rows, heads and batches through here.
    """
    return base + tl.cast(index, tl.int64) * stride


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """`x` as a [rows, last_dim] matrix whose last dim has unit stride (copies only if needed)."""
    if x.stride(-1) != 1:
        x = x.contiguous()
    return x.reshape(-1, x.shape[-1])


def row_block(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for a kernel that holds one whole row of `n_cols` in registers."""
    block = triton.next_power_of_2(n_cols)
    if block > MAX_FUSED_COLS:
        raise ValueError(f"rows of {n_cols} columns exceed the fused limit of {MAX_FUSED_COLS}")
    return block, min(max(block // 256, 1), 16)


def persistent_programs(n_rows: int, device: torch.device) -> int:
    """How many programs to launch when each loops over many rows and keeps a partial sum.

    A few per SM keeps every SM busy while the [programs, cols] buffer of fp32 partial
    sums (reduced afterwards by torch) stays small. The interpreter runs programs one by
    one, so there a handful is enough to exercise the cross-program reduction.
    """
    if device.type == "cuda":
        per_device = 4 * torch.cuda.get_device_properties(device).multi_processor_count
    else:
        per_device = 4
    return max(1, min(n_rows, per_device))
