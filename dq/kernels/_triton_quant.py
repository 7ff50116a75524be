"""Triton kernels: fused fake-quantization and per-row error reduction (GPU, or TRITON_INTERPRET=1).

One pass reads the weights once, quantizes and dequantizes each block in registers, and reduces
``sse``, ``wsse``, ``sumsq`` and ``wsumsq`` per row; the dequantized tensor is written only when asked
(``return_dequantized``, for activation errors). Both of ggml's quantizers are ported: the reference
``quantize_row_*_ref`` and, with ``imatrix_quantizer=True``, the imatrix-aware ``quantize_row_*_impl``
(``make_qkx3_quants``, ``make_qp_quants``, weighted ``make_qx_quants``).

Exactness with ggml's quantizers (and with :mod:`dq.kernels.ref_quant`) rests on:
- ``enable_fp_fusion=False`` at launch, so no FMA contracts ``a*b + c`` (libggml-base has no FMA);
- ``tl.math.div_rn`` / ``sqrt_rn``: Triton's ``/`` and ``tl.sqrt`` are approximate for float32;
- sums that feed a scale search run sequentially, one lane per sub-block (or per super-block / row for
  the ``_impl`` paths' sigma2 and scale-of-scales searches), as the C loops do;
- ``nearest_int``, truncation and ``roundf`` as single rounding instructions when compiled, and as exact
  cast emulations in the interpreter.

This module imports Triton at import time; :mod:`dq.kernels.api` imports it only when asked to.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import triton
import triton.language as tl

from dq.kernels._triton_math import div, fp16, rne, roundf, safe, trunc
from dq.kernels.ref_kquant import KQUANT_IMPL_PARAMS, KQUANT_PARAMS, qkx2_steps, qp_steps, qx_steps
from dq.quant.formats import FORMATS, QuantFormat

__all__ = ["quant_error_triton", "TRITON_QUANT_FORMATS"]

_LEGACY = {QuantFormat.Q8_0: 0, QuantFormat.Q4_0: 1, QuantFormat.Q5_0: 2, QuantFormat.Q4_1: 3,
           QuantFormat.Q5_1: 4, QuantFormat.TQ1_0: 5, QuantFormat.TQ2_0: 5}
_KQ = {QuantFormat.Q2_K: 0, QuantFormat.Q3_K: 1, QuantFormat.Q4_K: 2, QuantFormat.Q5_K: 3, QuantFormat.Q6_K: 4}
# legacy types whose imatrix search (quantize_row_*_impl) runs in _kquant_kernel, one lane per 32-block
_LEGACY_IMPL = {QuantFormat.Q4_0: 5, QuantFormat.Q5_0: 6, QuantFormat.Q4_1: 7, QuantFormat.Q5_1: 8}
TRITON_QUANT_FORMATS = tuple(_LEGACY) + tuple(_KQ)


@triton.jit
def _add_tile_sums(a0, a1, a2, a3, x, deq, im, valid):
    """The running per-tile-row sums of e^2, im*e^2, x^2 and im*x^2, plus this tile's (reduced over axis 1)."""
    e = tl.where(valid, x - deq, 0.0)
    xx = tl.where(valid, x, 0.0)
    e2 = e * e
    x2 = xx * xx
    return (a0 + tl.sum(e2, axis=1), a1 + tl.sum(e2 * im, axis=1), a2 + tl.sum(x2, axis=1),
            a3 + tl.sum(x2 * im, axis=1))


@triton.jit
def _store_row(out_ptr, pid_r, a0, a1, a2, a3):
    base = out_ptr + pid_r.to(tl.int64) * 4
    tl.store(base + 0, tl.sum(a0, axis=0))
    tl.store(base + 1, tl.sum(a1, axis=0))
    tl.store(base + 2, tl.sum(a2, axis=0))
    tl.store(base + 3, tl.sum(a3, axis=0))


@triton.jit
def _legacy_tile(x, j, KIND: tl.constexpr, QK: tl.constexpr, BLOCKS: tl.constexpr):
    """Dequantized [BLOCKS, QK] tile of ``x`` after the type's reference quantizer."""
    if KIND == 0:  # quantize_row_q8_0_ref
        d = div(tl.max(tl.abs(x), axis=1), tl.full([BLOCKS], 127.0, tl.float32))
        idv = tl.where(d != 0, div(tl.full([BLOCKS], 1.0, tl.float32), safe(d)), 0.0)
        deq = roundf(x * idv[:, None]) * fp16(d)[:, None]
    elif KIND == 1 or KIND == 2:  # quantize_row_q4_0_ref / q5_0_ref: signed max of the first largest |x|
        half: tl.constexpr = 8 if KIND == 1 else 16
        ax = tl.abs(x)
        amax = tl.max(ax, axis=1)
        first = tl.min(tl.where(ax == amax[:, None], j[None, :], QK), axis=1)
        mx = tl.sum(tl.where(j[None, :] == first[:, None], x, 0.0), axis=1)
        d = div(mx, tl.full([BLOCKS], -half, tl.float32))
        idv = tl.where(d != 0, div(tl.full([BLOCKS], 1.0, tl.float32), safe(d)), 0.0)
        q = tl.minimum(trunc(x * idv[:, None] + (half + 0.5)), 2 * half - 1)
        deq = (q - half) * fp16(d)[:, None]
    elif KIND == 3 or KIND == 4:  # quantize_row_q4_1_ref / q5_1_ref
        mn = tl.min(x, axis=1)
        mx = tl.max(x, axis=1)
        nl: tl.constexpr = 15 if KIND == 3 else 31
        d = div(mx - mn, tl.full([BLOCKS], nl, tl.float32))
        idv = tl.where(d != 0, div(tl.full([BLOCKS], 1.0, tl.float32), safe(d)), 0.0)
        q = trunc((x - mn[:, None]) * idv[:, None] + 0.5)
        if KIND == 3:
            q = tl.minimum(q, 15.0)
        else:
            q = (q.to(tl.int32) & 31).to(tl.float32)  # 5 bits of an uint8 are stored
        deq = q * fp16(d)[:, None] + fp16(mn)[:, None]
    else:  # quantize_row_tq1_0_ref / tq2_0_ref: lroundf(x*id) in {-1, 0, 1}
        d = tl.max(tl.abs(x), axis=1)
        idv = tl.where(d != 0, div(tl.full([BLOCKS], 1.0, tl.float32), safe(d)), 0.0)
        deq = roundf(x * idv[:, None]) * fp16(d)[:, None]
    return deq


@triton.jit
def _legacy_kernel(x_ptr, im_ptr, out_ptr, deq_ptr, n_per_row,
                   KIND: tl.constexpr, QK: tl.constexpr, BLOCKS: tl.constexpr, HAS_IM: tl.constexpr,
                   WRITE: tl.constexpr):
    """Q8_0 / Q4_0 / Q5_0 / Q4_1 / Q5_1 / TQ*_0: one row per program, in [BLOCKS, QK] tiles."""
    pid_r = tl.program_id(0)
    row_ptr = x_ptr + pid_r.to(tl.int64) * n_per_row
    j = tl.arange(0, QK)
    tile = tl.arange(0, BLOCKS)[:, None] * QK + j[None, :]
    a0 = tl.zeros([BLOCKS], tl.float32)
    a1 = tl.zeros([BLOCKS], tl.float32)
    a2 = tl.zeros([BLOCKS], tl.float32)
    a3 = tl.zeros([BLOCKS], tl.float32)
    for c0 in range(0, n_per_row, BLOCKS * QK):
        col = c0 + tile
        valid = col < n_per_row
        x = tl.load(row_ptr + col, mask=valid, other=0.0).to(tl.float32)
        if HAS_IM:
            im = tl.load(im_ptr + col, mask=valid, other=0.0)
        else:
            im = tl.full([BLOCKS, QK], 1.0, tl.float32)
        deq = _legacy_tile(x, j, KIND, QK, BLOCKS)
        if WRITE:  # Q(W) for the activation error; the error sums alone never need it
            tl.store(deq_ptr + pid_r.to(tl.int64) * n_per_row + col, deq, mask=valid)
        a0, a1, a2, a3 = _add_tile_sums(a0, a1, a2, a3, x, deq, im, valid)
    _store_row(out_ptr, pid_r, a0, a1, a2, a3)


@triton.jit
def _wt(xi, qb, i, st, valid, av, WABS: tl.constexpr, IMW: tl.constexpr):
    # the search weights: precomputed at qb (imatrix paths: qw*sqrt(sigma2 + x^2), see _store_weights),
    # |x| (Q2_K) or av_x + |x|
    if IMW:
        return tl.load(qb + i * st, mask=valid, other=0.0)
    elif WABS:
        return tl.abs(xi)
    else:
        return av + tl.abs(xi)


@triton.jit
def _qkx2(xb, st, valid, steps_ptr, av, qb, SB: tl.constexpr, NMAX: tl.constexpr, NSTEP: tl.constexpr,
          MAD: tl.constexpr, WABS: tl.constexpr, IMW: tl.constexpr):
    """make_qkx2_quants / make_qkx3_quants (the same search), one sub-block per lane.

    Weights per :func:`_wt`. Returns (scale, -min, sum of weights, and the iscale and min that produced the
    chosen levels L = clamp(nearest_int(iscale * (x - min)), 0, NMAX), which the legacy types keep)."""
    x0 = tl.load(xb, mask=valid, other=0.0).to(tl.float32)
    w0 = _wt(x0, qb, 0, st, valid, av, WABS, IMW)
    mn = x0
    mx = x0
    sum_w = w0
    sum_x = w0 * x0
    for i in range(1, SB):
        xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
        wi = _wt(xi, qb, i, st, valid, av, WABS, IMW)
        mn = tl.minimum(mn, xi)
        mx = tl.maximum(mx, xi)
        sum_w += wi
        sum_x += wi * xi
    mn = tl.where(mn > 0, 0.0, mn)
    flat = mx == mn
    iscale = div(tl.zeros_like(mx) + NMAX, tl.where(flat, 1.0, mx - mn))
    scale = div(tl.zeros_like(mx) + 1.0, iscale)
    best = tl.zeros_like(mx)
    l_is = iscale
    l_mn = mn
    for i in range(SB):
        xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
        wi = _wt(xi, qb, i, st, valid, av, WABS, IMW)
        lv = tl.minimum(tl.maximum(rne(iscale * (xi - mn)), 0.0), NMAX)
        diff = (scale * lv + mn) - xi
        diff = tl.abs(diff) if MAD else diff * diff
        best += wi * diff
    for s in range(NSTEP + 1):
        # `min` is overwritten when a step wins, so later steps search from it
        iscale = div(tl.zeros_like(mx) + tl.load(steps_ptr + s), tl.where(flat, 1.0, mx - mn))
        sum_l = tl.zeros_like(mx)
        sum_l2 = tl.zeros_like(mx)
        sum_xl = tl.zeros_like(mx)
        for i in range(SB):
            xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
            wi = _wt(xi, qb, i, st, valid, av, WABS, IMW)
            la = tl.minimum(tl.maximum(rne(iscale * (xi - mn)), 0.0), NMAX)
            wl = wi * la
            sum_l += wl
            sum_l2 += wl * la
            sum_xl += wl * xi
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        this_scale = div(sum_w * sum_xl - sum_x * sum_l, safe(D))
        this_min = div(sum_l2 * sum_x - sum_l * sum_xl, safe(D))
        pos = this_min > 0
        this_min = tl.where(pos, 0.0, this_min)
        this_scale = tl.where(pos, div(sum_xl, safe(sum_l2)), this_scale)
        cur = tl.zeros_like(mx)
        for i in range(SB):
            xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
            wi = _wt(xi, qb, i, st, valid, av, WABS, IMW)
            la = tl.minimum(tl.maximum(rne(iscale * (xi - mn)), 0.0), NMAX)
            diff = (this_scale * la + this_min) - xi
            diff = tl.abs(diff) if MAD else diff * diff
            cur += wi * diff
        better = ok & (cur < best)
        best = tl.where(better, cur, best)
        scale = tl.where(better, this_scale, scale)
        l_is = tl.where(better, iscale, l_is)
        l_mn = tl.where(better, mn, l_mn)
        mn = tl.where(better, this_min, mn)
    return tl.where(flat, 0.0, scale), -mn, sum_w, l_is, l_mn


@triton.jit
def _first_absmax_seq(xb, st, valid, SB: tl.constexpr):
    x0 = tl.load(xb, mask=valid, other=0.0).to(tl.float32)
    amax = tl.abs(x0)
    mx = x0
    for i in range(1, SB):
        xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
        upd = tl.abs(xi) > amax
        amax = tl.where(upd, tl.abs(xi), amax)
        mx = tl.where(upd, xi, mx)
    return mx, amax


@triton.jit
def _qxw(xi, qb, i, st, valid, av, WM: tl.constexpr):
    # make_qx_quants' weights: x*x (WM 0), or loaded from qb (WM 1: the importance qw for Q6_K _impl, the
    # precomputed qw*sqrt(sigma2 + x^2) for Q3_K _impl)
    if WM == 0:
        return xi * xi
    else:
        return tl.load(qb + i * st, mask=valid, other=0.0)


@triton.jit
def _sb_sumsq(row_ptr, sb_i, st, valid, SB: tl.constexpr, NSUB: tl.constexpr):
    """sum(x^2) of each lane's 256-weight super-block in C's order (every lane of the super-block redoes
    it; the rows are sub-block transposed, so weight l sits at sub-block l // SB, offset l % SB)."""
    sbase = (sb_i // NSUB) * NSUB
    acc = tl.zeros(sb_i.shape, tl.float32)
    for l in range(256):
        xl = tl.load(row_ptr + sbase + l // SB + (l % SB) * st, mask=valid, other=0.0).to(tl.float32)
        acc += xl * xl
    return acc


@triton.jit
def _store_weights(xb, qb, wb, st, valid, sigma2, SB: tl.constexpr):
    """The _impl searches' weights qw*sqrt(sigma2 + x^2), stored once per lane at wb (the lane re-reads only
    its own addresses, so no barrier is needed); returns their in-order sum. Recomputing the correctly
    rounded sqrt in every search pass cost ~2x."""
    sw = tl.zeros_like(sigma2)
    for i in range(SB):
        xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
        w = tl.load(qb + i * st, mask=valid, other=0.0) * tl.math.sqrt_rn(sigma2 + xi * xi)
        tl.store(wb + i * st, w, mask=valid)
        sw += w
    return sw


@triton.jit
def _qx_rmse1(xb, st, valid, steps_ptr, qb, av, SB: tl.constexpr, NMAX: tl.constexpr, WM: tl.constexpr):
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw), one sub-block per lane; returns the scale.

    Weights per :func:`_qxw`. Returns (scale, the iscale of the chosen levels
    L = clamp(nearest_int(iscale * x), -NMAX, NMAX - 1), which the legacy types keep)."""
    mx, amax = _first_absmax_seq(xb, st, valid, SB)
    zero = amax < 1e-15
    mxs = tl.where(zero, 1.0, mx)
    iscale = div(tl.zeros_like(mx) - NMAX, mxs)
    sumlx = tl.zeros_like(mx)
    suml2 = tl.zeros_like(mx)
    for i in range(SB):
        xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
        lv = tl.minimum(tl.maximum(rne(iscale * xi), -NMAX), NMAX - 1)
        w = _qxw(xi, qb, i, st, valid, av, WM)
        sumlx += (w * xi) * lv
        suml2 += (w * lv) * lv
    scale = tl.where(suml2 != 0, div(sumlx, safe(suml2)), 0.0)
    best = scale * sumlx
    best_is = iscale
    for s in range(18):
        iscale = div(tl.zeros_like(mx) + tl.load(steps_ptr + s), mxs)
        slx = tl.zeros_like(mx)
        sl2 = tl.zeros_like(mx)
        for i in range(SB):
            xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
            lv = tl.minimum(tl.maximum(rne(iscale * xi), -NMAX), NMAX - 1)
            w = _qxw(xi, qb, i, st, valid, av, WM)
            slx += (w * xi) * lv
            sl2 += (w * lv) * lv
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = tl.where(better, div(slx, safe(sl2)), scale)
        best = tl.where(better, scale * slx, best)
        best_is = tl.where(better, iscale, best_is)
    return tl.where(zero, 0.0, scale), best_is


@triton.jit
def _q3(xb, st, valid, SB: tl.constexpr):
    """make_q3_quants(16, 4, x, L, true); the 16 L's live as 4-bit fields of one int64 per lane."""
    mx, amax = _first_absmax_seq(xb, st, valid, SB)
    zero = amax < 1e-15
    iscale = div(tl.zeros_like(mx) - 4.0, tl.where(zero, 1.0, mx))
    packed = tl.zeros(mx.shape, tl.int64)
    sumlx = tl.zeros_like(mx)
    suml2 = tl.zeros_like(mx)
    for i in range(SB):
        xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
        lv = tl.minimum(tl.maximum(rne(iscale * xi), -4.0), 3.0)
        packed = packed | ((lv + 8.0).to(tl.int64) << (i * 4))
        w = xi * xi
        sumlx += (w * xi) * lv
        suml2 += (w * lv) * lv
    active = amax >= 0.0
    for itry in range(5):
        changed = amax < 0.0
        for i in range(SB):
            xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
            li = ((packed >> (i * 4)) & 15).to(tl.float32) - 8.0
            w = xi * xi
            slx = sumlx - (w * xi) * li
            sl2 = suml2 - (w * li) * li
            new_l = tl.minimum(tl.maximum(rne(div(xi * sl2, tl.where(slx > 0, slx, 1.0))), -4.0), 3.0)
            slx2 = slx + (w * xi) * new_l
            sl22 = sl2 + (w * new_l) * new_l
            take = active & (slx > 0) & (new_l != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            field = tl.full(mx.shape, 15, tl.int64) << (i * 4)
            upd = (packed & ~field) | ((new_l + 8.0).to(tl.int64) << (i * 4))
            packed = tl.where(take, upd, packed)
            sumlx = tl.where(take, slx2, sumlx)
            suml2 = tl.where(take, sl22, suml2)
            changed = changed | take
        active = active & changed
    scale = tl.where(suml2 > 0, div(sumlx, safe(suml2)), 0.0)
    return tl.where(zero, 0.0, scale)


@triton.jit
def _col(t, jj, i):
    # column i of a [R, N] tile (one non-zero per row, so the sum is exact)
    return tl.sum(tl.where(jj == i, t, 0.0), axis=1)


@triton.jit
def _qp(x2, w2, qp_ptr, NSUB: tl.constexpr, NMAX: tl.constexpr):
    """make_qp_quants(NSUB, NMAX, x, L, w) per row of an [R, NSUB] tile: (scale [R], L [R, NSUB]).

    L holds C's uint8 values (read-backs wrap modulo 256); the running sums use the unwrapped ints."""
    jj = tl.arange(0, NSUB)[None, :]
    mx = tl.maximum(tl.max(x2, axis=1), 0.0)
    zero = mx < 1e-15
    mxs = tl.where(zero, 1.0, mx)
    iscale = div(tl.zeros_like(mxs) + NMAX, mxs)
    scale = div(tl.zeros_like(mxs) + 1.0, iscale)
    diff = x2 - scale[:, None] * (rne(iscale[:, None] * x2).to(tl.int32) & 255).to(tl.float32)
    e = (w2 * diff) * diff
    best = _col(e, jj, 0)
    for i in range(1, NSUB):
        best += _col(e, jj, i)
    for s in range(8):
        isc = div(tl.zeros_like(mxs) + tl.load(qp_ptr + s), mxs)
        sci = div(tl.zeros_like(mxs) + 1.0, isc)
        diff = x2 - sci[:, None] * tl.minimum(rne(isc[:, None] * x2), NMAX)
        e = (w2 * diff) * diff
        mse = _col(e, jj, 0)
        for i in range(1, NSUB):
            mse += _col(e, jj, i)
        better = mse < best
        best = tl.where(better, mse, best)
        iscale = tl.where(better, isc, iscale)
    lint = tl.minimum(rne(iscale[:, None] * x2), NMAX)
    wx = w2 * x2
    t1 = wx * lint
    t2 = (w2 * lint) * lint
    sumlx = _col(t1, jj, 0)
    suml2 = _col(t2, jj, 0)
    for i in range(1, NSUB):
        sumlx += _col(t1, jj, i)
        suml2 += _col(t2, jj, i)
    lv = (lint.to(tl.int32) & 255).to(tl.float32)
    active = mx >= 0.0
    for itry in range(5):
        changed = mx < 0.0
        for i in range(NSUB):
            li = _col(lv, jj, i)
            wi = _col(w2, jj, i)
            wxi = _col(wx, jj, i)
            xi = _col(x2, jj, i)
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = tl.minimum(rne(div(xi * sl2, tl.where(ok, slx, 1.0))), NMAX)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + (wi * new_l) * new_l
            take = active & ok & (new_l != li) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            stored = (new_l.to(tl.int32) & 255).to(tl.float32)
            lv = tl.where(take[:, None] & (jj == i), stored[:, None], lv)
            sumlx = tl.where(take, slx2, sumlx)
            suml2 = tl.where(take, sl22, suml2)
            changed = changed | take
        active = active & changed
    scale = tl.where(suml2 > 0, div(sumlx, tl.where(suml2 > 0, suml2, 1.0)), 0.0)
    return tl.where(zero, 0.0, scale), tl.where(zero[:, None], 0.0, lv)


@triton.jit
def _qx_col_sums(x2, w2, wx, isc, jj, NSUB: tl.constexpr, NMAX: tl.constexpr):
    # make_qx_quants' in-order sums of w*x*l and w*l*l for one iscale, per row of an [R, NSUB] tile
    lv = tl.minimum(tl.maximum(rne(isc[:, None] * x2), -NMAX), NMAX - 1)
    t1 = wx * lv
    t2 = (w2 * lv) * lv
    slx = _col(t1, jj, 0)
    sl2 = _col(t2, jj, 0)
    for i in range(1, NSUB):
        slx += _col(t1, jj, i)
        sl2 += _col(t2, jj, i)
    return slx, sl2


@triton.jit
def _qx_cols(x2, w2, steps_ptr, NSUB: tl.constexpr, NMAX: tl.constexpr):
    """make_qx_quants(NSUB, NMAX, x, L, 1, w) per row of an [R, NSUB] tile: (scale [R], l [R, NSUB]) with
    l = L - NMAX in [-NMAX, NMAX-1] (an all-zero row gives L = 0, i.e. l = -NMAX, as C's memset)."""
    jj = tl.arange(0, NSUB)[None, :]
    mx, amax = _first_absmax_2d(x2, NSUB)
    zero = amax < 1e-15
    mxs = tl.where(zero, 1.0, mx)
    wx = w2 * x2
    iscale = div(tl.zeros_like(mxs) - NMAX, mxs)
    sumlx, suml2 = _qx_col_sums(x2, w2, wx, iscale, jj, NSUB, NMAX)
    scale = tl.where(suml2 != 0, div(sumlx, safe(suml2)), 0.0)
    best = scale * sumlx
    best_is = iscale
    for s in range(18):
        isc = div(tl.zeros_like(mxs) + tl.load(steps_ptr + s), mxs)
        slx, sl2 = _qx_col_sums(x2, w2, wx, isc, jj, NSUB, NMAX)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        scale = tl.where(better, div(slx, safe(sl2)), scale)
        best = tl.where(better, scale * slx, best)
        best_is = tl.where(better, isc, best_is)
    lv = tl.minimum(tl.maximum(rne(best_is[:, None] * x2), -NMAX), NMAX - 1)
    return tl.where(zero, 0.0, scale), tl.where(zero[:, None], -NMAX + 0.0 * x2, lv)


@triton.jit
def _first_absmax_2d(s, NSUB: tl.constexpr):
    a = tl.abs(s)
    amax = tl.max(a, axis=1)
    jj = tl.arange(0, NSUB)
    first = tl.min(tl.where(a == amax[:, None], jj[None, :], NSUB), axis=1)
    return tl.sum(tl.where(jj[None, :] == first[:, None], s, 0.0), axis=1), amax


@triton.jit
def _kquant_kernel(x_ptr, im_ptr, imt_ptr, wt_ptr, out_ptr, deq_ptr, steps_ptr, qp_ptr, rs_ptr, n_per_row, n_f,
                   KIND: tl.constexpr, SB: tl.constexpr, NSUPER: tl.constexpr, HAS_IM: tl.constexpr,
                   IMPL: tl.constexpr, WRITE: tl.constexpr):
    """Q2_K..Q6_K (quantize_row_q*_K_ref, or with IMPL the imatrix-aware quantize_row_q*_K_impl):
    one row per program, NSUPER super-blocks of 256 at a time, one lane per sub-block.

    ``imt_ptr`` is the imatrix transposed like the rows and ``wt_ptr`` scratch of the rows' shape for the
    search weights (IMPL only). KIND 5-8 are the legacy Q4_0/Q5_0/Q4_1/Q5_1 ``_impl`` searches (one lane per
    32-block, SB = 32): their sigma2 is the in-order sum of the whole row's x^2 (``rs_ptr``, from
    :func:`_row_sumsq_kernel`) over ``n_f``, and their levels are the search's own, not re-rounded.

    ``x_ptr`` holds each row sub-block-transposed (``[SB, n_per_row // SB]``, see
    :func:`quant_error_triton`): the sequential per-lane scans then read consecutive addresses across a
    warp's lanes instead of one cache line per lane.
    """
    NSUB: tl.constexpr = 256 // SB
    S: tl.constexpr = NSUPER * NSUB
    pid_r = tl.program_id(0)
    sub = tl.arange(0, S)
    row_ptr = x_ptr + pid_r.to(tl.int64) * n_per_row
    a0 = tl.zeros([S], tl.float32)
    a1 = tl.zeros([S], tl.float32)
    a2 = tl.zeros([S], tl.float32)
    a3 = tl.zeros([S], tl.float32)
    st = n_per_row // SB
    for c0 in range(0, st, S):
        sb_i = c0 + sub
        valid = sb_i < st
        xb = row_ptr + sb_i
        qb = imt_ptr + sb_i
        wb = wt_ptr + pid_r.to(tl.int64) * n_per_row + sb_i
        zero2 = tl.zeros([NSUPER, NSUB], tl.float32)
        if KIND >= 5:  # quantize_row_q{4,5}_{0,1}_impl
            sigma2 = div(tl.zeros([S], tl.float32) + tl.load(rs_ptr + pid_r), tl.zeros([S], tl.float32) + n_f)
            _store_weights(xb, qb, wb, st, valid, sigma2, SB)
            if KIND <= 6:  # Q4_0 / Q5_0: make_qx_quants(32, nmax, x, L, 1, w)
                lsc, lis = _qx_rmse1(xb, st, valid, steps_ptr, wb, 0.0, SB, 8 if KIND == 5 else 16, 1)
                lmn = tl.zeros([S], tl.float32)
                lm16 = tl.zeros([S], tl.float32)
                NMIN: tl.constexpr = -8 if KIND == 5 else -16
                NTOP: tl.constexpr = 7 if KIND == 5 else 15
            else:  # Q4_1 / Q5_1: make_qkx3_quants(32, nmax, x, w, ..., -0.9f, 0.05f, 36, false)
                lsc, tmin, _sw, lis, lmn = _qkx2(xb, st, valid, steps_ptr, 0.0, wb, SB, 15 if KIND == 7 else 31, 36,
                                                False, False, True)
                lm16 = fp16(-tmin)
                NMIN: tl.constexpr = 0
                NTOP: tl.constexpr = 15 if KIND == 7 else 31
            d2 = zero2
            dm2 = zero2
        elif KIND == 0 or KIND == 2 or KIND == 3:
            QMAX: tl.constexpr = 3 if KIND == 0 else (15 if KIND == 2 else 31)
            if IMPL:  # Q2_K / Q4_K / Q5_K _impl: weights qw*sqrt(sigma2 + x^2), sigma2 = (2*)mean(x^2) per 256
                sum_x2 = _sb_sumsq(row_ptr, sb_i, st, valid, SB, NSUB)
                if KIND == 0:
                    sigma2 = div(sum_x2, tl.zeros_like(sum_x2) + 256.0)
                else:
                    sigma2 = div(2.0 * sum_x2, tl.zeros_like(sum_x2) + 256.0)
                _store_weights(xb, qb, wb, st, valid, sigma2, SB)
                sc, mn, sw, _lis, _lmn = _qkx2(xb, st, valid, steps_ptr, sigma2, wb, SB, QMAX, 36, False, False, True)
            elif KIND == 0:  # Q2_K: weights |x|, mean absolute deviation
                sc, mn, sw, _lis, _lmn = _qkx2(xb, st, valid, steps_ptr, 0.0, qb, SB, 3, 15, True, True, False)
            else:  # Q4_K / Q5_K: weights av_x + |x|
                sum_x2 = tl.zeros([S], tl.float32)
                for i in range(SB):
                    xi = tl.load(xb + i * st, mask=valid, other=0.0).to(tl.float32)
                    sum_x2 += xi * xi
                av = tl.math.sqrt_rn(div(sum_x2, tl.zeros_like(sum_x2) + 32.0))
                QSTEP: tl.constexpr = 20 if KIND == 2 else 15
                sc, mn, sw, _lis, _lmn = _qkx2(xb, st, valid, steps_ptr, av, qb, SB, QMAX, QSTEP, False, False, False)
            sc2 = tl.reshape(sc, [NSUPER, NSUB])
            mn2 = tl.reshape(mn, [NSUPER, NSUB])
            max_scale = tl.maximum(tl.max(sc2, axis=1), 0.0)
            max_min = tl.maximum(tl.max(mn2, axis=1), 0.0)
            if IMPL and KIND == 0:  # make_qp_quants for the 4-bit scales and mins, weighted by sum(w)
                sw2 = tl.reshape(sw, [NSUPER, NSUB])
                d_blk, ls = _qp(sc2, sw2, qp_ptr + 8, NSUB, 15)
                m_blk, lm = _qp(mn2, sw2, qp_ptr + 8, NSUB, 15)
                packed = (ls.to(tl.int32) | (lm.to(tl.int32) << 4)) & 255  # scales[j] = Ls[j] | (Lm[j] << 4)
                d2 = fp16(d_blk)[:, None] * (packed & 15).to(tl.float32)
                dm2 = fp16(m_blk)[:, None] * (packed >> 4).to(tl.float32)
                NMIN: tl.constexpr = 0
                NTOP: tl.constexpr = 3
            elif IMPL:  # make_qp_quants for the 6-bit scales and mins, weighted by sum(w)
                sw2 = tl.reshape(sw, [NSUPER, NSUB])
                d_blk, ls = _qp(sc2, sw2, qp_ptr, NSUB, 63)
                m_blk, lm = _qp(mn2, sw2, qp_ptr, NSUB, 63)
                d2 = fp16(d_blk)[:, None] * tl.minimum(ls, 63.0)
                dm2 = fp16(m_blk)[:, None] * tl.minimum(lm, 63.0)
                NMIN: tl.constexpr = 0
                NTOP: tl.constexpr = QMAX
            elif KIND == 0:
                has_s = max_scale > 0
                has_m = max_min > 0
                ls = rne(div(tl.zeros_like(max_scale) + 15.0, safe(max_scale))[:, None] * sc2)
                lm = rne(div(tl.zeros_like(max_min) + 15.0, safe(max_min))[:, None] * mn2)
                ls = tl.where(has_s[:, None], ls, zero2).to(tl.int32) & 255
                lm = tl.where(has_m[:, None], lm, zero2).to(tl.int32)
                packed = (ls | (lm << 4)) & 255  # y[i].scales[j] = l; |= (l << 4)
                d16 = tl.where(has_s, fp16(div(max_scale, tl.zeros_like(max_scale) + 15.0)), 0.0)
                m16 = tl.where(has_m, fp16(div(max_min, tl.zeros_like(max_min) + 15.0)), 0.0)
                d2 = d16[:, None] * (packed & 15).to(tl.float32)
                dm2 = m16[:, None] * (packed >> 4).to(tl.float32)
                NMIN: tl.constexpr = 0
                NTOP: tl.constexpr = 3
            else:
                inv_s = tl.where(max_scale > 0, div(tl.zeros_like(max_scale) + 63.0, safe(max_scale)), 0.0)
                inv_m = tl.where(max_min > 0, div(tl.zeros_like(max_min) + 63.0, safe(max_min)), 0.0)
                ls = tl.minimum((rne(inv_s[:, None] * sc2).to(tl.int32) & 255).to(tl.float32), 63.0)
                lm = tl.minimum((rne(inv_m[:, None] * mn2).to(tl.int32) & 255).to(tl.float32), 63.0)
                d2 = fp16(div(max_scale, tl.zeros_like(max_scale) + 63.0))[:, None] * ls
                dm2 = fp16(div(max_min, tl.zeros_like(max_min) + 63.0))[:, None] * lm
                NMIN: tl.constexpr = 0
                NTOP: tl.constexpr = QMAX
        elif KIND == 1 and IMPL:  # Q3_K _impl: weighted make_qx_quants per 16, then make_qx_quants on the scales
            sum_x2 = _sb_sumsq(row_ptr, sb_i, st, valid, SB, NSUB)
            sigma2 = div(2.0 * sum_x2, tl.zeros_like(sum_x2) + 256.0)
            sw = _store_weights(xb, qb, wb, st, valid, sigma2, SB)
            sc_q3, _bis = _qx_rmse1(xb, st, valid, steps_ptr, wb, sigma2, SB, 4, 1)
            sc2 = tl.reshape(sc_q3, [NSUPER, NSUB])
            d_blk, lq = _qx_cols(sc2, tl.reshape(sw, [NSUPER, NSUB]), qp_ptr + 16, NSUB, 32)
            d2 = fp16(d_blk)[:, None] * lq  # the 6-bit field holds l + 32 and decodes to l
            dm2 = zero2
            NMIN: tl.constexpr = -4
            NTOP: tl.constexpr = 3
        elif KIND == 1:  # Q3_K: make_q3_quants, signed 6-bit scales against the first largest |scale|
            sc2 = tl.reshape(_q3(xb, st, valid, SB), [NSUPER, NSUB])
            max_scale, _amax = _first_absmax_2d(sc2, NSUB)
            has = max_scale != 0
            iscale = div(tl.zeros_like(max_scale) - 32.0, safe(max_scale))
            lq = tl.minimum(tl.maximum(rne(iscale[:, None] * sc2), -32.0), 31.0)
            lq = tl.where(has[:, None], lq, zero2 - 32.0)
            d16 = tl.where(has, fp16(div(tl.zeros_like(iscale) + 1.0, iscale)), 0.0)
            d2 = d16[:, None] * lq
            dm2 = zero2
            NMIN: tl.constexpr = -4
            NTOP: tl.constexpr = 3
        else:  # Q6_K: make_qx_quants(16, 32, rmse_type 1), int8 scales against the first largest |scale|
            sc_q6, _bis = _qx_rmse1(xb, st, valid, steps_ptr, qb, 0.0, SB, 32, 1 if IMPL else 0)
            sc2 = tl.reshape(sc_q6, [NSUPER, NSUB])
            max_scale, amax = _first_absmax_2d(sc2, NSUB)
            has = amax >= 1e-15
            iscale = div(tl.zeros_like(max_scale) - 128.0, tl.where(has, max_scale, 1.0))
            lq = tl.minimum(rne(iscale[:, None] * sc2), 127.0)
            d16 = tl.where(has, fp16(div(tl.zeros_like(iscale) + 1.0, iscale)), 0.0)
            d2 = d16[:, None] * tl.where(has[:, None], lq, zero2)
            dm2 = zero2
            NMIN: tl.constexpr = -32
            NTOP: tl.constexpr = 31
        # requantize every weight against its sub-block's (d, dm) and reduce the error
        d = tl.reshape(d2, [S])
        dm = tl.reshape(dm2, [S])
        j = tl.arange(0, SB)
        v2 = valid[:, None] & (j[None, :] < SB)
        x = tl.load(row_ptr + sb_i[:, None] + j[None, :] * st, mask=v2, other=0.0).to(tl.float32)
        if HAS_IM:
            im = tl.load(im_ptr + sb_i[:, None] * SB + j[None, :], mask=v2, other=0.0)
        else:
            im = tl.full([S, SB], 1.0, tl.float32)
        if KIND >= 5:  # the search's levels, x0*d (+ m)
            if KIND <= 6:
                lv = tl.minimum(tl.maximum(rne(lis[:, None] * x), NMIN), NTOP)
            else:
                lv = tl.minimum(tl.maximum(rne(lis[:, None] * (x - lmn[:, None])), NMIN), NTOP)
            deq = lv * fp16(lsc)[:, None] + lm16[:, None]
        else:
            lv = tl.minimum(tl.maximum(rne(div(x + dm[:, None], safe(d)[:, None])), NMIN), NTOP)
            deq = d[:, None] * lv - dm[:, None]
        if WRITE:  # Q(W) in the original layout, for the activation error
            tl.store(deq_ptr + pid_r.to(tl.int64) * n_per_row + sb_i[:, None] * SB + j[None, :], deq, mask=v2)
        a0, a1, a2, a3 = _add_tile_sums(a0, a1, a2, a3, x, deq, im, v2)
    _store_row(out_ptr, pid_r, a0, a1, a2, a3)


@triton.jit
def _row_sumsq_kernel(x_ptr, out_ptr, rows, n, BLOCK_R: tl.constexpr):
    """sum(x^2) of each row in C's loop order (one thread per row), for the legacy ``_impl`` sigma2."""
    r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    m = r < rows
    base = x_ptr + r.to(tl.int64) * n
    acc = tl.zeros([BLOCK_R], tl.float32)
    for j in range(0, n):
        v = tl.load(base + j, mask=m, other=0.0).to(tl.float32)
        acc += v * v
    tl.store(out_ptr + r, acc, mask=m)


@functools.cache
def _steps(fmt: QuantFormat, device: str, impl: bool = False) -> torch.Tensor:
    params = KQUANT_IMPL_PARAMS if impl and fmt in KQUANT_IMPL_PARAMS else KQUANT_PARAMS
    if fmt in params:
        _, nmax, rmin, rdelta, nstep, _ = params[fmt]
        arr = qkx2_steps(nmax, rmin, rdelta, nstep)
    else:  # make_qx_quants: Q6_K (nmax 32), Q3_K _impl's sub-blocks (4), Q4_0/Q5_0 _impl (8/16)
        nmax = {QuantFormat.Q3_K: 4, QuantFormat.Q4_0: 8, QuantFormat.Q5_0: 16}.get(fmt, 32)
        arr = qx_steps(nmax)
    return torch.from_numpy(arr).to(device)


@functools.cache
def _qp_steps(device: str) -> torch.Tensor:
    # make_qp_quants' numerators for nmax 63 (Q4_K/Q5_K), for nmax 15 (Q2_K) at offset 8, then
    # make_qx_quants' for nmax 32 (Q3_K _impl's scales) at offset 16
    return torch.from_numpy(np.concatenate([qp_steps(63), qp_steps(15), qx_steps(32)])).to(device)


def quant_error_triton(weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None, *,
                       imatrix_quantizer: bool = False, return_dequantized: bool = False,
                       tile: int | None = None, num_warps: int | None = None) -> dict[str, torch.Tensor]:
    """Per-row ``sse``/``wsse``/``sumsq``/``wsumsq`` of ``weight`` fake-quantized as ``fmt``, in one pass.

    One kernel launch: each program owns one row and loops over it, so no partial sums are written
    and no follow-up reduction runs. The result is four views of one ``[rows, 4]`` tensor.

    Args:
        weight: ``[rows, n_per_row]`` float32, bfloat16 or float16 tensor (CUDA, or CPU under
            ``TRITON_INTERPRET=1``); 16-bit weights are widened in registers, never copied.
        fmt: one of :data:`TRITON_QUANT_FORMATS`.
        imatrix: optional ``[n_per_row]`` importance weights.
        imatrix_quantizer: quantize as libggml does with this imatrix (``quantize_row_*_impl``; Q8_0 and
            TQ*_0 ignore the imatrix in libggml too).
        return_dequantized: also write the fake-quantized tensor (float32, ``weight``'s shape) as ``"deq"``,
            for the activation error; the sums alone never write it.
        tile: blocks (legacy types) or super-blocks (K-quants) per loop step; tuning only.
        num_warps: warps per program; tuning only.

    Returns:
        dict of float32 ``[rows]`` tensors, as :func:`dq.kernels.ref_quant.error_sums`.
    """
    x = weight if weight.dtype in (torch.float32, torch.bfloat16, torch.float16) else weight.to(torch.float32)
    x = x.contiguous()
    rows, n = x.shape
    spec = FORMATS[fmt]
    im = imatrix.to(device=x.device, dtype=torch.float32).contiguous() if imatrix is not None else x
    out = torch.empty(rows, 4, device=x.device, dtype=torch.float32)
    deq = torch.empty(rows, n, device=x.device, dtype=torch.float32) if return_dequantized else out
    impl = imatrix_quantizer and imatrix is not None
    if fmt in _LEGACY and not (impl and fmt in _LEGACY_IMPL):
        qk = spec.block_size
        # launch shapes from bench/kernels_sweep.py on an H100 (bench/results/kernels_sweep_h100.json)
        blocks = tile or (32 if qk == 32 else 8)
        _legacy_kernel[(rows,)](
            x, im, out, deq, n, KIND=_LEGACY[fmt], QK=qk, BLOCKS=blocks, HAS_IM=imatrix is not None,
            WRITE=return_dequantized, num_warps=num_warps or (4 if qk == 32 else 2), enable_fp_fusion=False,
        )
    else:
        sb = 32 if fmt in (QuantFormat.Q4_K, QuantFormat.Q5_K) or fmt in _LEGACY_IMPL else 16
        nsuper = tile or 8
        rs = out
        if fmt in _LEGACY_IMPL:  # sigma2 of the legacy _impl searches: the whole row's in-order sum of x^2
            rs = torch.empty(rows, device=x.device, dtype=torch.float32)
            _row_sumsq_kernel[(triton.cdiv(rows, 32),)](x, rs, rows, n, BLOCK_R=32, num_warps=1,
                                                          enable_fp_fusion=False)
        xt = x.view(rows, n // sb, sb).transpose(1, 2).contiguous()  # one extra pass, ~1% of the kernel's time
        imt = im.view(n // sb, sb).t().contiguous() if impl else im
        wt = torch.empty(xt.shape, device=x.device, dtype=torch.float32) if impl else out
        dev = str(x.device)
        _kquant_kernel[(rows,)](
            xt, im, imt, wt, out, deq, _steps(fmt, dev, impl), _qp_steps(dev), rs, n, float(n),
            KIND=_LEGACY_IMPL.get(fmt, _KQ.get(fmt)), SB=sb, NSUPER=nsuper, HAS_IM=imatrix is not None, IMPL=impl,
            WRITE=return_dequantized, num_warps=num_warps or max(1, nsuper * (256 // sb) // 32),
            enable_fp_fusion=False,
        )
    res = {"sse": out[:, 0], "wsse": out[:, 1], "sumsq": out[:, 2], "wsumsq": out[:, 3]}
    if return_dequantized:
        res["deq"] = deq
    return res
