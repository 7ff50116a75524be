"""Torch port of ggml's lattice quantizers IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS and IQ3_S (``quantize_row_iq2_xxs_impl`` etc.).

These types store groups of weights (8 for IQ2, 4 for IQ3) as an index into a grid of vectors whose
entries are odd levels ``q = 2l + 1`` (``l`` in 0..2 for IQ2, 0..7 for IQ3), plus sign bits (7 per 8
weights, the 8th making the parity even; IQ2_S stores all 8) and a 4-bit block scale under one fp16 scale
per 256 weights. IQ2_XXS: a 256-point grid, one scale per 32 weights; IQ2_XS: 512 points, one scale per 16;
IQ2_S: 1024 points, one scale per 16; IQ3_XXS: 256 points of 4 levels, one scale per 32; IQ3_S: 512 points of
4 levels, 8 stored sign bits per 8 weights, one scale per 32. The C search, per
block:

1. weights ``qw * sqrt(c * sum(x^2)/256 + x^2)`` (``c`` = 1, or 2 for IQ2_S, IQ3_XXS and IQ3_S;
   IQ3_S without an imatrix: ``x^2``); signs split off
   (``xval = |x|``), and, with parity, when 8 weights have an odd number of negatives the one of smallest
   ``w x^2`` keeps its sign flipped (its ``xval`` is negative);
2. trial inverse scales (IQ2_XXS: 13 around ``make_qp_quants``'s scale; IQ2_XS and IQ2_S: 19 around
   ``max/5``; IQ3_XXS: 31 around ``max/15``; IQ3_S: 19 around ``max/15``); for each, every group is rounded to levels, and a point off the grid is
   replaced by the best of its precomputed grid neighbours (weighted distance at the trial scale); the
   least-squares refit with the largest ``sumqx^2/sumq2`` wins;
3. a re-rounding at the chosen scale (IQ2_XXS: every group; IQ3_S: every group when one was off the
   grid; the others: the groups that were off the grid), a refit, and the block scales rounded to 4 bits against ``max_scale/31``.

The neighbour lists are built as ``iq2xs_init_impl``/``iq3xs_init_impl`` build them: for each off-grid
point, the grid points at the two smallest squared distances (one for IQ2_S, three for IQ3_S), ordered by (distance, index). Every decision here is taken on the
same float32 value as in libggml: products in C order without FMA, IEEE division (``rdiv``/``sdiv``),
sequential sums, first-minimum ties. :func:`quantize_iqgrid` returns the GGUF blocks themselves, so
``tests/kernels/test_ref_iqgrid.py`` compares bytes with ``ggml_quantize_chunk``; it runs on any torch device,
which is how ``dq analyze --device cuda`` measures these types on the GPU.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from dq.kernels.ref_dequant import dequantize_blocks, iq_grid
from dq.kernels.ref_quant import nearest_int, rdiv, sdiv, seq_kernels_on, seq_sum
from dq.quant.formats import FORMATS, QuantFormat

__all__ = ["GRID_FORMATS", "quantize_iqgrid", "fake_quant_iqgrid", "lattice_tables", "tables_on"]

QK_K = 256
_WIDTHS = (8, 16, 32, 64, 128, 512)  # neighbour-list buckets (the longest list, IQ2_XS's, has 292 entries)
# weights x trial scales per pass (the trials make [blocks, trials, weights] temporaries): larger on a GPU,
# where each pass costs a few thousand small kernel launches
_CHUNK_ELEMENTS = {"cpu": 1 << 24, "cuda": 1 << 27}


@dataclass(frozen=True)
class _Spec:
    """What differs between the three C functions."""

    group: int  # weights per grid point
    bits: int  # bits per level in a packed point (kmap index)
    kmax_q: int  # levels 0 .. kmax_q-1 are rounded to
    kmap_size: int
    block: int  # weights per 4-bit scale
    trials: tuple[int, ...]  # `is` of the trial inverse scales (2*kMaxQ-1 + is*step)/max
    step: float
    start_qp: bool  # first scale from make_qp_quants (IQ2_XXS) or max/(2*kMaxQ-1)
    redo_all: bool  # re-round every group at the chosen scale (IQ2_XXS) or only those off the grid
    eps: float  # GROUP_MAX_EPS of the type
    sigma_mul: float  # sigma2 = sigma_mul * sum(x^2) / QK_K
    d_fudge: float  # the stored super-block scale is fp16(d * d_fudge)
    parity: bool = True  # 7 stored sign bits per 8 weights, even parity (IQ2_S stores all 8)
    nwant: int = 2  # distinct distances in a neighbour list (iq2xs_init_impl: 1 for IQ2_S; IQ3_S: 3)
    requant_all_groups: bool = False  # IQ3_S: when any group was off the grid, re-round all of them


_SPECS = {
    QuantFormat.IQ2_XXS: _Spec(8, 2, 3, 43692, 32, tuple(range(-6, 7)), 0.1, True, True, 1e-15, 1.0, 1.0),
    QuantFormat.IQ2_XS: _Spec(8, 2, 3, 43692, 16, tuple(range(-9, 10)), 0.1, False, False, 1e-15, 1.0, 1.0),
    QuantFormat.IQ3_XXS: _Spec(4, 3, 8, 4096, 32, tuple(range(-15, 16)), 0.2, False, False, 1e-8, 2.0, 1.0125),
    QuantFormat.IQ2_S: _Spec(8, 2, 3, 43692, 16, tuple(range(-9, 10)), 0.1, False, False, 1e-8, 2.0, 0.9875,
                             parity=False, nwant=1),
    # IQ3_S: `if (!max)` is its only dead-block test (eps 0); 512 grid points, 8 stored sign bits
    QuantFormat.IQ3_S: _Spec(4, 3, 8, 4096, 32, tuple(range(-9, 10)), 0.2, False, False, 0.0, 2.0, 1.033,
                             parity=False, nwant=3, requant_all_groups=True),
}
GRID_FORMATS = tuple(_SPECS)


def _f32(v: float) -> float:
    """``v`` rounded to float32 (a C ``float`` constant such as ``0.1f``)."""
    return float(np.float32(v))


@dataclass(frozen=True, eq=False)  # hashed by identity: device copies are cached per table
class _Tables:
    levels: torch.Tensor  # int32 [G, group]: grid point levels l (q = 2l + 1)
    q: torch.Tensor  # float32 [G, group]: 2l + 1
    kmap: torch.Tensor  # int64 [kmap_size]: grid index of a packed point, -1 off the grid
    neighbours: torch.Tensor  # int64 [kmap_size, n_max]: ordered neighbour lists, padded with -1
    counts: torch.Tensor  # int64 [kmap_size]: list lengths
    shifts: torch.Tensor  # int32 [group]: bit position of each level in a packed point


@functools.cache
def lattice_tables(fmt: QuantFormat, group: int, bits: int, n_levels: int, kmap_size: int, nwant: int) -> _Tables:
    """Grid, packed-point map and neighbour lists of a lattice type, as ``iq2xs_init_impl`` builds them.

    Args:
        fmt: the type whose grid (gguf-py's dequant table) is used.
        group: weights per grid point; bits: bits per level in a packed point; n_levels: levels the
            quantizer rounds to (only points made of them get neighbour lists); kmap_size: size of C's map;
            nwant: distinct squared distances a neighbour list spans.
    """
    grid = iq_grid(fmt)  # dequant values, one per level (8, 25, 43 for IQ2's levels 0, 1, 2)
    levels = torch.searchsorted(torch.unique(grid), grid).int()
    shifts = bits * torch.arange(group, dtype=torch.int32)
    kmap = torch.full((kmap_size,), -1, dtype=torch.int64)
    kmap[(levels << shifts).sum(1).long()] = torch.arange(grid.shape[0])
    # neighbours of the packed points the search can reach (C lists every point): the grid points at its
    # nwant smallest squared distances, ordered by (distance, index) as C's qsort
    pl = (torch.arange(kmap_size, dtype=torch.int32)[:, None] >> shifts) & ((1 << bits) - 1)  # [K, group]
    reach = (pl < n_levels).all(1) & (kmap < 0)
    pos = 2 * pl[reach] + 1
    gq = 2 * levels + 1
    d2 = torch.zeros((pos.shape[0], gq.shape[0]), dtype=torch.int32)
    for i in range(group):
        d2 += ((pos[:, i : i + 1] - gq[None, :, i]) ** 2).int()
    d2s, order = torch.sort(d2, dim=1, stable=True)
    rank = torch.cat([torch.zeros_like(d2s[:, :1]), (d2s[:, 1:] > d2s[:, :-1]).int()], 1).cumsum(1)
    keep = rank < nwant
    n_max = int(keep.sum(1).max())
    nb = torch.full((kmap_size, n_max), -1, dtype=torch.int64)
    nb[reach] = torch.where(keep[:, :n_max], order[:, :n_max], torch.full_like(order[:, :n_max], -1))
    counts = torch.zeros(kmap_size, dtype=torch.int64)
    counts[reach] = keep.sum(1).long()
    return _Tables(levels, gq.float(), kmap, nb, counts, shifts)


def _tables_cpu(fmt: QuantFormat) -> _Tables:
    sp = _SPECS[fmt]
    return lattice_tables(fmt, sp.group, sp.bits, sp.kmax_q, sp.kmap_size, sp.nwant)


def tables_on(t: _Tables, device: torch.device) -> _Tables:
    """``t`` on ``device`` (moved once per table and device)."""
    return t if device.type == "cpu" else _tables_moved(t, str(device))


@functools.cache
def _tables_moved(t: _Tables, device: str) -> _Tables:
    return _Tables(*(x.to(device) for x in (t.levels, t.q, t.kmap, t.neighbours, t.counts, t.shifts)))


def _tables(fmt: QuantFormat, device: torch.device) -> _Tables:
    return tables_on(_tables_cpu(fmt), device)


def _best_neighbour(tab: _Tables, u: torch.Tensor, xv: torch.Tensor, wa: torch.Tensor, scale: torch.Tensor):
    """``iq2_find_best_neighbour`` for groups ``[N]``: the neighbour of ``u`` nearest ``xv`` at ``scale``."""
    width = int(tab.counts[u].max())  # lists are short for most points (median 6-7), padded to the longest
    nb = tab.neighbours[u][:, :width]
    g = nb.clamp(min=0)
    d2 = torch.zeros(nb.shape, dtype=torch.float32, device=nb.device)
    for i in range(xv.shape[1]):  # `d2 += weight[i]*diff*diff`, one coordinate at a time: [N, n] temporaries
        diff = scale[:, None] * tab.q[:, i][g] - xv[:, i : i + 1]
        d2 = d2 + wa[:, i : i + 1] * diff * diff
    d2 = torch.where(nb >= 0, d2, torch.full_like(d2, float("inf")))
    return nb.gather(1, d2.argmin(1, keepdim=True)).squeeze(1)  # argmin: first minimum, as `d2 < best_d2`


def _snap(tab: _Tables, lv: torch.Tensor, src: torch.Tensor | None, xg: torch.Tensor, wg: torch.Tensor,
          scale: torch.Tensor):
    """Grid index of each group of levels ``lv`` ``[N, group]``, off-grid points moved to their best neighbour.

    ``src`` maps each group to its row of ``xg``/``wg`` (the group's ``xval`` and ``sqrt(weight)``; None: row
    ``i``), ``scale`` ``[N]`` is the scale the neighbours are compared at. Returns ``(grid index [N], on_grid [N])``.
    """
    u = (lv << tab.shifts).sum(1)
    gi = tab.kmap[u]
    off = gi < 0
    if bool(off.any()):
        gi = gi.clone()
        if seq_kernels_on(xg):  # one lane per off-grid point, each scanning its own list
            from dq.kernels._triton_lattice import best_neighbour_triton

            idx = off.nonzero().squeeze(1)
            rows = idx if src is None else src[idx]
            gi[idx] = best_neighbour_triton(tab.neighbours, tab.counts, tab.q, u[idx], xg[rows], wg[rows], scale[idx])
            return gi, ~off
        counts = tab.counts[u]
        lo = 0
        for hi in _WIDTHS:  # searched in buckets of list length, so a few long lists do not pad them all
            sel = off & (counts > lo) & (counts <= hi)
            lo = hi
            idx = sel.nonzero().squeeze(1)
            if idx.numel():
                rows = idx if src is None else src[idx]
                gi[idx] = _best_neighbour(tab, u[idx], xg[rows], wg[rows], scale[idx])
    return gi, ~off


def _refit(w: torch.Tensor, xval: torch.Tensor, lv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sumqx``, ``sumq2`` over a block, ``q = 2L + 1``, in C order."""
    q = (2 * lv + 1).float()
    return seq_sum(w * xval * q), seq_sum(w * q * q)


def _make_qp_quants(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """``make_qp_quants(n, nmax, x, L, w)`` for blocks ``[B, n]``: its returned scale (L is not used after).

    ``L`` is a ``uint8`` array in C and ``x`` may hold one negative value (a flipped sign), so rounded levels
    are stored modulo 256 and read back that way, as the C code does. On CUDA with Triton the same loops run
    as one kernel, a lane per block (:func:`dq.kernels._triton_lattice.make_qp_scale_triton`).
    """
    if seq_kernels_on(x):
        from dq.kernels._triton_lattice import make_qp_scale_triton

        return make_qp_scale_triton(x, w, nmax)
    mx = x.amax(1)
    mx = torch.where(mx > 0, mx, torch.zeros_like(mx))  # `max = 0; max = MAX(max, x[i])`
    safe = torch.where(mx > 0, mx, torch.ones_like(mx))
    iscale = rdiv(float(nmax), safe)
    stored = nearest_int(iscale[:, None] * x).long() & 255
    scale = rdiv(1.0, iscale)
    diff = x - scale[:, None] * stored.float()
    best_mse = seq_sum(w * diff * diff)
    for is_ in (-4, -3, -2, -1, 1, 2, 3, 4):
        iscale_is = rdiv(_f32(_f32(0.1) * is_ + nmax), safe)  # (0.1f*is + nmax)/max
        scale_is = rdiv(1.0, iscale_is)
        lv = nearest_int(iscale_is[:, None] * x).clamp(max=nmax)
        diff = x - scale_is[:, None] * lv
        mse = seq_sum(w * diff * diff)
        better = mse < best_mse
        best_mse = torch.where(better, mse, best_mse)
        iscale = torch.where(better, iscale_is, iscale)
    lv = nearest_int(iscale[:, None] * x).clamp(max=nmax)
    stored = lv.long() & 255
    sumlx = seq_sum(w * x * lv)
    suml2 = seq_sum(w * lv * lv)
    active = torch.ones_like(sumlx, dtype=torch.bool)
    for _ in range(5):
        changed = torch.zeros_like(active)
        for i in range(x.shape[1]):
            wi, xi, li = w[:, i], x[:, i], stored[:, i].float()
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = active & (slx > 0) & (sl2 > 0)
            new_l = nearest_int(xi * sl2 / torch.where(ok, slx, torch.ones_like(slx))).clamp(max=nmax)
            ok = ok & (new_l != li)
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = ok & (slx * slx * suml2 > sumlx * sumlx * sl2)
            stored[:, i] = torch.where(take, new_l.long() & 255, stored[:, i])
            sumlx = torch.where(take, slx, sumlx)
            suml2 = torch.where(take, sl2, suml2)
            changed |= take
        active = active & changed
        if not bool(active.any()):
            break
    pos = suml2 > 0
    return torch.where(pos, sumlx / torch.where(pos, suml2, torch.ones_like(suml2)), torch.zeros_like(sumlx))


def _signs(xb: torch.Tensor, weight: torch.Tensor, parity: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """``xval`` and the stored sign bits of each 8 weights of blocks ``xb`` ``[B, n]`` (7 with ``parity``).

    Returns ``(xval [B, n], signs [B, n/8])``.
    """
    b, n = xb.shape
    neg = (xb < 0).reshape(b, n // 8, 8)
    xval = torch.where(xb < 0, -xb, xb).reshape(b, n // 8, 8)
    lane = torch.arange(8, device=xb.device)
    s = (neg.long() << lane).sum(-1)
    if not parity:
        return xval.reshape(b, n), s
    odd = neg.sum(-1) % 2 == 1
    imin = (weight * xb * xb).reshape(b, n // 8, 8).argmin(-1)  # first minimum, as `ax < min`
    xval = torch.where(odd[..., None] & (lane == imin[..., None]), -xval, xval)
    s = torch.where(odd, s ^ (1 << imin), s)
    return xval.reshape(b, n), s & 127


def _quantize_blocks(xb: torch.Tensor, weight: torch.Tensor, sp: _Spec, tab: _Tables):
    """Steps 1-2 on blocks ``[B, n]``: ``(scale [B], grid index [B, n/group], signs [B, n/8])``.

    Every trial scale is rounded and snapped to the grid at once (a trial dimension ``T``); only the choice
    among them, which depends on the running best, is a loop over trials in C order.
    """
    b, n = xb.shape
    ng = n // sp.group
    dev = xb.device
    waux = torch.sqrt(weight.double()).float()
    xval, signs = _signs(xb, weight, sp.parity)
    mx = xval.amax(1)
    dead = (mx < sp.eps) | (mx == 0)
    xg, wg = xval.reshape(-1, sp.group), waux.reshape(-1, sp.group)
    if sp.start_qp:
        scale = _make_qp_quants(xval, weight, sp.kmax_q + 1)
        eff_max = scale * sp.kmax_q
        dead = dead | (eff_max <= 0)
    else:
        eff_max = mx
        scale = sdiv(mx, float(2 * sp.kmax_q - 1))
    safe_max = torch.where(dead, torch.ones_like(eff_max), eff_max)
    nums = torch.tensor([_f32(2 * sp.kmax_q - 1 + _f32(t * _f32(sp.step))) for t in sp.trials], device=dev)
    id_ = torch.div(nums[None, :], safe_max[:, None])  # [B, T]: (2*kMaxQ-1+is*step)/max, IEEE division
    nt = nums.numel()
    lv = nearest_int(0.5 * (id_[:, :, None] * xval[:, None, :] - 1.0)).clamp(0, sp.kmax_q - 1).int()
    src = (torch.arange(b, device=dev)[:, None, None] * ng + torch.arange(ng, device=dev)).expand(b, nt, ng)
    this_scale = rdiv(1.0, id_)[:, :, None].expand(b, nt, ng)
    gi, on = _snap(tab, lv.reshape(-1, sp.group), src.reshape(-1), xg, wg, this_scale.reshape(-1))
    lv = tab.levels[gi].reshape(b, nt, n)
    on = on.reshape(b, nt, ng)
    sumqx, sumq2 = _refit(weight[:, None, :], xval[:, None, :], lv)  # [B, T]
    best = torch.zeros_like(scale)
    best_t = torch.full((b,), -1, dtype=torch.int64, device=dev)
    for t in range(nt):  # `if (sumq2 > 0 && sumqx*sumqx > best*sumq2)`, trials in order
        qx, q2 = sumqx[:, t], sumq2[:, t]
        take = ~dead & (q2 > 0) & (qx * qx > best * q2)
        scale = torch.where(take, qx / torch.where(take, q2, torch.ones_like(q2)), scale)
        best = torch.where(take, scale * qx, best)
        best_t = torch.where(take, t, best_t)
    picked = best_t >= 0
    bt = best_t.clamp(min=0)
    lv_best = torch.where(picked[:, None], lv[torch.arange(b, device=dev), bt], torch.zeros_like(lv[:, 0]))
    on_best = torch.where(picked[:, None], on[torch.arange(b, device=dev), bt], torch.ones_like(on[:, 0]))
    redo = ~dead & (scale > 0)
    if not sp.redo_all:
        redo = redo & ~on_best.all(1)
    id_ = rdiv(1.0, torch.where(redo, scale, torch.ones_like(scale)))
    lv = nearest_int(0.5 * (id_[:, None] * xval - 1.0)).clamp(0, sp.kmax_q - 1).int()
    gi, _ = _snap(tab, lv.reshape(-1, sp.group), None, xg, wg, scale.repeat_interleave(ng))
    lv = tab.levels[gi].reshape(b, n)
    if not (sp.redo_all or sp.requant_all_groups):  # groups that were on the grid keep the winning trial's levels
        lv = torch.where(on_best.repeat_interleave(sp.group, 1), lv_best, lv)
    lv = torch.where(redo[:, None], lv, lv_best)
    sumqx, sumq2 = _refit(weight, xval, lv)
    refit = redo & (sumq2 > 0)
    scale = torch.where(refit, sumqx / torch.where(refit, sumq2, torch.ones_like(sumq2)), scale)
    neg = scale < 0  # "should never happen" in C: flip the scale and the signs
    scale = torch.where(neg, -scale, scale)
    signs = torch.where(neg[:, None], (~signs) & (127 if sp.parity else 255), signs)
    gi = tab.kmap[(lv.reshape(-1, sp.group) << tab.shifts).sum(1)].reshape(b, ng).clamp(min=0)
    zero = torch.zeros_like(gi)
    return (torch.where(dead, torch.zeros_like(scale), scale), torch.where(dead[:, None], zero, gi),
            torch.where(dead[:, None], torch.zeros_like(signs), signs))


def _le_bytes(words: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Little-endian bytes of integer ``words`` ``[S, k]`` as ``[S, k * nbytes]``."""
    return torch.stack([(words >> (8 * i)) & 255 for i in range(nbytes)], -1).reshape(words.shape[0], -1)


def _pack(fmt: QuantFormat, d: torch.Tensor, gi: torch.Tensor, signs: torch.Tensor, ls: torch.Tensor,
          dead: torch.Tensor):
    """GGUF blocks ``[S, type_size]`` from per-super-block ``d``, grid indices, signs and 4-bit scales
    (``dead``: the blocks with no non-zero weight, for IQ3_S's packing)."""
    s = d.shape[0]
    dev = d.device
    head = _le_bytes(d.to(torch.float16).view(torch.int16).long()[:, None] & 0xFFFF, 2)
    if fmt in (QuantFormat.IQ2_XXS, QuantFormat.IQ3_XXS):  # four 7-bit sign groups per 32 weights
        sign_words = (signs.reshape(s, 8, 4) << torch.tensor([0, 7, 14, 21], device=dev)).sum(-1)
    if fmt is QuantFormat.IQ2_XXS:  # per 32 weights: uint32 of 4 grid bytes, uint32 of signs | scale << 28
        w0 = (gi.reshape(s, 8, 4) << torch.tensor([0, 8, 16, 24], device=dev)).sum(-1)
        body = _le_bytes(torch.stack([w0, sign_words | (ls << 28)], -1).reshape(s, 16), 4)
    elif fmt is QuantFormat.IQ2_XS:  # uint16 grid index | signs << 9 per 8 weights, then nibble scales
        body = torch.cat([_le_bytes((gi | (signs << 9)).reshape(s, 32), 2),
                          ls.reshape(s, 8, 2)[..., 0] | (ls.reshape(s, 8, 2)[..., 1] << 4)], 1)
    elif fmt is QuantFormat.IQ3_XXS:  # 64 grid bytes, then per 32 weights a uint32 of signs | scale << 28
        body = torch.cat([gi.reshape(s, 64), _le_bytes(sign_words | (ls << 28), 4)], 1)
    elif fmt is QuantFormat.IQ3_S:  # 64 low grid bytes, their 9th bits, 32 sign bytes, nibble scales per 32
        qh = ((gi >> 8).reshape(s, 8, 8) << torch.arange(8, device=dev)).sum(-1)
        # C's `if (!max) continue;` also skips `qs += bs4; signs += bs8;`: the next blocks' grid bytes and signs
        # move up into a dead block's place (qh and the scales are indexed by block): live blocks first, in order
        order = torch.sort(dead.reshape(s, 8).int(), dim=1, stable=True).indices
        low = (gi.reshape(s, 8, 8) & 255).gather(1, order[:, :, None].expand(-1, -1, 8))
        signs = signs.reshape(s, 8, 4).gather(1, order[:, :, None].expand(-1, -1, 4))
        body = torch.cat([low.reshape(s, 64), qh, signs.reshape(s, 32),
                          ls.reshape(s, 4, 2)[..., 0] | (ls.reshape(s, 4, 2)[..., 1] << 4)], 1)
    else:  # IQ2_S: 32 low grid bytes, 32 sign bytes, the grid indices' 2 high bits, nibble scales
        gi = gi.reshape(s, 32)
        qh = ((gi >> 8).reshape(s, 8, 4) << torch.tensor([0, 2, 4, 6], device=dev)).sum(-1)
        body = torch.cat([gi & 255, signs.reshape(s, 32), qh,
                          ls.reshape(s, 8, 2)[..., 0] | (ls.reshape(s, 8, 2)[..., 1] << 4)], 1)
    return torch.cat([head, body], 1).to(torch.uint8)


def _quantize_rows(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None) -> torch.Tensor:
    sp = _SPECS[fmt]
    tab = _tables(fmt, x.device)
    n = x.shape[1]
    sup = x.reshape(-1, QK_K)
    if imatrix is None:  # C's no-imatrix weights (IQ3_S only: llama.cpp requires an imatrix for the others)
        weight = sup * sup
    else:
        sigma2 = sdiv(seq_sum(sup * sup) * sp.sigma_mul, float(QK_K))
        qw = imatrix.to(device=x.device, dtype=torch.float32).reshape(1, n).expand(x.shape[0], -1).reshape(-1, QK_K)
        weight = qw * torch.sqrt((sigma2[:, None] + sup * sup).double()).float()
    scale, gi, signs = _quantize_blocks(sup.reshape(-1, sp.block), weight.reshape(-1, sp.block), sp, tab)
    scales = scale.reshape(-1, QK_K // sp.block)
    max_scale = scales.amax(1)
    live = max_scale > 0  # `if (!max_scale)`: an all-zero super-block, d = 0 and no bits
    d = sdiv(max_scale, 31.0)
    id_ = rdiv(1.0, torch.where(live, d, torch.ones_like(d)))
    ls = nearest_int(0.5 * (id_[:, None] * scales - 1.0)).clamp(0, 15).long()
    ns = scales.shape[0]

    def alive(t):
        t = t.reshape(ns, -1)
        return torch.where(live[:, None], t, torch.zeros_like(t))

    stored_d = torch.where(live, d * _f32(sp.d_fudge), torch.zeros_like(d))  # `d * 1.0125f` for IQ3_XXS etc.
    dead = sup.reshape(-1, sp.block).abs().amax(1) == 0
    return _pack(fmt, stored_d, alive(gi), alive(signs), alive(ls), dead)


def quantize_iqgrid(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize ``x`` ``[rows, n]`` to IQ2_XXS / IQ2_XS / IQ2_S / IQ3_XXS / IQ3_S blocks, as ``ggml_quantize_chunk`` would.

    Args:
        x: float32 ``[rows, n]``, ``n`` a multiple of 256.
        fmt: one of :data:`GRID_FORMATS`.
        imatrix: ``[n]`` importance weights, or None: uniform ones for the types llama.cpp quantizes only with
            an imatrix (as ``dq`` does), C's own ``x^2`` weights for IQ3_S, which libggml quantizes without.

    Returns:
        uint8 ``[rows * n / 256, type_size]`` on ``x.device``: the tensor's GGUF payload.
    """
    if fmt not in _SPECS:
        raise ValueError(f"quantize_iqgrid handles {[f.value for f in GRID_FORMATS]}, not {fmt}")
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"row length {n} is not a multiple of {fmt}'s block size {QK_K}")
    x = x.to(torch.float32)
    if imatrix is not None:
        im = imatrix.reshape(-1)
    else:
        im = torch.ones(n, dtype=torch.float32, device=x.device) if FORMATS[fmt].needs_imatrix else None
    step = max(1, _CHUNK_ELEMENTS.get(x.device.type, 1 << 24) // (n * len(_SPECS[fmt].trials)))
    parts = [_quantize_rows(x[r : r + step], fmt, im) for r in range(0, rows, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def fake_quant_iqgrid(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``to_float(quantize_iqgrid(x))``: float32 ``[rows, n]``, bit-identical to libggml's round trip."""
    blocks = quantize_iqgrid(x, fmt, imatrix)
    assert blocks.shape[1] == FORMATS[fmt].type_size
    return dequantize_blocks(blocks, fmt).reshape(x.shape)
