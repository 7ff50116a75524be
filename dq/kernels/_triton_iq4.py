"""Triton kernel: IQ4_NL / IQ4_XS fake-quantization (``quantize_row_iq4_nl_impl``), bit-exact with libggml.

One lane per super-block (32 weights for IQ4_NL, 256 for IQ4_XS): it runs the C search of
:mod:`dq.kernels.ref_iq4` in registers, with every 32-term sum accumulated in C order in that lane, and
writes the dequantized weights; :func:`quant_error_iq4_triton` then reduces the error sums in float64 as
the torch reference does. The exactness rules are those of :mod:`dq.kernels._triton_quant` (no FMA
contraction, ``div_rn``/``sqrt_rn``, ``nearest_int`` as round-half-even).

The 16-value table ``kvalues_iq4nl`` is written out in :func:`_nearest_value` as constants: a chain of
compares gives the bracketing pair ``values[mu-1] <= x < values[mu]`` and the C tie rule picks one.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dq.kernels._triton_math import div, fp16, rne
from dq.kernels.ref_quant import error_sums
from dq.quant.formats import QuantFormat

__all__ = ["fake_quant_iq4_triton", "quant_error_iq4_triton"]

_EPS = tl.constexpr(1e-15)  # GROUP_MAX_EPS (a constexpr: compiled kernels read no other globals)


@triton.jit
def _bracket(x, lo, hi, a: tl.constexpr, b: tl.constexpr):
    up = x >= a
    return tl.where(up, a, lo), tl.where(up, b, hi)


@triton.jit
def _nearest_value(x):
    """kvalues_iq4nl[best_index_int8(16, kvalues_iq4nl, x)]."""
    lo = tl.full(x.shape, -127.0, tl.float32)
    hi = tl.full(x.shape, -104.0, tl.float32)
    lo, hi = _bracket(x, lo, hi, -104.0, -83.0)
    lo, hi = _bracket(x, lo, hi, -83.0, -65.0)
    lo, hi = _bracket(x, lo, hi, -65.0, -49.0)
    lo, hi = _bracket(x, lo, hi, -49.0, -35.0)
    lo, hi = _bracket(x, lo, hi, -35.0, -22.0)
    lo, hi = _bracket(x, lo, hi, -22.0, -10.0)
    lo, hi = _bracket(x, lo, hi, -10.0, 1.0)
    lo, hi = _bracket(x, lo, hi, 1.0, 13.0)
    lo, hi = _bracket(x, lo, hi, 13.0, 25.0)
    lo, hi = _bracket(x, lo, hi, 25.0, 38.0)
    lo, hi = _bracket(x, lo, hi, 38.0, 53.0)
    lo, hi = _bracket(x, lo, hi, 53.0, 69.0)
    lo, hi = _bracket(x, lo, hi, 69.0, 89.0)
    lo, hi = _bracket(x, lo, hi, 89.0, 113.0)
    v = tl.where(x - lo < hi - x, lo, hi)
    v = tl.where(x <= -127.0, -127.0, v)
    return tl.where(x >= 113.0, 113.0, v)


@triton.jit
def _weight(x, qw_ptr, col, sigma2, HAS_IM: tl.constexpr):
    if HAS_IM:
        return tl.load(qw_ptr + col) * tl.math.sqrt_rn(sigma2 + x * x)
    return x * x


@triton.jit
def _iq4_kernel(x_ptr, im_ptr, deq_ptr, scale_ptr, n_sup, n_per_row,
                NSUB: tl.constexpr, HAS_IM: tl.constexpr, LANES: tl.constexpr):
    SB: tl.constexpr = NSUB * 32
    lane = tl.program_id(0) * LANES + tl.arange(0, LANES)
    ok = lane < n_sup
    sup = tl.where(ok, lane, 0).to(tl.int64)
    base = x_ptr + sup * SB
    colb = (sup * SB) % n_per_row  # the super-block's first column (imatrix index)
    sigma2 = tl.zeros([LANES], tl.float32)
    if HAS_IM:
        for i in range(SB):
            xi = tl.load(base + i)
            sigma2 = sigma2 + xi * xi
        sigma2 = sigma2 * (2.0 / SB)
    max_scale = tl.zeros([LANES], tl.float32)
    amax_scale = tl.zeros([LANES], tl.float32)
    for ib in range(NSUB):
        xb = base + ib * 32
        amax = tl.zeros([LANES], tl.float32)
        mx = tl.zeros([LANES], tl.float32)
        for j in range(32):
            xj = tl.load(xb + j)
            ax = tl.abs(xj)
            bigger = ax > amax
            amax = tl.where(bigger, ax, amax)
            mx = tl.where(bigger, xj, mx)
        flat = amax < _EPS
        smx = tl.where(flat, 1.0, mx)
        d0 = div(-smx, tl.full([LANES], -127.0, tl.float32))
        d = tl.zeros([LANES], tl.float32)
        best = tl.zeros([LANES], tl.float32)
        for t in range(16):  # t = 0: 1/d0; t = 1..15: itry = t - 8 = -7..7
            if t == 0:
                inv = div(tl.full([LANES], 1.0, tl.float32), d0)
            else:
                inv = div(tl.full([LANES], 1.0, tl.float32) * (t - 8 - 127), smx)
            sumqx = tl.zeros([LANES], tl.float32)
            sumq2 = tl.zeros([LANES], tl.float32)
            for j in range(32):
                xj = tl.load(xb + j)
                q = _nearest_value(inv * xj)
                wq = _weight(xj, im_ptr, colb + ib * 32 + j, sigma2, HAS_IM) * q
                sumqx = sumqx + wq * xj
                sumq2 = sumq2 + wq * q
            pos = sumq2 > 0
            refit = tl.where(pos, div(sumqx, tl.where(pos, sumq2, 1.0)), 0.0)
            if t == 0:
                d = refit
                best = d * sumqx
            else:
                better = pos & (sumqx * sumqx > best * sumq2)
                d = tl.where(better, refit, d)
                best = tl.where(better, d * sumqx, best)
        d = tl.where(flat, 0.0, d)
        tl.store(scale_ptr + sup * NSUB + ib, d, mask=ok)
        ad = tl.abs(d)
        bigger = ad > amax_scale
        amax_scale = tl.where(bigger, ad, amax_scale)
        max_scale = tl.where(bigger, d, max_scale)
    if NSUB > 1:
        ds = div(-max_scale, tl.full([LANES], 32.0, tl.float32))
        ids = tl.where(ds != 0, div(tl.full([LANES], 1.0, tl.float32), tl.where(ds != 0, ds, 1.0)), 0.0)
        for ib in range(NSUB):
            s = tl.load(scale_ptr + sup * NSUB + ib)
            lv = tl.minimum(tl.maximum(rne(ids * s), -32.0), 31.0)
            dl = ds * lv
            idl = tl.where(dl != 0, div(tl.full([LANES], 1.0, tl.float32), tl.where(dl != 0, dl, 1.0)), 0.0)
            stored = fp16(ds) * lv
            for j in range(32):
                xj = tl.load(base + ib * 32 + j)
                tl.store(deq_ptr + sup * SB + ib * 32 + j, stored * _nearest_value(idl * xj), mask=ok)
    else:
        s = tl.load(scale_ptr + sup)
        inv = tl.where(s != 0, div(tl.full([LANES], 1.0, tl.float32), tl.where(s != 0, s, 1.0)), 0.0)
        stored = fp16(s)
        for j in range(32):
            xj = tl.load(base + j)
            tl.store(deq_ptr + sup * 32 + j, stored * _nearest_value(inv * xj), mask=ok)


def fake_quant_iq4_triton(weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """:func:`dq.kernels.ref_iq4.fake_quant_iq4` as one Triton launch (CUDA, or ``TRITON_INTERPRET=1``)."""
    nsub = 8 if fmt is QuantFormat.IQ4_XS else 1
    x = weight.to(torch.float32).contiguous()
    rows, n = x.shape
    if n % (32 * nsub):
        raise ValueError(f"row length {n} is not a multiple of {fmt}'s block size {32 * nsub}")
    n_sup = x.numel() // (32 * nsub)
    deq = torch.empty_like(x)
    scales = torch.empty(n_sup * nsub, dtype=torch.float32, device=x.device)
    im = x if imatrix is None else imatrix.to(device=x.device, dtype=torch.float32).contiguous()
    lanes = 128
    _iq4_kernel[(triton.cdiv(n_sup, lanes),)](x, im, deq, scales, n_sup, n, NSUB=nsub, HAS_IM=imatrix is not None,
                                              LANES=lanes, enable_fp_fusion=False)
    return deq


def quant_error_iq4_triton(weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None, *,
                           imatrix_quantizer: bool = False, return_dequantized: bool = False) -> dict[str, torch.Tensor]:
    """Per-row error sums of IQ4_NL/IQ4_XS (as :func:`dq.kernels.ref_quant.quant_error`), quantized on the GPU."""
    deq = fake_quant_iq4_triton(weight, fmt, imatrix if imatrix_quantizer else None)
    out = error_sums(weight, deq, imatrix)
    if return_dequantized:
        out["deq"] = deq
    return out
