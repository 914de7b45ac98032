"""Initial weights at shard cost: each rank draws the values of its own slice of every full tensor,
never the full tensor.

The value at an element is a function of the generator's key (the seed and the parameter's name)
and of the element's position in the full single-device tensor only, so every layout (any tp,
pp, vpp, ep; the fused fc1's gate and up halves, the fused QKV's groups, padded vocabulary
tables) starts from the same weights as one device, whichever slice a rank holds.

The generator is counter-based: the element's flat index in the full tensor, hashed with the
key by two rounds of lowbias32 (a 32-bit integer hash, bijective, with low avalanche bias; from
C. Wellons' hash prospector), is a uniform p in (0, 1); Acklam's rational approximation of the
normal quantile (relative error < 1.2e-9) turns it into a standard normal. Only integer ops,
+ - * / and sqrt, each rounded once by IEEE 754, compute it (log is a series, not the library's):
CPU libraries compute log and cos with vector code in the body of a tensor and scalar code in its
tail, which can differ by an ulp, and a value must not depend on where in a shard it falls.
Cost: about 5x torch's own normal_ per element on CPU, paid for the shard only.
"""
from __future__ import annotations

import math

import torch

from megatron_lite.placement import full_shape, local_indices, placement

_WORD = 1 << 32
_CHUNK = 1 << 18  # elements drawn at once: temporaries of a few MB, and few enough ops that their overhead is small

# Acklam's coefficients: the central region's numerator and denominator in r = (p - 1/2)^2, the
# tails' in u = sqrt(-2 log p); highest power first, each denominator's constant term 1.
_CENTRAL = ((-3.969683028665376e+01, 2.209460984245205e+02, -2.759285104469687e+02, 1.383577518672690e+02,
             -3.066479806614716e+01, 2.506628277459239e+00),
            (-5.447609879822406e+01, 1.615858368580409e+02, -1.556989798598866e+02, 6.680131188771972e+01,
             -1.328068155288572e+01, 1.0))
_TAIL = ((-7.784894002430293e-03, -3.223964580411365e-01, -2.400758277161838e+00, -2.549732539343734e+00,
          4.374664141464968e+00, 2.938163982698783e+00),
         (7.784695709041462e-03, 3.224671290700398e-01, 2.445134137142996e+00, 3.754408661907416e+00, 1.0))
_TAIL_P = 0.02425  # below this p (and above 1 - it), the tail's formula


def _int32(c: int) -> int:
    """A 32-bit word as the int32 that has its bits (torch has no unsigned 32-bit arithmetic)."""
    c %= _WORD
    return c - _WORD if c >= _WORD // 2 else c


_M1, _M2 = _int32(0x7FEB352D), _int32(0x846CA68B)


def _lowbias32_(x: torch.Tensor) -> torch.Tensor:
    """lowbias32 in place on int32 words: products wrap mod 2^32, shifts made logical by a mask."""
    x ^= (x >> 16) & 0xFFFF
    x *= _M1
    x ^= (x >> 15) & 0x1FFFF
    x *= _M2
    x ^= (x >> 16) & 0xFFFF
    return x


def _horner(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    y = torch.full_like(x, coefficients[0])
    for c in coefficients[1:]:
        y.mul_(x).add_(c)
    return y


def _log(p: torch.Tensor) -> torch.Tensor:
    """Natural log of positive fp64 p: exponent and mantissa m in [1/sqrt2, sqrt2) exactly, then
    log m = 2 atanh((m - 1) / (m + 1)) by its series (|t| < 0.172: ten terms reach fp64 rounding)."""
    m, e = torch.frexp(p)
    low = m < 1 / math.sqrt(2.0)
    m, e = torch.where(low, m * 2, m), (e - low.to(e.dtype)).double()
    t = (m - 1) / (m + 1)
    series = _horner(t * t, tuple(1.0 / k for k in range(19, 0, -2)))
    return 2 * t * series + e * math.log(2.0)


def standard_normal(index: torch.Tensor, key: int) -> torch.Tensor:
    """fp64 standard normals, one per int64 `index` (an element's flat position in its full tensor)."""
    lo = ((index & (_WORD - 1)) - _WORD // 2).to(torch.int32)  # the low word's bits, as int32
    word = _lowbias32_(_lowbias32_(lo ^ _int32(key)) ^ (index >> 32).to(torch.int32))
    p = word.double().add_(_WORD // 2 + 0.5).mul_(1.0 / _WORD)  # in (0, 1), never 0 or 1
    q = p - 0.5
    r = q * q
    z = _horner(r, _CENTRAL[0]).mul_(q).div_(_horner(r, _CENTRAL[1]))
    tail = r > (0.5 - _TAIL_P) ** 2
    if tail.any():
        u = (-2 * _log(torch.minimum(p[tail], 1 - p[tail]))).sqrt_()
        z_tail = _horner(u, _TAIL[0]) / _horner(u, _TAIL[1])  # the lower tail's (negative) value
        z[tail] = torch.where(q[tail] < 0, z_tail, -z_tail)
    return z


def normal_range_(out: torch.Tensor, param: torch.Tensor, key: int, std: float, lo: int, hi: int) -> None:
    """Fill `out` (1-D, hi - lo elements) with the Normal(0, std) values of the full tensor at the positions of the
    elements [lo, hi) of `param` flattened, this rank's shard of it (see its placement; `param` may be on the meta
    device: ZeRO-3 draws only its slice of the shard, distributed/data_parallel.py); rows past the placement's
    unpadded_rows zero."""
    index = local_indices(param)
    shape = full_shape(param)
    device = out.device
    # Each local row (every dimension but the last) by its row number in the full tensor.
    rows = torch.zeros(1, dtype=torch.int64, device=device)
    for dim in range(param.dim() - 1):
        rows = (rows[:, None] * shape[dim] + index[dim].to(device)[None, :]).flatten()
    columns, width = index[-1].to(device), shape[-1]
    real = placement(param).unpadded_rows
    for start in range(lo, hi, _CHUNK):
        flat = torch.arange(start, min(start + _CHUNK, hi), device=device)
        row, column = flat // columns.numel(), flat % columns.numel()
        values = standard_normal(rows[row] * width + columns[column], key).mul_(std)
        if real is not None:  # the padded vocabulary rows (dimension 0) start at zero
            values[index[0].to(device)[row // (rows.numel() // index[0].numel())] >= real] = 0.0
        # fp32 first, as the fp32 model's weights are, then the parameters' dtype (bf16/fp16 round those).
        out[start - lo:start - lo + flat.numel()] = values.float().to(out.dtype)
