"""Triton kernels: dequantization of the IQ lattice types (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S, IQ1_S, IQ1_M).

Each is a port of ``dequantize_row_iq*`` in ggml-quants.c, with the float products in ggml's order, so
the output is bit-exact with libggml's ``to_float`` (and with :mod:`dq.kernels.ref_dequant`, the eager
reference).

A program takes ``NB`` whole super-blocks (256 weights) as an ``[NB, NG, GL]`` tile of grid points: 32
points of 8 weights (IQ2_*, IQ1_*) or 64 points of 4 weights (IQ3_*). The point's grid index, sign byte
(or IQ1's delta) and sub-block scale are decoded once per ``[NB, NG]``; the ``GL`` weights of a point are
then one contiguous gather from the codebook (a 1-16 KiB byte table that stays in L1/L2) and one
contiguous store, which Triton vectorises. The fp16 and uint16 fields are read through an int16 view of
the payload (every field of these blocks sits at an even offset), halving the loads.

This module imports Triton at import time; :mod:`dq.kernels._triton_dequant` dispatches to it.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from dq.kernels.ref_dequant import iq_grid
from dq.quant.formats import FORMATS, QuantFormat

__all__ = ["dequantize_iq_triton", "IQ_DEQUANT_FORMATS"]

# format -> (kernel KIND, grid points per super-block NG, weights per grid point GL)
_IQ = {
    QuantFormat.IQ2_XXS: (0, 32, 8), QuantFormat.IQ2_XS: (1, 32, 8), QuantFormat.IQ2_S: (2, 32, 8),
    QuantFormat.IQ3_XXS: (3, 64, 4), QuantFormat.IQ3_S: (4, 64, 4),
    QuantFormat.IQ1_S: (5, 32, 8), QuantFormat.IQ1_M: (6, 32, 8),
}
IQ_DEQUANT_FORMATS = tuple(_IQ)
# (super-blocks per program, warps), swept on an H100 at 4096x14336 -> bf16 (random payloads): 4 blocks reach
# 2.67-2.78 TB/s, 109-113% of a device copy, as the K-quant tiles do; 1 and 2 blocks are launch-bound
# (0.14 and 0.07 ms against 0.048), 8 and more lose 5-60%. The IQ3 tiles (4-weight points) prefer one warp.
_LAUNCH_DEFAULT = (4, 2)
_LAUNCH = {QuantFormat.IQ3_XXS: (4, 1), QuantFormat.IQ3_S: (4, 1)}


@triton.jit
def _u8(p, off, mask):
    return tl.load(p + off, mask=mask, other=0).to(tl.int32)


@triton.jit
def _u16(p16, off, mask):
    # off counts int16 words; the field is unsigned
    return tl.load(p16 + off, mask=mask, other=0).to(tl.int32) & 0xFFFF


@triton.jit
def _f16(p16, off, mask):
    return tl.load(p16 + off, mask=mask, other=0).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _ksigns(s7):
    # ksigns_iq2xs[s7] in ggml-common.h: the 7 stored sign bits, and an 8th that makes their count even
    p = s7 ^ (s7 >> 4)
    p = p ^ (p >> 2)
    p = p ^ (p >> 1)
    return s7 | ((p & 1) << 7)


@triton.jit
def _iq_dequant_kernel(src, src16, grid, dst, n_blocks, KIND: tl.constexpr, TS: tl.constexpr, NB: tl.constexpr,
                       NG: tl.constexpr, GL: tl.constexpr):
    blk = tl.program_id(0).to(tl.int64) * NB + tl.arange(0, NB)
    bmask = blk < n_blocks
    b = blk * TS  # byte offset of the block
    h = blk * (TS // 2)  # its int16 word offset
    g = tl.arange(0, NG)[None, :]  # grid point within the super-block
    b2 = b[:, None]
    h2 = h[:, None]
    m2 = bmask[:, None] & (g >= 0)
    ib = g // (NG // 8)  # ib32: the 32-weight sub-block
    if KIND == 0:  # IQ2_XXS: d qs[64] (per ib32: 4 index bytes, then a uint32 of 4x7 sign bits and the scale)
        l = g % 4
        gidx = _u8(src, b2 + 2 + 8 * ib + l, m2)
        hi = _u16(src16, h2 + 4 + 4 * ib, m2)
        aux = _u16(src16, h2 + 3 + 4 * ib, m2) | (hi << 16)
        sgn = _ksigns((aux >> (7 * l)) & 127)
        # dequantize_row_iq2_xxs: db = d * (0.5f + (aux32[1] >> 28)) * 0.25f
        dl = _f16(src16, h, bmask)[:, None] * (0.5 + (hi >> 12).to(tl.float32)) * 0.25
    elif KIND == 1:  # IQ2_XS: d qs[32] (uint16: 9-bit index, 7 sign bits) scales[8]
        q = _u16(src16, h2 + 1 + g, m2)
        gidx = q & 511
        sgn = _ksigns(q >> 9)
        s = (_u8(src, b2 + 66 + ib, m2) >> (4 * ((g % 4) // 2))) & 0xF
        # dequantize_row_iq2_xs: db[l/2] = d * (0.5f + scale nibble) * 0.25f
        dl = _f16(src16, h, bmask)[:, None] * (0.5 + s.to(tl.float32)) * 0.25
    elif KIND == 2:  # IQ2_S: d qs[32] signs[32] qh[8] scales[8]
        l = g % 4
        gidx = _u8(src, b2 + 2 + g, m2) | (((_u8(src, b2 + 66 + ib, m2) >> (2 * l)) & 3) << 8)
        sgn = _u8(src, b2 + 34 + g, m2)
        s = (_u8(src, b2 + 74 + ib, m2) >> (4 * (l // 2))) & 0xF
        # dequantize_row_iq2_s: db[l/2] = d * (0.5f + scale nibble) * 0.25f
        dl = _f16(src16, h, bmask)[:, None] * (0.5 + s.to(tl.float32)) * 0.25
    elif KIND == 3:  # IQ3_XXS: d qs[64] scales_and_signs[8] (uint32: 4x7 sign bits, the scale)
        k = g % 8  # grid point in the ib32: 2*l + (grid1 or grid2)
        gidx = _u8(src, b2 + 2 + g, m2)
        hi = _u16(src16, h2 + 34 + 2 * ib, m2)
        aux = _u16(src16, h2 + 33 + 2 * ib, m2) | (hi << 16)
        sgn = _ksigns((aux >> (7 * (k // 2))) & 127) >> (4 * (k % 2))
        # dequantize_row_iq3_xxs: db = d * (0.5f + (aux32 >> 28)) * 0.5f
        dl = _f16(src16, h, bmask)[:, None] * (0.5 + (hi >> 12).to(tl.float32)) * 0.5
    elif KIND == 4:  # IQ3_S: d qs[64] qh[8] signs[32] scales[4]
        k = g % 8
        gidx = _u8(src, b2 + 2 + g, m2) | (((_u8(src, b2 + 66 + ib, m2) >> k) & 1) << 8)
        sgn = _u8(src, b2 + 74 + 4 * ib + k // 2, m2) >> (4 * (k % 2))
        s = (_u8(src, b2 + 106 + ib // 2, m2) >> (4 * (ib % 2))) & 0xF
        # dequantize_row_iq3_s: db1 = d * (1 + 2*(scales[ib32/2] & 0xf)), an int converted to float
        dl = _f16(src16, h, bmask)[:, None] * (1 + 2 * s).to(tl.float32)
    elif KIND == 5:  # IQ1_S: d qs[32] qh[8] (uint16: 4x3 index bits, 3-bit scale, delta sign)
        qh = _u16(src16, h2 + 17 + ib, m2)
        gidx = _u8(src, b2 + 2 + g, m2) | (((qh >> (3 * (g % 4))) & 7) << 8)
        # dequantize_row_iq1_s: dl = d * (2*((qh[ib] >> 12) & 7) + 1); delta = +-IQ1S_DELTA
        dl = _f16(src16, h, bmask)[:, None] * (2 * ((qh >> 12) & 7) + 1).to(tl.float32)
        delta = tl.where((qh & 0x8000) != 0, -0.125, 0.125)
    else:  # IQ1_M: qs[32] qh[16] scales[8] (4 uint16: 3-bit sub-block scales, the fp16 d in the top nibbles)
        sc0 = _u16(src16, h + 24, bmask)
        sc1 = _u16(src16, h + 25, bmask)
        sc2 = _u16(src16, h + 26, bmask)
        sc3 = _u16(src16, h + 27, bmask)
        # dequantize_row_iq1_m: scale.u16 = (sc[0] >> 12) | ((sc[1] >> 8) & 0x00f0) | ((sc[2] >> 4) & 0x0f00) | ...
        dbits = (sc0 >> 12) | ((sc1 >> 8) & 0x00F0) | ((sc2 >> 4) & 0x0F00) | (sc3 & 0xF000)
        d = dbits.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
        l = g % 4
        nib = (_u8(src, b2 + 32 + 2 * ib + l // 2, m2) >> (4 * (l % 2))) & 0xF
        gidx = _u8(src, b2 + g, m2) | ((nib & 7) << 8)
        sc = _u16(src16, h2 + 24 + ib // 2, m2)
        # dl1/dl2 = d * (2*((sc[ib/2] >> (6*(ib%2) + 0 or 3)) & 0x7) + 1)
        dl = d[:, None] * (2 * ((sc >> (6 * (ib % 2) + 3 * (l // 2))) & 7) + 1).to(tl.float32)
        delta = tl.where((nib & 8) != 0, -0.125, 0.125)
    j = tl.arange(0, GL)[None, None, :]
    m3 = m2[:, :, None] & (j >= 0)
    q = tl.load(grid + gidx[:, :, None] * GL + j, mask=m3, other=0).to(tl.float32)
    if KIND >= 5:  # y[j] = dl * (grid[j] + delta)
        y = dl[:, :, None] * (q + delta[:, :, None])
    else:  # y[j] = db * grid[j] * (signs & kmask_iq2xs[j] ? -1.f : 1.f)
        y = dl[:, :, None] * q * tl.where(((sgn[:, :, None] >> j) & 1) != 0, -1.0, 1.0)
    tl.store(dst + blk[:, None, None] * (NG * GL) + g[:, :, None] * GL + j, y.to(dst.dtype.element_ty), mask=m3)


@functools.cache
def _grid_table(fmt: QuantFormat, device: str) -> torch.Tensor:
    """The codebook as a flat byte table: uint8 for IQ2/IQ3 (positive levels), int8 for IQ1 (-1, 0, 1)."""
    dtype = torch.int8 if fmt in (QuantFormat.IQ1_S, QuantFormat.IQ1_M) else torch.uint8
    return iq_grid(fmt).to(dtype).reshape(-1).contiguous().to(device)


def dequantize_iq_triton(data: torch.Tensor, fmt: QuantFormat, n_elem: int, dtype: torch.dtype, *,
                         tile: int | None = None, num_warps: int | None = None) -> torch.Tensor:
    """Dequantize ``n_elem`` weights of raw GGUF bytes ``data`` (uint8) of an IQ lattice type.

    Args:
        data: contiguous flat uint8 tensor of the payload.
        fmt: one of :data:`IQ_DEQUANT_FORMATS`.
        n_elem: number of weights in the payload (a multiple of 256).
        dtype: float32 or bfloat16 output.
        tile: super-blocks per program (a power of two); tuning only.
        num_warps: warps per program; tuning only.

    Returns:
        flat ``[n_elem]`` tensor of ``dtype`` on ``data.device``.

    Example:
        >>> import numpy as np
        >>> from dq.quant import libggml
        >>> w = np.random.default_rng(0).standard_normal((2, 256), dtype=np.float32)
        >>> raw = libggml.quantize(w, QuantFormat.IQ3_S)
        >>> data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).cuda()
        >>> dequantize_iq_triton(data, QuantFormat.IQ3_S, w.size, torch.float32).shape
        torch.Size([512])
    """
    kind, ng, gl = _IQ[fmt]
    spec = FORMATS[fmt]
    n_blocks = n_elem // spec.block_size
    assert data.dtype == torch.uint8 and data.numel() == n_blocks * spec.type_size, (data.dtype, data.numel())
    out = torch.empty(n_elem, device=data.device, dtype=dtype)
    if n_blocks == 0:
        return out
    if data.data_ptr() % 2:  # the int16 view needs an even address (type sizes are even)
        data = data.clone()
    nb0, warps0 = _LAUNCH.get(fmt, _LAUNCH_DEFAULT)
    nb = tile or nb0
    _iq_dequant_kernel[(triton.cdiv(n_blocks, nb),)](
        data, data.view(torch.int16), _grid_table(fmt, str(data.device)), out, n_blocks,
        KIND=kind, TS=spec.type_size, NB=nb, NG=ng, GL=gl, num_warps=num_warps or warps0, enable_fp_fusion=False,
    )
    return out
