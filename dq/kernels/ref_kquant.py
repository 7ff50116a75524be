"""Torch reference of ggml's K-quant quantizers, and of the imatrix searches of all ported types.

``k_blocks`` ports ``quantize_row_q{2..6}_K_ref``; ``k_blocks_imatrix`` and
``legacy_blocks_imatrix`` port the imatrix-aware ``quantize_row_*_impl`` of Q2_K..Q6_K and
Q4_0/Q4_1/Q5_0/Q5_1. Each returns the blocks' fields (:class:`~dq.kernels.ref_quant.QBlocks`: fp16 scales,
the scale bytes as C packs them, every weight's level), which :mod:`dq.kernels.ref_pack` turns into GGUF
bytes and ``fake_quant_*`` dequantizes. The scale searches (``make_qkx2/3_quants``, ``make_q3_quants``,
``make_qx_quants``, ``make_qp_quants``) run vectorized over all sub-blocks at once, with the per-element
sums accumulated sequentially as in C so the chosen scales are bit-identical. The K-quants re-round every
weight against the stored scales, except in a sub-block whose scale is stored as 0 (``if (!d) continue;``),
which keeps the search's levels; the legacy ``_impl`` paths keep the search's levels.

The search step constants (``rmin + rdelta*is + nmax``) are float32 expressions in C; they are
precomputed here with numpy float32 so that Python's double arithmetic cannot leak in. The Triton
kernels in :mod:`dq.kernels._triton_quant` reuse the same tables.
"""

from __future__ import annotations

import numpy as np
import torch

from dq.kernels.ref_quant import (
    QBlocks,
    first_absmax,
    first_min,
    fp16_round,
    nearest_int,
    rdiv,
    sdiv,
    seq_sum,
)
from dq.quant.formats import QuantFormat

__all__ = ["fake_quant_k", "fake_quant_k_imatrix", "fake_quant_legacy_imatrix", "k_blocks", "k_blocks_imatrix",
           "legacy_blocks_imatrix", "qkx2_steps", "qx_steps", "qp_steps", "KQUANT_PARAMS", "KQUANT_IMPL_PARAMS",
           "IMATRIX_K_FORMATS", "GROUP_MAX_EPS"]

GROUP_MAX_EPS = 1e-15  # ggml-quants.c GROUP_MAX_EPS

# (sub-block size, nmax, rmin, rdelta, nstep, use_mad) of each make_qkx2_quants call in the _ref paths.
KQUANT_PARAMS: dict[QuantFormat, tuple[int, int, float, float, int, bool]] = {
    QuantFormat.Q2_K: (16, 3, -0.5, 0.1, 15, True),
    QuantFormat.Q4_K: (32, 15, -1.0, 0.1, 20, False),
    QuantFormat.Q5_K: (32, 31, -0.5, 0.1, 15, False),
}


# (block size, nmax, rmin, rdelta, nstep, use_mad) of make_qkx3_quants in the imatrix (_impl) paths.
KQUANT_IMPL_PARAMS: dict[QuantFormat, tuple[int, int, float, float, int, bool]] = {
    QuantFormat.Q2_K: (16, 3, -0.9, 0.05, 36, False),
    QuantFormat.Q4_K: (32, 15, -0.9, 0.05, 36, False),
    QuantFormat.Q5_K: (32, 31, -0.9, 0.05, 36, False),
    QuantFormat.Q4_1: (32, 15, -0.9, 0.05, 36, False),
    QuantFormat.Q5_1: (32, 31, -0.9, 0.05, 36, False),
}
# K-quants whose imatrix-aware quantizer (quantize_row_*_impl) is ported here and in the Triton kernels.
IMATRIX_K_FORMATS = (QuantFormat.Q2_K, QuantFormat.Q3_K, QuantFormat.Q4_K, QuantFormat.Q5_K, QuantFormat.Q6_K)


def qkx2_steps(nmax: int, rmin: float, rdelta: float, nstep: int) -> np.ndarray:
    """float32 numerators ``rmin + rdelta*is + nmax`` for ``is = 0..nstep`` (make_qkx2_quants)."""
    f = np.float32
    return np.array([(f(rmin) + f(rdelta) * f(i)) + f(nmax) for i in range(nstep + 1)], dtype=np.float32)


def qx_steps(nmax: int) -> np.ndarray:
    """float32 numerators ``-(nmax + 0.1f*is)`` for ``is = -9..9, is != 0`` (make_qx_quants)."""
    f = np.float32
    return np.array([-(f(nmax) + f(0.1) * f(i)) for i in range(-9, 10) if i != 0], dtype=np.float32)


def qp_steps(nmax: int) -> np.ndarray:
    """float32 numerators ``0.1f*is + nmax`` for ``is = -4..4, is != 0`` (make_qp_quants)."""
    f = np.float32
    return np.array([f(0.1) * f(i) + f(nmax) for i in range(-4, 5) if i != 0], dtype=np.float32)


def _sqrt_rn(t: torch.Tensor) -> torch.Tensor:
    # sqrtf is correctly rounded; torch's float32 sqrt is not always, float64 then float32 is
    return torch.sqrt(t.double()).float()


def _make_qkx2(
    x: torch.Tensor, w: torch.Tensor, nmax: int, rmin: float, rdelta: float, nstep: int, use_mad: bool,
    levels: bool = False,
) -> tuple[torch.Tensor, ...]:
    """make_qkx2_quants (= make_qkx3_quants) over rows of ``x`` ``[B, n]``; returns ``(scale, the_min)``
    (``the_min = -min``), and with ``levels`` also the chosen ``L`` (zeros for a flat row)."""
    mn = first_min(x)
    mn = torch.where(mn > 0, torch.zeros_like(mn), mn)  # `if (min > 0) min = 0;` (a -0.0 min stays)
    mx = x.amax(dim=1)
    sum_w = seq_sum(w)
    sum_x = seq_sum(w * x)
    flat = mx == mn
    rng = torch.where(flat, torch.ones_like(mx), mx - mn)
    xm = x - mn[:, None]

    def err(scale: torch.Tensor, mn_: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = (scale[:, None] * lv + mn_[:, None]) - x
        diff = diff.abs() if use_mad else diff * diff
        return seq_sum(w * diff)

    iscale = rdiv(float(nmax), rng)
    scale = rdiv(1.0, iscale)
    lv = torch.clamp(nearest_int(iscale[:, None] * xm), 0, nmax)
    best = err(scale, mn, lv)
    minv = mn.clone()
    lbest = lv
    for num in qkx2_steps(nmax, rmin, rdelta, nstep):
        # C overwrites `min` when a step wins, so later steps search from the new min
        rng = torch.where(flat, torch.ones_like(mx), mx - minv)
        iscale = rdiv(float(num), rng)
        la = torch.clamp(nearest_int(iscale[:, None] * (x - minv[:, None])), 0, nmax)
        wl = w * la
        sum_l, sum_l2, sum_xl = seq_sum(wl), seq_sum(wl * la), seq_sum(wl * x)
        D = sum_w * sum_l2 - sum_l * sum_l
        ok = D > 0
        Ds = torch.where(ok, D, torch.ones_like(D))
        this_scale = (sum_w * sum_xl - sum_x * sum_l) / Ds
        this_min = (sum_l2 * sum_x - sum_l * sum_xl) / Ds
        pos = this_min > 0
        this_min = torch.where(pos, torch.zeros_like(this_min), this_min)
        this_scale = torch.where(pos, sum_xl / sum_l2, this_scale)
        cur = err(this_scale, this_min, la)
        better = ok & (cur < best)
        best = torch.where(better, cur, best)
        scale = torch.where(better, this_scale, scale)
        minv = torch.where(better, this_min, minv)
        if levels:
            lbest = torch.where(better[:, None], la, lbest)
    scale = torch.where(flat, torch.zeros_like(scale), scale)
    minv = torch.where(flat, mn, minv)
    if levels:
        return scale, -minv, torch.where(flat[:, None], torch.zeros_like(lbest), lbest)
    return scale, -minv


def _make_q3(x: torch.Tensor, nmax: int) -> tuple[torch.Tensor, torch.Tensor]:
    """make_q3_quants(n, nmax, x, L, do_rmse=true) over rows of ``x``: ``(scale, L)``, ``L = l + nmax`` as C
    leaves it (an all-zero row: ``L = 0``)."""
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    iscale = rdiv(float(-nmax), mxs)
    lv = torch.clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)
    w = x * x
    wx = w * x
    sumlx = seq_sum(wx * lv)
    suml2 = seq_sum((w * lv) * lv)
    active = torch.ones_like(zero)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(x.shape[1]):
            li, wi, wxi, xi = lv[:, i], w[:, i], wx[:, i], x[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            new_l = torch.clamp(nearest_int((xi * sl2) / torch.where(slx > 0, slx, torch.ones_like(slx))), -nmax, nmax - 1)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + (wi * new_l) * new_l
            take = active & (slx > 0) & (new_l != li) & (sl22 > 0) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            lv[:, i] = torch.where(take, new_l, li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed = changed | take
        active = active & changed  # `if (!n_changed) break;`, per block
        if not bool(active.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    lv = torch.where(zero[:, None], torch.zeros_like(lv), lv + nmax)
    return torch.where(zero, torch.zeros_like(scale), scale), lv


def _make_qx(x: torch.Tensor, nmax: int, qw: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qx_quants(n, nmax, x, L, rmse_type=1, qw) over rows of ``x``: ``(scale, l)`` with ``l = L - nmax``
    from the winning step (an all-zero row gives ``L = 0``, i.e. ``l = -nmax``).

    Without ``qw`` the weights are ``x*x`` (the reference path), with it the given weights."""
    mx, amax = first_absmax(x)
    zero = amax < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    w = x * x if qw is None else qw
    wx = w * x

    def levels(iscale: torch.Tensor) -> torch.Tensor:
        return torch.clamp(nearest_int(iscale[:, None] * x), -nmax, nmax - 1)

    def sums(iscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lv = levels(iscale)
        return seq_sum(wx * lv), seq_sum((w * lv) * lv)

    best_is = rdiv(float(-nmax), mxs)
    sumlx, suml2 = sums(best_is)
    scale = torch.where(suml2 != 0, sumlx / torch.where(suml2 != 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    best = scale * sumlx
    for num in qx_steps(nmax):
        isc = rdiv(float(num), mxs)
        slx, sl2 = sums(isc)
        better = (sl2 > 0) & (slx * slx > best * sl2)
        new_scale = slx / torch.where(sl2 > 0, sl2, torch.ones_like(sl2))
        scale = torch.where(better, new_scale, scale)
        best = torch.where(better, scale * slx, best)
        best_is = torch.where(better, isc, best_is)
    lv = torch.where(zero[:, None], torch.full_like(x, float(-nmax)), levels(best_is))
    return torch.where(zero, torch.zeros_like(scale), scale), lv


def _make_qp(x: torch.Tensor, nmax: int, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """make_qp_quants(n, nmax, x, L, w) over rows of ``x`` ``[B, n]``: returns ``(scale, L)``.

    ``L`` is C's ``uint8_t`` array, so values read back from it wrap modulo 256; the running sums use
    the unwrapped ints, as the C code does.
    """
    mx = torch.clamp(x.amax(dim=1), min=0.0)
    zero = mx < GROUP_MAX_EPS
    mxs = torch.where(zero, torch.ones_like(mx), mx)
    n = x.shape[1]

    def wsse(scale: torch.Tensor, lv: torch.Tensor) -> torch.Tensor:
        diff = x - scale[:, None] * lv
        return seq_sum((w * diff) * diff)

    iscale = rdiv(float(nmax), mxs)
    best = wsse(rdiv(1.0, iscale), torch.remainder(nearest_int(iscale[:, None] * x), 256))
    for num in qp_steps(nmax):
        isc = rdiv(float(num), mxs)
        mse = wsse(rdiv(1.0, isc), torch.clamp(nearest_int(isc[:, None] * x), max=nmax))
        better = mse < best
        best = torch.where(better, mse, best)
        iscale = torch.where(better, isc, iscale)
    lint = torch.clamp(nearest_int(iscale[:, None] * x), max=nmax)
    wx = w * x
    sumlx = seq_sum(wx * lint)
    suml2 = seq_sum((w * lint) * lint)
    lv = torch.remainder(lint, 256)
    active = torch.ones_like(zero)
    for _ in range(5):
        changed = torch.zeros_like(zero)
        for i in range(n):
            li, wi, wxi, xi = lv[:, i], w[:, i], wx[:, i], x[:, i]
            slx = sumlx - wxi * li
            sl2 = suml2 - (wi * li) * li
            ok = (slx > 0) & (sl2 > 0)
            new_l = torch.clamp(nearest_int((xi * sl2) / torch.where(ok, slx, torch.ones_like(slx))), max=nmax)
            slx2 = slx + wxi * new_l
            sl22 = sl2 + (wi * new_l) * new_l
            take = active & ok & (new_l != li) & ((slx2 * slx2) * suml2 > (sumlx * sumlx) * sl22)
            lv[:, i] = torch.where(take, torch.remainder(new_l, 256), li)
            sumlx = torch.where(take, slx2, sumlx)
            suml2 = torch.where(take, sl22, suml2)
            changed = changed | take
        active = active & changed  # `if (!n_changed) break;`, per row
        if not bool(active.any()):
            break
    scale = torch.where(suml2 > 0, sumlx / torch.where(suml2 > 0, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))
    return torch.where(zero, torch.zeros_like(scale), scale), torch.where(zero[:, None], torch.zeros_like(lv), lv)


def _impl_weights(b: torch.Tensor, qw: torch.Tensor, sb: int, twice: bool) -> tuple[torch.Tensor, ...]:
    """The K-quant _impl searches' inputs: sub-blocks ``x``, weights ``qw*sqrt(sigma2 + x^2)`` with
    ``sigma2 = (2*)sum(x^2)/256`` of each super-block summed in order, and each sub-block's sum of weights."""
    sigma2 = sdiv((2.0 if twice else 1.0) * seq_sum(b * b), 256.0)
    x = b.reshape(-1, sb)
    w = qw.reshape(-1, sb) * _sqrt_rn(sigma2.repeat_interleave(256 // sb)[:, None] + x * x)
    return x, w, seq_sum(w).reshape(-1, 256 // sb)


def _requant_sym(b: torch.Tensor, dl: torch.Tensor, lo: int, hi: int, searched: torch.Tensor) -> torch.Tensor:
    """Q3_K / Q6_K: every weight re-rounded against its 16-weight sub-block's signed scale ``dl``; stored
    levels ``l - lo``. ``if (!d) continue;`` keeps the search's stored levels ``searched`` ``[B, 256]``."""
    xs = b.reshape(-1, 16, 16)
    ds = torch.where(dl != 0, dl, torch.ones_like(dl))[..., None]
    lv = torch.clamp(nearest_int(xs / ds), lo, hi) - lo
    return torch.where(dl[..., None] != 0, lv, searched.reshape(xs.shape)).reshape(b.shape).to(torch.int32)


def _requant_min(b: torch.Tensor, dl: torch.Tensor, ml: torch.Tensor, sb: int, nmax: int,
                 searched: torch.Tensor) -> torch.Tensor:
    """Every weight re-rounded against its sub-block's ``(d, dm)``; ``if (!d) continue;`` keeps the search's
    levels ``searched`` ``[B, 256]`` (they dequantize to ``-dm`` all the same)."""
    xs = b.reshape(-1, 256 // sb, sb)
    ds = torch.where(dl != 0, dl, torch.ones_like(dl))[..., None]
    lv = torch.clamp(nearest_int((xs + ml[..., None]) / ds), 0, nmax)
    return torch.where(dl[..., None] != 0, lv, searched.reshape(xs.shape)).reshape(b.shape).to(torch.int32)


def _pack_scale_min_k4(ls: torch.Tensor, lm: torch.Tensor) -> torch.Tensor:
    """``y.scales[12]`` of Q4_K/Q5_K from 8 scales and 8 mins (int ``[S, 8]``, C's ``uint8_t``), packed as
    ``quantize_row_q4_K_ref`` does; values above 63 spill into the neighbouring high bits as in C."""
    lo = torch.cat([ls[:, :4] | ((ls[:, 4:] >> 4) << 6), lm[:, :4] | ((lm[:, 4:] >> 4) << 6),
                    (ls[:, 4:] & 0xF) | ((lm[:, 4:] & 0xF) << 4)], 1)
    return lo & 0xFF


def _scale_min_k4(q: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """get_scale_min_k4 over ``y.scales`` ``[S, 12]``: the 6-bit scales and mins ``[S, 8]`` as float32."""
    sc = torch.cat([q[:, :4] & 63, (q[:, 8:] & 0xF) | ((q[:, :4] >> 6) << 4)], 1)
    mn = torch.cat([q[:, 4:8] & 63, (q[:, 8:] >> 4) | ((q[:, 4:8] >> 6) << 4)], 1)
    return sc.to(torch.float32), mn.to(torch.float32)


def _pack_q3_k_scales(l6: torch.Tensor) -> torch.Tensor:
    """``y.scales[12]`` of Q3_K from 16 six-bit fields ``l + 32`` (int ``[S, 16]``), as quantize_row_q3_K_ref
    packs them: low nibbles of 0..7 and 8..15 share a byte, the 2 high bits of ``j`` go to byte ``8 + j%4``."""
    lo = (l6[:, :8] & 0xF) | ((l6[:, 8:] & 0xF) << 4)
    hi = ((l6 >> 4).reshape(-1, 4, 4) << torch.tensor([0, 2, 4, 6], device=l6.device)[:, None]).sum(1)
    return torch.cat([lo, hi], 1)


def _min_max_blocks(fmt: QuantFormat, b: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor, ls: torch.Tensor,
                    lm: torch.Tensor, searched: torch.Tensor) -> QBlocks:
    """Q4_K / Q5_K fields from the super-block scales, the 8 scale and min codes and the search's levels;
    the re-rounding reads the scales back from the packed bytes (get_scale_min_k4), as C does."""
    nmax = KQUANT_PARAMS[fmt][1]
    scales = _pack_scale_min_k4(ls.to(torch.int32), lm.to(torch.int32))
    sc, mn = _scale_min_k4(scales)
    dl, ml = d16[:, None] * sc, m16[:, None] * mn
    return QBlocks(fmt, d16, _requant_min(b, dl, ml, 32, nmax, searched), dmin=m16, scales=scales,
                   sub_scale=dl, sub_min=ml)


def _q2_blocks(b: torch.Tensor, d16: torch.Tensor, m16: torch.Tensor, packed: torch.Tensor,
               searched: torch.Tensor) -> QBlocks:
    """Q2_K fields from the super-block scales, the ``Ls | Lm << 4`` bytes and the search's levels."""
    dl = d16[:, None] * (packed & 0xF).to(torch.float32)
    ml = m16[:, None] * (packed >> 4).to(torch.float32)
    return QBlocks(QuantFormat.Q2_K, d16, _requant_min(b, dl, ml, 16, 3, searched), dmin=m16, scales=packed,
                   sub_scale=dl, sub_min=ml)


def _min_max_k_imatrix(b: torch.Tensor, fmt: QuantFormat, qw: torch.Tensor) -> QBlocks:
    # quantize_row_q4_K_impl / q5_K_impl: weights qw*sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2) of the
    # super-block, make_qkx3_quants per 32, then 6-bit scales and mins by make_qp_quants weighted by
    # each sub-block's sum of weights
    sb, nmax, rmin, rdelta, nstep, mad = KQUANT_IMPL_PARAMS[fmt]
    nsub = 256 // sb
    x, w, sw = _impl_weights(b, qw, sb, twice=True)
    sc, mn, searched = _make_qkx2(x, w, nmax, rmin, rdelta, nstep, mad, levels=True)  # = make_qkx3_quants
    d_block, ls = _make_qp(sc.reshape(-1, nsub), 63, sw)
    m_block, lm = _make_qp(mn.reshape(-1, nsub), 63, sw)
    if fmt is QuantFormat.Q5_K:  # Q5_K clamps MIN(63, L); Q4_K stores L as is: a negative scale's wrapped
        ls, lm = torch.clamp(ls, max=63), torch.clamp(lm, max=63)  # uint8 then spills into the high bits
    return _min_max_blocks(fmt, b, fp16_round(d_block), fp16_round(m_block), ls, lm, searched.reshape(-1, 256))


def _q2_k_imatrix(b: torch.Tensor, qw: torch.Tensor) -> QBlocks:
    # quantize_row_q2_K_impl: weights qw*sqrt(sigma2 + x^2) with sigma2 = mean(x^2) of the super-block,
    # make_qkx3_quants per 16 (squared error), then 4-bit scales and mins by make_qp_quants
    sb, nmax, rmin, rdelta, nstep, mad = KQUANT_IMPL_PARAMS[QuantFormat.Q2_K]
    x, w, sw = _impl_weights(b, qw, sb, twice=False)
    sc, mn, searched = _make_qkx2(x, w, nmax, rmin, rdelta, nstep, mad, levels=True)
    d_block, ls = _make_qp(sc.reshape(-1, 16), 15, sw)
    m_block, lm = _make_qp(mn.reshape(-1, 16), 15, sw)
    packed = (ls.to(torch.int32) | (lm.to(torch.int32) << 4)) & 0xFF  # y[i].scales[j] = Ls[j] | (Lm[j] << 4)
    return _q2_blocks(b, fp16_round(d_block), fp16_round(m_block), packed, searched.reshape(-1, 256))


def _q3_k_imatrix(b: torch.Tensor, qw: torch.Tensor) -> QBlocks:
    # quantize_row_q3_K_impl: weights qw*sqrt(sigma2 + x^2) with sigma2 = 2*mean(x^2) of the super-block,
    # make_qx_quants(16, 4, rmse_type 1) per sub-block, then the 16 scales by make_qx_quants(16, 32) weighted
    # by each sub-block's sum of weights; the 6-bit field holds l + 32 and decodes to l
    x, w, sw = _impl_weights(b, qw, 16, twice=True)
    sc, lsub = _make_qx(x, 4, w)
    d_block, lq = _make_qx(sc.reshape(-1, 16), 32, sw)
    d16 = fp16_round(d_block)
    dl = d16[:, None] * lq
    levels = _requant_sym(b, dl, -4, 3, (lsub + 4).reshape(-1, 256))
    return QBlocks(QuantFormat.Q3_K, d16, levels, scales=_pack_q3_k_scales((lq + 32).to(torch.int32)), sub_scale=dl)


def _min_max_k(b: torch.Tensor, fmt: QuantFormat, nsub: int) -> QBlocks:
    # quantize_row_q4_K_ref / q5_K_ref: weights av_x + |x|, 6-bit scales and mins against the super-block max
    sb, nmax, rmin, rdelta, nstep, mad = KQUANT_PARAMS[fmt]
    x = b.reshape(-1, sb)
    # sqrtf is correctly rounded; torch's CPU float32 sqrt is not always, float64 then float32 is
    av_x = torch.sqrt(sdiv(seq_sum(x * x), float(sb)).double()).float()
    sc, mn, searched = _make_qkx2(x, av_x[:, None] + x.abs(), nmax, rmin, rdelta, nstep, mad, levels=True)
    sc, mn = sc.reshape(-1, nsub), mn.reshape(-1, nsub)
    # `float max_min = 0; if (min > max_min) ...`: +0 unless one is positive (a flat block's min is -0.0)
    max_scale, max_min = sc.amax(dim=1), mn.amax(dim=1)
    max_scale = torch.where(max_scale > 0, max_scale, torch.zeros_like(max_scale))
    max_min = torch.where(max_min > 0, max_min, torch.zeros_like(max_min))
    inv_s = torch.where(max_scale > 0, rdiv(63.0, torch.where(max_scale > 0, max_scale, torch.ones_like(max_scale))), torch.zeros_like(max_scale))
    inv_m = torch.where(max_min > 0, rdiv(63.0, torch.where(max_min > 0, max_min, torch.ones_like(max_min))), torch.zeros_like(max_min))
    # `uint8_t ls = nearest_int(...); ls = MIN(63, ls);` (the uint8 cast wraps negatives)
    ls = torch.clamp(torch.remainder(nearest_int(inv_s[:, None] * sc), 256), max=63)
    lm = torch.clamp(torch.remainder(nearest_int(inv_m[:, None] * mn), 256), max=63)
    d16, m16 = fp16_round(sdiv(max_scale, 63.0)), fp16_round(sdiv(max_min, 63.0))
    return _min_max_blocks(fmt, b, d16, m16, ls, lm, searched.reshape(-1, 256))


def _q2_k(b: torch.Tensor) -> QBlocks:
    # quantize_row_q2_K_ref: weights |x|, mean absolute deviation, 4-bit scales and mins
    sb, nmax, rmin, rdelta, nstep, mad = KQUANT_PARAMS[QuantFormat.Q2_K]
    x = b.reshape(-1, sb)
    sc, mn, searched = _make_qkx2(x, x.abs(), nmax, rmin, rdelta, nstep, mad, levels=True)
    sc, mn = sc.reshape(-1, 16), mn.reshape(-1, 16)
    max_scale = torch.clamp(sc.amax(dim=1), min=0.0)
    max_min = torch.clamp(mn.amax(dim=1), min=0.0)
    has_s, has_m = max_scale > 0, max_min > 0
    ls = nearest_int(rdiv(15.0, torch.where(has_s, max_scale, torch.ones_like(max_scale)))[:, None] * sc)
    lm = nearest_int(rdiv(15.0, torch.where(has_m, max_min, torch.ones_like(max_min)))[:, None] * mn)
    ls = torch.where(has_s[:, None], ls, torch.zeros_like(ls)).to(torch.int32) & 0xFF
    lm = torch.where(has_m[:, None], lm, torch.zeros_like(lm)).to(torch.int32)
    packed = (ls | (lm << 4)) & 0xFF  # y[i].scales[j] = l; y[i].scales[j] |= (l << 4);
    d16 = torch.where(has_s, fp16_round(sdiv(max_scale, 15.0)), torch.zeros_like(max_scale))
    m16 = torch.where(has_m, fp16_round(sdiv(max_min, 15.0)), torch.zeros_like(max_min))
    return _q2_blocks(b, d16, m16, packed, searched.reshape(-1, 256))


def _q3_k(b: torch.Tensor) -> QBlocks:
    # quantize_row_q3_K_ref: make_q3_quants per 16, 6-bit signed scales against the largest-|.| scale
    sc, lsub = _make_q3(b.reshape(-1, 16), 4)
    sc = sc.reshape(-1, 16)
    max_scale, _ = first_absmax(sc)
    has = max_scale != 0
    iscale = rdiv(-32.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    lq = torch.clamp(nearest_int(iscale[:, None] * sc), -32, 31)
    lq = torch.where(has[:, None], lq, torch.full_like(lq, -32.0))  # memset(scales, 0) decodes to -32
    d16 = torch.where(has, fp16_round(rdiv(1.0, iscale)), torch.zeros_like(iscale))
    dl = d16[:, None] * lq
    levels = _requant_sym(b, dl, -4, 3, lsub.reshape(-1, 256))
    return QBlocks(QuantFormat.Q3_K, d16, levels, scales=_pack_q3_k_scales((lq + 32).to(torch.int32)), sub_scale=dl)


def _q6_k(b: torch.Tensor, qw: torch.Tensor | None = None) -> QBlocks:
    # quantize_row_q6_K_ref: make_qx_quants(16, 32, rmse_type 1), 8-bit scales against the largest-|.| one;
    # quantize_row_q6_K_impl is the same with the importance weights in the search
    sc, lsub = _make_qx(b.reshape(-1, 16), 32, None if qw is None else qw.reshape(-1, 16))
    sc = sc.reshape(-1, 16)
    max_scale, max_abs = first_absmax(sc)
    has = max_abs >= GROUP_MAX_EPS
    iscale = rdiv(-128.0, torch.where(has, max_scale, torch.ones_like(max_scale)))
    lq = torch.where(has[:, None], torch.clamp(nearest_int(iscale[:, None] * sc), max=127), torch.zeros_like(sc))
    d16 = torch.where(has, fp16_round(rdiv(1.0, iscale)), torch.zeros_like(iscale))
    dl = d16[:, None] * lq
    levels = _requant_sym(b, dl, -32, 31, (lsub + 32).reshape(-1, 256))
    levels = torch.where(has[:, None], levels, torch.zeros_like(levels))  # `memset(&y[i], 0, ...)`: a dead block
    return QBlocks(QuantFormat.Q6_K, d16, levels, scales=lq.to(torch.int32) & 0xFF, sub_scale=dl)


def k_blocks(blocks: torch.Tensor, fmt: QuantFormat) -> QBlocks:
    """Quantize super-blocks ``[n_blocks, 256]`` (float32) as ``quantize_row_<fmt>_ref``: the blocks' fields.

    Args:
        blocks: ``[n_blocks, 256]`` float32 tensor.
        fmt: Q2_K, Q3_K, Q4_K, Q5_K or Q6_K.

    Returns:
        :class:`~dq.kernels.ref_quant.QBlocks` with ``d``, ``dmin``, ``scales`` (``y.scales`` bytes), the
        per-sub-block dequant scales and every weight's stored level.
    """
    if fmt is QuantFormat.Q2_K:
        return _q2_k(blocks)
    if fmt is QuantFormat.Q3_K:
        return _q3_k(blocks)
    if fmt in (QuantFormat.Q4_K, QuantFormat.Q5_K):
        return _min_max_k(blocks, fmt, 8)
    if fmt is QuantFormat.Q6_K:
        return _q6_k(blocks)
    raise ValueError(f"{fmt} is not a K-quant with a reference port")


def fake_quant_k(blocks: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Fake-quantize super-blocks ``[n_blocks, 256]`` (float32) as ``quantize_row_<fmt>_ref`` then dequant.

    Args:
        blocks: ``[n_blocks, 256]`` float32 tensor.
        fmt: Q2_K, Q3_K, Q4_K, Q5_K or Q6_K.

    Returns:
        float32 ``[n_blocks, 256]``, bit-exact with libggml.
    """
    return k_blocks(blocks, fmt).dequantize()


def legacy_blocks_imatrix(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor) -> QBlocks:
    """``quantize_row_q{4,5}_{0,1}_impl`` on rows ``[rows, n]`` with an ``[n]`` imatrix: the 32-weight blocks' fields.

    The weights are ``qw*sqrt(sigma2 + x^2)`` with ``sigma2`` the mean of x^2 over the *whole row* (summed in
    order); Q4_0/Q5_0 search with make_qx_quants (rmse_type 1), Q4_1/Q5_1 with make_qkx3_quants, and the
    search's own levels are stored (no re-rounding against the fp16 scale).

    Returns:
        :class:`~dq.kernels.ref_quant.QBlocks` of the ``rows * n / 32`` blocks, in row order.
    """
    rows, n = x.shape
    sigma2 = sdiv(seq_sum(x * x), float(n))
    xb = x.reshape(-1, 32)
    qw = imatrix.to(device=x.device, dtype=torch.float32).reshape(1, n).expand(rows, n).reshape(-1, 32)
    w = qw * _sqrt_rn(sigma2.repeat_interleave(n // 32)[:, None] + xb * xb)
    if fmt in (QuantFormat.Q4_0, QuantFormat.Q5_0):
        nmax = 8 if fmt is QuantFormat.Q4_0 else 16
        scale, lv = _make_qx(xb, nmax, w)  # L = l + nmax; an all-zero block stores L = 0
        return QBlocks(fmt, fp16_round(scale), (lv + nmax).to(torch.int32))
    if fmt in (QuantFormat.Q4_1, QuantFormat.Q5_1):
        _, nmax, rmin, rdelta, nstep, mad = KQUANT_IMPL_PARAMS[fmt]
        scale, the_min, lv = _make_qkx2(xb, w, nmax, rmin, rdelta, nstep, mad, levels=True)
        return QBlocks(fmt, fp16_round(scale), lv.to(torch.int32), dmin=fp16_round(-the_min))
    raise ValueError(f"{fmt} is not a legacy type with an imatrix port")


def fake_quant_legacy_imatrix(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor) -> torch.Tensor:
    """:func:`legacy_blocks_imatrix` dequantized: float32 ``[rows, n]``, bit-exact with libggml's round trip."""
    return legacy_blocks_imatrix(x, fmt, imatrix).dequantize().reshape(x.shape)


def k_blocks_imatrix(blocks: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor) -> QBlocks:
    """Quantize super-blocks as libggml does *with* an imatrix (``quantize_row_<fmt>_impl``): the blocks' fields.

    Args:
        blocks: ``[n_blocks, 256]`` float32, consecutive blocks of whole rows.
        fmt: one of :data:`IMATRIX_K_FORMATS`.
        imatrix: ``[n_per_row]`` importance weights (row length a multiple of 256).

    Returns:
        :class:`~dq.kernels.ref_quant.QBlocks`, as :func:`k_blocks`.
    """
    per_row = imatrix.numel() // 256
    qw = imatrix.to(device=blocks.device, dtype=torch.float32).reshape(1, per_row, 256)
    qw = qw.expand(blocks.shape[0] // per_row, per_row, 256).reshape(-1, 256)
    if fmt is QuantFormat.Q2_K:
        return _q2_k_imatrix(blocks, qw)
    if fmt is QuantFormat.Q3_K:
        return _q3_k_imatrix(blocks, qw)
    if fmt in (QuantFormat.Q4_K, QuantFormat.Q5_K):
        return _min_max_k_imatrix(blocks, fmt, qw)
    if fmt is QuantFormat.Q6_K:
        return _q6_k(blocks, qw)
    raise ValueError(f"no imatrix-aware port of {fmt}; ported: {[f.value for f in IMATRIX_K_FORMATS]}")


def fake_quant_k_imatrix(blocks: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor) -> torch.Tensor:
    """Fake-quantize super-blocks as libggml does *with* an imatrix (``quantize_row_<fmt>_impl``).

    Args:
        blocks: ``[n_blocks, 256]`` float32, consecutive blocks of whole rows.
        fmt: one of :data:`IMATRIX_K_FORMATS`.
        imatrix: ``[n_per_row]`` importance weights (row length a multiple of 256).

    Returns:
        float32 ``[n_blocks, 256]``, bit-exact with ``libggml.quantize(w, fmt, imatrix)``.
    """
    return k_blocks_imatrix(blocks, fmt, imatrix).dequantize()
