"""Triton kernels: GGUF block dequantization and activation statistics (GPU, or TRITON_INTERPRET=1).

Dequantization follows ``dequantize_row_*`` in ggml-quants.c with products in ggml's order, so the
output is bit-exact. Most types run elementwise (each lane decodes one weight; neighbouring lanes re-read
the block header from L1). Q2_K to Q6_K, TQ1_0 and IQ4_XS, whose headers cost several byte loads per weight,
run as ``[blocks, sub-blocks, weights]`` tiles that decode each sub-block's scale once. The IQ lattice
types (IQ2_*, IQ3_*, IQ1_*) run as ``[blocks, grid points, weights]`` tiles in
:mod:`dq.kernels._triton_iqdequant`, to which :func:`dequantize_triton` dispatches.

This module imports Triton at import time; :mod:`dq.kernels.api` imports it only when asked to.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dq.kernels._triton_iqdequant import IQ_DEQUANT_FORMATS, dequantize_iq_triton
from dq.kernels.ref_dequant import KVALUES_IQ4NL, KVALUES_MXFP4
from dq.quant.formats import FORMATS, QuantFormat

__all__ = ["dequantize_triton", "act_stats_triton", "TRITON_DEQUANT_FORMATS"]

_KIND = {
    QuantFormat.Q8_0: 0, QuantFormat.Q4_0: 1, QuantFormat.Q4_1: 2, QuantFormat.Q5_0: 3, QuantFormat.Q5_1: 4,
    QuantFormat.Q2_K: 5, QuantFormat.Q3_K: 6, QuantFormat.Q4_K: 7, QuantFormat.Q5_K: 8, QuantFormat.Q6_K: 9,
    QuantFormat.TQ2_0: 10, QuantFormat.IQ4_NL: 11, QuantFormat.IQ4_XS: 12, QuantFormat.MXFP4: 13,
    QuantFormat.TQ1_0: 14,
}
TRITON_DEQUANT_FORMATS = tuple(_KIND) + IQ_DEQUANT_FORMATS


@triton.jit
def _u8(p, off, mask):
    return tl.load(p + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(p, off, mask):
    bits = _u8(p, off, mask) | (_u8(p, off + 1, mask) << 8)
    return bits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _scale_min_k4(p, base, js, mask):
    # get_scale_min_k4 in ggml-quants.c; p + base points at the 12 scale bytes
    lo = js < 4
    a = _u8(p, base + js, mask)
    b = _u8(p, base + js + 4, mask)
    c = _u8(p, base + tl.where(lo, js, js - 4), mask)
    sc = tl.where(lo, a & 63, (b & 0xF) | ((c >> 6) << 4))
    m = tl.where(lo, b & 63, (b >> 4) | ((a >> 6) << 4))
    return sc.to(tl.float32), m.to(tl.float32)


@triton.jit
def _dequant_kernel(src, dst, tbl, n_elem, KIND: tl.constexpr, QK: tl.constexpr, TS: tl.constexpr,
                    BLOCK: tl.constexpr):
    # elementwise types; the K-quants and TQ1_0 run in _dequant_sub_kernel
    e = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = e < n_elem
    b = (e // QK) * TS
    j = (e % QK).to(tl.int32)
    if KIND == 0:  # Q8_0
        q = _u8(src, b + 2 + j, mask).to(tl.int8).to(tl.float32)
        y = q * _f16(src, b, mask)
    elif KIND == 1 or KIND == 11:  # Q4_0 / IQ4_NL: nibbles, low half first
        q = (_u8(src, b + 2 + (j % 16), mask) >> ((j // 16) * 4)) & 0xF
        if KIND == 1:
            y = (q - 8).to(tl.float32) * _f16(src, b, mask)
        else:
            y = _f16(src, b, mask) * tl.load(tbl + q, mask=mask, other=0.0)
    elif KIND == 2:  # Q4_1: x0*d + m
        q = (_u8(src, b + 4 + (j % 16), mask) >> ((j // 16) * 4)) & 0xF
        y = q.to(tl.float32) * _f16(src, b, mask) + _f16(src, b + 2, mask)
    elif KIND == 3 or KIND == 4:  # Q5_0 / Q5_1: the 5th bits sit in a little-endian uint32
        hoff: tl.constexpr = 2 if KIND == 3 else 4
        hb = (_u8(src, b + hoff + j // 8, mask) >> (j % 8)) & 1
        q = ((_u8(src, b + hoff + 4 + (j % 16), mask) >> ((j // 16) * 4)) & 0xF) | (hb << 4)
        if KIND == 3:
            y = (q - 16).to(tl.float32) * _f16(src, b, mask)
        else:
            y = q.to(tl.float32) * _f16(src, b, mask) + _f16(src, b + 2, mask)
    elif KIND == 10:  # TQ2_0: qs[64] d
        r = j % 128
        q = (_u8(src, b + (j // 128) * 32 + r % 32, mask) >> ((r // 32) * 2)) & 3
        y = (q - 1).to(tl.float32) * _f16(src, b + 64, mask)
    else:  # MXFP4 (KIND 13): e8m0 exponent, then nibbles into kvalues_mxfp4
        ex = _u8(src, b, mask)
        bits = tl.where(ex < 2, 0x00200000 << ex, (ex - 1) << 23)
        d = bits.to(tl.float32, bitcast=True)
        q = (_u8(src, b + 1 + (j % 16), mask) >> ((j // 16) * 4)) & 0xF
        y = d * tl.load(tbl + q, mask=mask, other=0.0)
    tl.store(dst + e, y.to(dst.dtype.element_ty), mask=mask)


# Super-block types whose per-element header decoding made the elementwise kernel L1-bound: here a
# program takes NB whole blocks as an [NB, NSUB, SUBLEN] tile, decodes d, dmin and the packed sub-block
# scales once per [NB, NSUB], and broadcasts them over the sub-block's weights.
_SUB = {QuantFormat.Q2_K: (16, 16), QuantFormat.Q3_K: (16, 16), QuantFormat.Q4_K: (8, 32), QuantFormat.Q5_K: (8, 32),
        QuantFormat.Q6_K: (16, 16), QuantFormat.TQ1_0: (1, 256), QuantFormat.IQ4_XS: (8, 32)}
# (blocks per program, warps) from bench/kernels_sweep.py: Q2_K, Q3_K, Q6_K and IQ4_XS on an H200, the rest on an H100
_SUB_LAUNCH = {QuantFormat.Q2_K: (8, 1), QuantFormat.Q6_K: (4, 1), QuantFormat.Q3_K: (4, 1), QuantFormat.IQ4_XS: (4, 1)}


@triton.jit
def _dequant_sub_kernel(src, dst, tbl, n_blocks, KIND: tl.constexpr, TS: tl.constexpr, NB: tl.constexpr,
                        NSUB: tl.constexpr, SUBLEN: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    bmask = blk < n_blocks
    b = blk * TS
    js = tl.arange(0, NSUB)
    t = tl.arange(0, SUBLEN)
    b2 = b[:, None]
    m2 = bmask[:, None] & (js[None, :] >= 0)
    b3 = b[:, None, None]
    j3 = js[None, :, None] * SUBLEN + t[None, None, :]
    m3 = bmask[:, None, None] & (j3 >= 0)
    if KIND == 7 or KIND == 8:  # Q4_K / Q5_K: d dmin scales[12] (qh[32]) qs[128]
        sc, mn = _scale_min_k4(src, b2 + 4, js[None, :], m2)
        d1 = _f16(src, b, bmask)[:, None] * sc
        m1 = _f16(src, b + 2, bmask)[:, None] * mn
        qoff: tl.constexpr = 16 if KIND == 7 else 48
        c64 = js // 2
        q = (_u8(src, b3 + qoff + (c64 * 32)[None, :, None] + t[None, None, :], m3)
             >> ((js % 2) * 4)[None, :, None]) & 0xF
        if KIND == 8:
            q = q | (((_u8(src, b3 + 16 + t[None, None, :], m3) >> js[None, :, None]) & 1) << 4)
        y = d1[:, :, None] * q.to(tl.float32) - m1[:, :, None]
    elif KIND == 5:  # Q2_K: scales[16] qs[64] d dmin; sub-block js of 16 weights: scale byte js
        sc = _u8(src, b2 + js[None, :], m2)
        dl = _f16(src, b + 80, bmask)[:, None] * (sc & 0xF).to(tl.float32)
        ml = _f16(src, b + 82, bmask)[:, None] * (sc >> 4).to(tl.float32)
        r = j3 % 128
        q = (_u8(src, b3 + 16 + (j3 // 128) * 32 + r % 32, m3) >> ((r // 32) * 2)) & 3
        y = dl[:, :, None] * q.to(tl.float32) - ml[:, :, None]
    elif KIND == 9:  # Q6_K: ql[128] qh[64] scales[16] d; weight j's int8 scale is scales[j // 16]
        sc = _u8(src, b2 + 192 + js[None, :], m2).to(tl.int8).to(tl.float32)
        dl = _f16(src, b + 208, bmask)[:, None] * sc
        n128 = j3 // 128
        r = j3 % 128
        l = r % 32
        g = r // 32
        lo = (_u8(src, b3 + n128 * 64 + l + 32 * (g % 2), m3) >> ((g // 2) * 4)) & 0xF
        hi = (_u8(src, b3 + 128 + n128 * 32 + l, m3) >> (g * 2)) & 3
        y = dl[:, :, None] * ((lo | (hi << 4)) - 32).to(tl.float32)
    elif KIND == 6:  # Q3_K: hmask[32] qs[64] scales[12] d
        low = (_u8(src, b2 + 96 + js[None, :] % 8, m2) >> ((js[None, :] // 8) * 4)) & 0xF
        high = (_u8(src, b2 + 104 + js[None, :] % 4, m2) >> ((js[None, :] // 4) * 2)) & 3
        dl = _f16(src, b + 108, bmask)[:, None] * ((low | (high << 4)) - 32).to(tl.float32)
        r = j3 % 128
        n128 = j3 // 128
        l = r % 32
        q = (_u8(src, b3 + 32 + n128 * 32 + l, m3) >> ((r // 32) * 2)) & 3
        hm = (_u8(src, b3 + l, m3) >> (n128 * 4 + r // 32)) & 1
        y = dl[:, :, None] * (q - tl.where(hm != 0, 0, 4)).to(tl.float32)
    elif KIND == 12:  # IQ4_XS: d scales_h(u16) scales_l[4] qs[128]; sub-block js of 32 weights
        ls = (_u8(src, b2 + 4 + js[None, :] // 2, m2) >> ((js[None, :] % 2) * 4)) & 0xF
        sh = _u8(src, b + 2, bmask) | (_u8(src, b + 3, bmask) << 8)
        hs = (sh[:, None] >> (js[None, :] * 2)) & 3
        dl = _f16(src, b, bmask)[:, None] * ((ls | (hs << 4)) - 32).to(tl.float32)
        q = (_u8(src, b3 + 8 + (js * 16)[None, :, None] + (t % 16)[None, None, :], m3) >> ((t // 16) * 4)[None, None, :]) & 0xF
        y = dl[:, :, None] * tl.load(tbl + q, mask=m3, other=0.0)
    else:  # TQ1_0: qs[48] qh[4] d; base-3 digits recovered as (uint8(q * 3^n) * 3) >> 8
        j = j3
        in_a = j < 160
        in_b = (j >= 160) & (j < 240)
        ra = j
        rb = j - 160
        rc = j - 240
        off = tl.where(in_a, ra % 32, tl.where(in_b, 32 + rb % 16, 48 + rc % 4))
        n = tl.where(in_a, ra // 32, tl.where(in_b, rb // 16, rc // 4))
        p3 = tl.where(n == 0, 1, tl.where(n == 1, 3, tl.where(n == 2, 9, tl.where(n == 3, 27, 81))))
        q = (_u8(src, b3 + off, m3) * p3) & 0xFF
        y = (((q * 3) >> 8) - 1).to(tl.float32) * _f16(src, b + 52, bmask)[:, None, None]
    tl.store(dst + blk[:, None, None] * (NSUB * SUBLEN) + j3, y.to(dst.dtype.element_ty), mask=m3)


@functools.cache
def _table(fmt: QuantFormat, device: str) -> torch.Tensor:
    vals = KVALUES_MXFP4 if fmt is QuantFormat.MXFP4 else KVALUES_IQ4NL
    return torch.tensor(vals, dtype=torch.float32, device=device)


def dequantize_triton(data: torch.Tensor, fmt: QuantFormat, n_elem: int, dtype: torch.dtype, *,
                      tile: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Dequantize ``n_elem`` weights of raw GGUF bytes ``data`` (uint8) as ``fmt`` into a flat tensor.

    Args:
        data: contiguous uint8 tensor of the payload.
        fmt: one of :data:`TRITON_DEQUANT_FORMATS`.
        n_elem: number of weights in the payload.
        dtype: float32 or bfloat16 output.
        tile: blocks per program (the K-quants, TQ1_0, IQ4_XS and the IQ lattice types) or weights per
            program (the rest); tuning only.
        num_warps: warps per program; tuning only.

    Returns:
        flat ``[n_elem]`` tensor of ``dtype`` on ``data.device``.
    """
    if fmt in IQ_DEQUANT_FORMATS:
        return dequantize_iq_triton(data, fmt, n_elem, dtype, tile=tile, num_warps=num_warps)
    spec = FORMATS[fmt]
    out = torch.empty(n_elem, device=data.device, dtype=dtype)
    if fmt in _SUB:
        nsub, sublen = _SUB[fmt]
        nb0, warps0 = _SUB_LAUNCH.get(fmt, (8, 2))
        nb = tile or nb0
        n_blocks = n_elem // spec.block_size
        _dequant_sub_kernel[(triton.cdiv(n_blocks, nb),)](
            data, out, _table(fmt, str(data.device)), n_blocks, KIND=_KIND[fmt], TS=spec.type_size, NB=nb,
            NSUB=nsub, SUBLEN=sublen, num_warps=num_warps or warps0, enable_fp_fusion=False,
        )
        return out
    block = tile or 1024
    _dequant_kernel[(triton.cdiv(n_elem, block),)](
        data, out, _table(fmt, str(data.device)), n_elem,
        KIND=_KIND[fmt], QK=spec.block_size, TS=spec.type_size, BLOCK=block, num_warps=num_warps or 4,
        enable_fp_fusion=False,
    )
    return out


@triton.jit
def _act_stats_kernel(x_ptr, sq_ptr, mx_ptr, n_tok, n_ch, tok_per_split,
                      BLOCK_T: tl.constexpr, BLOCK_C: tl.constexpr):
    pid_c = tl.program_id(0)
    pid_s = tl.program_id(1)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)
    cm = c < n_ch
    t0 = pid_s * tok_per_split
    acc = tl.zeros([BLOCK_C], tl.float32)
    amax = tl.zeros([BLOCK_C], tl.float32)
    for t in range(t0, t0 + tok_per_split, BLOCK_T):
        tt = t + tl.arange(0, BLOCK_T)
        m = (tt < n_tok)[:, None] & (tt < t0 + tok_per_split)[:, None] & cm[None, :]
        x = tl.load(x_ptr + tt.to(tl.int64)[:, None] * n_ch + c[None, :], mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=0)
        amax = tl.maximum(amax, tl.max(tl.abs(x), axis=0))
    tl.store(sq_ptr + pid_s * n_ch + c, acc, mask=cm)
    tl.store(mx_ptr + pid_s * n_ch + c, amax, mask=cm)


def act_stats_triton(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel ``sum x^2`` and ``max |x|`` of a ``[tokens, channels]`` activation, in one read.

    Args:
        x: contiguous ``[tokens, channels]`` float tensor (any float dtype; accumulated in float32).

    Returns:
        ``(sum_sq, max_abs)``, float32 ``[channels]`` each.
    """
    n_tok, n_ch = x.shape
    block_t, block_c = 32, 128
    n_split = max(1, min(triton.cdiv(n_tok, block_t), 512 // max(1, triton.cdiv(n_ch, block_c))))
    per = triton.cdiv(triton.cdiv(n_tok, n_split), block_t) * block_t
    n_split = triton.cdiv(n_tok, per)
    sq = torch.empty(n_split, n_ch, device=x.device, dtype=torch.float32)
    mx = torch.empty(n_split, n_ch, device=x.device, dtype=torch.float32)
    _act_stats_kernel[(triton.cdiv(n_ch, block_c), n_split)](
        x, sq, mx, n_tok, n_ch, per, BLOCK_T=block_t, BLOCK_C=block_c, num_warps=4,
    )
    return sq.sum(dim=0), mx.amax(dim=0)
