"""Torch port of ggml's IQ1_S quantizer (``quantize_row_iq1_s_impl``): ternary grid points, shifted by ±1/8.

IQ1_S stores each 8 weights as one of 2048 grid points with entries in {-1, 0, 1}, shifted by ``+delta`` or
``-delta`` (``delta = 1/8``) per 32 weights, with a 3-bit block scale under one fp16 scale per 256. The C
search, per 32-weight block:

1. weights ``qw * sqrt(2 sum(x^2)/256 + x^2)``; the block's values sorted ascending;
2. every split of the sorted values into three runs (levels -1, 0, +1: 561 splits, each with shift
   ``+delta`` and ``-delta``) scored by its least-squares ``sumqx^2/sumq2`` from prefix sums; C keeps the last
   split that beat the running best (``sumqx*sumqx > best*sumq2``);
3. the levels of each 8 weights snapped to the grid (an off-grid point is replaced by the best of its
   neighbours, ``iq2xs_init_impl``'s lists for three distances), a refit if any moved, and the block scales
   rounded to 3 bits against ``max_scale/15``.

Step 2 is vectorised: all 1122 candidates' sums are formed in C's float order, and the sequential scan is
replayed only over the candidates whose score is within 1e-5 (relative, float64) of the best, in C order:
a candidate further below can never be accepted once one of those has been, and the first of them is always
accepted (rounding moves a float32 score by ~1e-7). Ties in the sort follow a stable sort (glibc's ``qsort``
is a merge sort here). ``tests/kernels/test_ref_iq1.py`` compares the bytes with ``ggml_quantize_chunk``.
"""

from __future__ import annotations

import torch

from dq.kernels.ref_dequant import dequantize_blocks
from dq.kernels.ref_iqgrid import lattice_tables, tables_on
from dq.kernels.ref_quant import nearest_int, rdiv, sdiv, seq_cumsum, seq_kernels_on, seq_sum
from dq.quant.formats import FORMATS, QuantFormat

__all__ = ["quantize_iq1_s", "fake_quant_iq1_s", "quantize_iq1_m", "fake_quant_iq1_m"]

QK_K = 256
_BLOCK = 32
_DELTA = 0.125  # IQ1S_DELTA, exact in float32
_EPS = 1e-12  # GROUP_MAX_EPS_IQ1_S
_NEAR = 1e-5  # relative score band replayed sequentially (float32 rounding is ~1e-7)
# IQ1_M: 16-weight blocks, a shift per 8; its constants (IQ1M_DELTA = 1/8) are exact in float32
_BLOCK_M = 16
_EPS_M = 1e-7  # GROUP_MAX_EPS_IQ1_M
_P2, _M2 = 1.0 + _DELTA, 1.0 - _DELTA  # x_p[2], x_m[2]
_CP1, _CP2 = (-1.0 + _DELTA) ** 2 - _DELTA**2, _DELTA**2 - (1.0 + _DELTA) ** 2  # x_p[0]^2 - x_p[1]^2, ...
_CM1, _CM2 = (-1.0 - _DELTA) ** 2 - _DELTA**2, _DELTA**2 - (1.0 - _DELTA) ** 2
_CHUNK_ELEMENTS = {"cpu": 1 << 16, "cuda": 1 << 21}  # weights per pass: 1122 candidates each 32 weights


def _candidates(block: int, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(i1, i2)`` of C's loops ``for i1 in 0..block: for i2 in i1..block``, as int64 vectors."""
    i1, i2 = torch.triu_indices(block + 1, block + 1, device=dev)  # row-major: i1 outer, i2 inner
    return i1, i2


def _replay(qx: torch.Tensor, q2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """C's scan ``if (q2 > 0 && qx*qx > best*q2) {scale = qx/q2; best = scale*qx;}`` over ``[B, C]`` candidates.

    Only the candidates within ``_NEAR`` of the best score are replayed in order (see the module docstring).
    Returns ``(scale [B], pick [B])``, ``pick`` the accepted candidate's column or -1 when none was.
    """
    b, c = qx.shape
    dev = qx.device
    valid = q2 > 0
    key = torch.where(valid, qx.double() ** 2 / torch.where(valid, q2, torch.ones_like(q2)).double(),
                      torch.full_like(qx, -1.0, dtype=torch.float64))
    top = key.amax(1, keepdim=True)
    near = valid & (key >= top * (1 - _NEAR))
    k = int(near.sum(1).max()) if b else 0
    # the first k near candidates of each block, in C order
    order = torch.where(near, torch.arange(c, device=dev), c).sort(1).values[:, :k]
    ok = order < c
    order = order.clamp(max=c - 1)
    cqx, cq2 = qx.gather(1, order), q2.gather(1, order)
    best = torch.full((b,), -torch.finfo(torch.float32).max, device=dev)
    scale = torch.zeros(b, device=dev)
    pick = torch.full((b,), -1, dtype=torch.int64, device=dev)
    for t in range(k):
        x_, y_ = cqx[:, t], cq2[:, t]
        take = ok[:, t] & (x_ * x_ > best * y_)
        scale = torch.where(take, x_ / torch.where(take, y_, torch.ones_like(y_)), scale)
        best = torch.where(take, scale * x_, best)
        pick = torch.where(take, order[:, t], pick)
    return scale, pick


def _split_search(xs: torch.Tensor, ws: torch.Tensor):
    """Step 2 on sorted blocks ``xs`` (weights ``ws`` in the same order) ``[B, 32]``.

    Returns ``(scale [B], i1 [B], i2 [B], shift [B] in {1, -1}, found [B])``.
    """
    b = xs.shape[0]
    dev = xs.device
    sx, sw = seq_cumsum(ws * xs), seq_cumsum(ws)  # [B, 33]: sumx[j+1] = sumx[j] + weight*xb, sequentially
    i1, i2 = _candidates(_BLOCK, dev)
    if seq_kernels_on(xs):  # C's scan itself, a lane per block
        from dq.kernels._triton_lattice import iq1_split_triton

        scale, pick = iq1_split_triton((sx, sw))
        pc = pick.clamp(min=0)
        return scale, i1[pc // 2], i2[pc // 2], torch.where(pc % 2 == 0, 1, -1), pick >= 0
    a_x, b_x, c_x = sx[:, i1] - sx[:, :1], sx[:, i2] - sx[:, i1], sx[:, -1:] - sx[:, i2]
    a_w, b_w, c_w = sw[:, i1] - sw[:, :1], sw[:, i2] - sw[:, i1], sw[:, -1:] - sw[:, i2]
    qx, q2 = [], []
    for sgn in (1.0, -1.0):  # x_p then x_m, as in the C loop body
        p0, p1, p2 = -1.0 + sgn * _DELTA, sgn * _DELTA, 1.0 + sgn * _DELTA
        qx.append(a_x * p0 + b_x * p1 + c_x * p2)
        q2.append(a_w * p0 * p0 + b_w * p1 * p1 + c_w * p2 * p2)
    # candidate order: (i1, i2, shift) with shift +1 before -1
    scale, pick = _replay(torch.stack(qx, 2).reshape(b, -1), torch.stack(q2, 2).reshape(b, -1))  # [B, 1122]
    found = pick >= 0
    pc = pick.clamp(min=0)
    shift = torch.where(pc % 2 == 0, 1, -1)
    return scale, i1[pc // 2], i2[pc // 2], shift, found


def _shifted(dev: torch.device) -> torch.Tensor:
    """``[[x_p], [x_m]]``: the three levels shifted by ``+delta`` (row 0) and ``-delta`` (row 1)."""
    lv = torch.tensor([-1.0, 0.0, 1.0], device=dev)
    return torch.stack([lv + _DELTA, lv - _DELTA])


def _snap(lv, minus, xg, wg, sg, dead, tab):
    """Grid indices of groups of 8 levels ``lv`` ``[G, 8]`` (0..2), an off-grid group replaced by its best neighbour.

    As ``iq1_find_best_neighbour2``: the neighbour with the least ``sum w*(scale*q - x)^2`` (the first on ties),
    ``q`` the level shifted by ``-delta`` where ``minus`` else ``+delta``. Returns ``(index [G], moved [G])``;
    dead groups keep ``-1`` when off the grid.
    """
    u = (lv << tab.shifts).sum(1)
    gi = tab.kmap[u]
    off = (gi < 0) & ~dead
    if bool(off.any()):
        gi = gi.clone()
        r = off.nonzero().squeeze(1)
        width = int(tab.counts[u[r]].max())
        nb = tab.neighbours[u[r]][:, :width]
        cand = tab.levels[nb.clamp(min=0)]  # [N, width, 8] levels of each neighbour
        vals = _shifted(xg.device)[minus[r].long()][:, None, :].expand(-1, width, -1).gather(2, cand.long())
        xr, wr, sr = xg[r], wg[r], sg[r]
        d2 = torch.zeros(nb.shape, device=xg.device)
        for i in range(8):  # `d2 += w*diff*diff`, diff = scale*q - xval[i]
            diff = sr[:, None] * vals[:, :, i] - xr[:, i : i + 1]
            d2 = d2 + wr[:, i : i + 1] * diff * diff
        d2 = torch.where(nb >= 0, d2, torch.full_like(d2, float("inf")))
        gi[r] = nb.gather(1, d2.argmin(1, keepdim=True)).squeeze(1)
    return gi, off


def _prepare(x: torch.Tensor, imatrix: torch.Tensor, block: int, eps: float):
    """Step 1 for rows ``x``: ``(grid tables, blocks xb [B, block], weights, dead [B], sorted xb, sort order)``.

    Weights ``qw * sqrt(2 sum(x^2)/256 + x^2)``; a block is dead when ``max |x| < eps``; the sort is stable
    (glibc's merge-sort ``qsort``). IQ1_M shares IQ1_S's grid.
    """
    tab = tables_on(lattice_tables(QuantFormat.IQ1_S, 8, 2, 3, 43692, 3), x.device)
    n = x.shape[1]
    sup = x.reshape(-1, QK_K)
    sigma2 = sdiv(seq_sum(sup * sup) * 2.0, float(QK_K))
    qw = imatrix.to(device=x.device, dtype=torch.float32).reshape(1, n).expand(x.shape[0], -1).reshape(-1, QK_K)
    weight = (qw * torch.sqrt((sigma2[:, None] + sup * sup).double()).float()).reshape(-1, block)
    xb = sup.reshape(-1, block)
    xs, idx = torch.sort(xb, dim=1, stable=True)
    return tab, xb, weight, xb.abs().amax(1) < eps, xs, idx


def _quantize_rows(x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    dev = x.device
    tab, xb, weight, dead, xs, idx = _prepare(x, imatrix, _BLOCK, _EPS)
    b = xb.shape[0]
    scale, i1, i2, shift, found = _split_search(xs, weight.gather(1, idx))
    dead = dead | ~found
    pos = torch.arange(_BLOCK, device=dev)
    lv_sorted = (pos[None, :] >= i1[:, None]).int() + (pos[None, :] >= i2[:, None]).int()  # 0, 1, 2 by run
    lv = torch.empty_like(lv_sorted).scatter_(1, idx, lv_sorted)
    neg = scale < 0
    lv = torch.where(neg[:, None], 2 - lv, lv)
    scale = torch.where(neg, -scale, scale)
    shift = torch.where(neg, -shift, shift)
    # snap each 8 to the grid: q = x_p or x_m of the level, compared with the signed weights at `scale`
    minus = (shift < 0).repeat_interleave(4)
    gi, off = _snap(lv.reshape(-1, 8), minus, xb.reshape(-1, 8), weight.reshape(-1, 8),
                    scale.repeat_interleave(4), dead.repeat_interleave(4), tab)
    if bool(off.any()):
        # refit where a point moved: sums over the block's 32 weights in order, q from the snapped points
        moved = off.reshape(b, 4).any(1)
        q = _shifted(dev)[minus.long()].gather(1, tab.levels[gi.clamp(min=0)].long()).reshape(b, _BLOCK)
        sumqx, sumq2 = seq_sum(weight * q * xb), seq_sum(weight * q * q)
        refit = moved & ~dead & (sumqx > 0) & (sumq2 > 0)
        scale = torch.where(refit, sumqx / torch.where(refit, sumq2, torch.ones_like(sumq2)), scale)
    gi = torch.where(dead.repeat_interleave(4), 0, gi.clamp(min=0)).reshape(b, 4)
    scale = torch.where(dead, torch.zeros_like(scale), scale)
    shift = torch.where(dead, 1, shift)
    scales = scale.reshape(-1, QK_K // _BLOCK)
    ns = scales.shape[0]
    max_scale = scales.amax(1)
    live = max_scale > 0
    d = sdiv(max_scale, 15.0)
    id_ = rdiv(1.0, torch.where(live, d, torch.ones_like(d)))
    ls = nearest_int(0.5 * (id_[:, None] * scales - 1.0)).clamp(0, 7).long()
    ls = ls | torch.where(shift.reshape(ns, -1) == -1, 8, 0)
    gi = gi.reshape(ns, 8, 4)
    qh = ((gi >> 8) << torch.tensor([0, 3, 6, 9], device=dev)).sum(-1) | (ls << 12)  # [S, 8] uint16
    qh = torch.where(live[:, None], qh, torch.zeros_like(qh))
    qs = torch.where(live[:, None], (gi & 255).reshape(ns, 32), torch.zeros_like(gi.reshape(ns, 32)))
    stored_d = torch.where(live, d * 1.125, torch.zeros_like(d))  # `d*1.125f`, exact multiplier
    head = stored_d.to(torch.float16).view(torch.int16).long() & 0xFFFF
    out = torch.cat([torch.stack([head & 255, head >> 8], 1), qs,
                     torch.stack([qh & 255, qh >> 8], -1).reshape(ns, 16)], 1)
    return out.to(torch.uint8)


def _split_search_m(xs: torch.Tensor, ws: torch.Tensor, second: torch.Tensor):
    """IQ1_M's step 2 on sorted 16-blocks ``xs`` (weights ``ws``; ``second``: the value is in the block's 2nd half).

    Prefix sums are kept per half, and each half takes its own shift, so a split has four candidates
    ``k`` (0: ``+,+``; 1: ``+,-``; 2: ``-,+``; 3: ``-,-``), with C's collapsed sums
    ``qx = T*v2 - px[i1] - px[i2]`` and ``q2 = W*v2*v2 + pw[i1]*c1 + pw[i2]*c2``.
    Returns ``(scale [B], i1 [B], i2 [B], k [B], found [B])``.
    """
    b = xs.shape[0]
    dev = xs.device
    # px[h][j+1] = px[h][j] + weight*xb for the half the value is in, else px[h][j] (adding +0.0: exact, and
    # a prefix sum from +0 is never -0)
    wx, zero = ws * xs, torch.zeros_like(xs)
    px_ = [seq_cumsum(torch.where(half, wx, zero)) for half in (~second, second)]  # 2 x [B, 17]
    pw_ = [seq_cumsum(torch.where(half, ws, zero)) for half in (~second, second)]
    i1, i2 = _candidates(_BLOCK_M, dev)
    if seq_kernels_on(xs):  # C's scan itself, a lane per block
        from dq.kernels._triton_lattice import iq1_split_triton

        scale, pick = iq1_split_triton((px_[0], px_[1], pw_[0], pw_[1]))
        pc = pick.clamp(min=0)
        return scale, i1[pc // 4], i2[pc // 4], pc % 4, pick >= 0
    qx_p, qx_m, q2_p, q2_m = [], [], [], []
    for h in range(2):
        tx, tw = px_[h][:, -1:], pw_[h][:, -1:]
        sx = px_[h][:, i1] + px_[h][:, i2]
        qx_p.append(tx * _P2 - sx)
        qx_m.append(tx * _M2 - sx)
        q2_p.append(tw * _P2 * _P2 + pw_[h][:, i1] * _CP1 + pw_[h][:, i2] * _CP2)
        q2_m.append(tw * _M2 * _M2 + pw_[h][:, i1] * _CM1 + pw_[h][:, i2] * _CM2)
    qx = torch.stack([qx_p[0] + qx_p[1], qx_p[0] + qx_m[1], qx_m[0] + qx_p[1], qx_m[0] + qx_m[1]], 2)
    q2 = torch.stack([q2_p[0] + q2_p[1], q2_p[0] + q2_m[1], q2_m[0] + q2_p[1], q2_m[0] + q2_m[1]], 2)
    scale, pick = _replay(qx.reshape(b, -1), q2.reshape(b, -1))  # [B, 612], order (i1, i2, k)
    pc = pick.clamp(min=0)
    return scale, i1[pc // 4], i2[pc // 4], pc % 4, pick >= 0


def _quantize_rows_m(x: torch.Tensor, imatrix: torch.Tensor) -> torch.Tensor:
    dev = x.device
    tab, xb, weight, dead, xs, idx = _prepare(x, imatrix, _BLOCK_M, _EPS_M)
    b = xb.shape[0]
    scale, i1, i2, k, found = _split_search_m(xs, weight.gather(1, idx), idx >= _BLOCK_M // 2)
    dead = dead | ~found
    pos = torch.arange(_BLOCK_M, device=dev)
    lv_sorted = (pos[None, :] >= i1[:, None]).int() + (pos[None, :] >= i2[:, None]).int()
    lv = torch.empty_like(lv_sorted).scatter_(1, idx, lv_sorted)
    neg = scale < 0
    lv = torch.where(neg[:, None], 2 - lv, lv)
    scale = torch.where(neg, -scale, scale)
    k = torch.where(neg, 3 - k, k)
    minus = torch.stack([k >= 2, k % 2 == 1], 1).reshape(-1)  # per group of 8: the half's shift is -delta
    gi, off = _snap(lv.reshape(-1, 8), minus, xb.reshape(-1, 8), weight.reshape(-1, 8),
                    scale.repeat_interleave(2), dead.repeat_interleave(2), tab)
    if bool(off.any()):  # refit the block's scale where a group moved off its rounded levels
        q = _shifted(dev)[minus.long()].gather(1, tab.levels[gi.clamp(min=0)].long()).reshape(b, _BLOCK_M)
        sumqx, sumq2 = seq_sum(weight * q * xb), seq_sum(weight * q * q)
        refit = off.reshape(b, 2).any(1) & ~dead & (sumqx > 0) & (sumq2 > 0)
        scale = torch.where(refit, sumqx / torch.where(refit, sumq2, torch.ones_like(sumq2)), scale)
    gi = torch.where(dead.repeat_interleave(2), 0, gi.clamp(min=0)).reshape(b, 2)
    scale = torch.where(dead, torch.zeros_like(scale), scale)
    k = torch.where(dead, 0, k)
    minus = torch.stack([k >= 2, k % 2 == 1], 1)
    nsb = QK_K // _BLOCK_M
    scales = scale.reshape(-1, nsb)
    ns = scales.shape[0]
    max_scale = scales.amax(1)
    live = max_scale > 0
    d = sdiv(max_scale, 15.0)
    id_ = rdiv(1.0, torch.where(live, d, torch.ones_like(d)))
    ls = nearest_int(0.5 * (id_[:, None] * scales - 1.0)).clamp(0, 7).long()  # [S, 16]
    # the super-block scale refit on the 3-bit scales: q = x_p/x_m level * (2l + 1), all 256 weights in order
    q = _shifted(dev)[minus.reshape(-1).long()].gather(1, tab.levels[gi.reshape(-1)].long())
    q = (q.reshape(ns, nsb, _BLOCK_M) * (2 * ls + 1)[:, :, None].float()).reshape(ns, QK_K)
    w256, x256 = weight.reshape(ns, QK_K), xb.reshape(ns, QK_K)
    sumqx, sumq2 = seq_sum(w256 * q * x256), seq_sum(w256 * q * q)
    d = torch.where(sumq2 > 0, sumqx / torch.where(sumq2 > 0, sumq2, torch.ones_like(sumq2)), d)
    dbits = (d * 1.1125).to(torch.float16).view(torch.int16).long() & 0xFFFF  # `d*1.1125f`
    gi = gi.reshape(ns, nsb, 2)
    mask = torch.where(minus[:, 0], 0x08, 0) | torch.where(minus[:, 1], 0x80, 0)
    qh = (gi[..., 0] >> 8) | ((gi[..., 1] >> 8) << 4) | torch.where(live[:, None], mask.reshape(ns, nsb), 0)
    sc = (ls.reshape(ns, 4, 4) << torch.tensor([0, 3, 6, 9], device=dev)).sum(-1)  # [S, 4] uint16
    sc = sc | ((dbits[:, None] & torch.tensor([0xF, 0xF0, 0xF00, 0xF000], device=dev))
               << torch.tensor([12, 8, 4, 0], device=dev))
    sc = torch.where(live[:, None], sc, torch.zeros_like(sc))
    out = torch.cat([(gi & 255).reshape(ns, 32), qh, torch.stack([sc & 255, sc >> 8], -1).reshape(ns, 8)], 1)
    return out.to(torch.uint8)


def _in_chunks(x: torch.Tensor, imatrix: torch.Tensor | None, fmt: QuantFormat, rows_fn) -> torch.Tensor:
    """``rows_fn`` over row chunks of ``x`` (uniform importance when ``imatrix`` is None), blocks concatenated."""
    rows, n = x.shape
    if n % QK_K:
        raise ValueError(f"row length {n} is not a multiple of {fmt}'s block size {QK_K}")
    x = x.to(torch.float32)
    im = torch.ones(n, dtype=torch.float32, device=x.device) if imatrix is None else imatrix.reshape(-1)
    step = max(1, _CHUNK_ELEMENTS.get(x.device.type, 1 << 16) // n)
    parts = [rows_fn(x[r : r + step], im) for r in range(0, rows, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def quantize_iq1_s(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize ``x`` ``[rows, n]`` to IQ1_S blocks, as ``ggml_quantize_chunk`` would.

    Args:
        x: float32 ``[rows, n]``, ``n`` a multiple of 256.
        imatrix: ``[n]`` importance weights, or None for uniform ones (as ``dq`` quantizes a tensor without).

    Returns:
        uint8 ``[rows * n / 256, 50]`` on ``x.device``: the tensor's GGUF payload.
    """
    return _in_chunks(x, imatrix, QuantFormat.IQ1_S, _quantize_rows)


def fake_quant_iq1_s(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``to_float(quantize_iq1_s(x))``: float32 ``[rows, n]``, bit-identical to libggml's round trip."""
    blocks = quantize_iq1_s(x, imatrix)
    assert blocks.shape[1] == FORMATS[QuantFormat.IQ1_S].type_size
    return dequantize_blocks(blocks, QuantFormat.IQ1_S).reshape(x.shape)


def quantize_iq1_m(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize ``x`` ``[rows, n]`` to IQ1_M blocks, as ``ggml_quantize_chunk`` would.

    Args:
        x: float32 ``[rows, n]``, ``n`` a multiple of 256.
        imatrix: ``[n]`` importance weights, or None for uniform ones (as ``dq`` quantizes a tensor without;
            C's own no-imatrix branch, weights ``x^2``, is not ported: llama.cpp requires an imatrix for IQ1_M).

    Returns:
        uint8 ``[rows * n / 256, 56]`` on ``x.device``.
    """
    return _in_chunks(x, imatrix, QuantFormat.IQ1_M, _quantize_rows_m)


def fake_quant_iq1_m(x: torch.Tensor, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """``to_float(quantize_iq1_m(x))``: float32 ``[rows, n]``, bit-identical to libggml's round trip."""
    blocks = quantize_iq1_m(x, imatrix)
    assert blocks.shape[1] == FORMATS[QuantFormat.IQ1_M].type_size
    return dequantize_blocks(blocks, QuantFormat.IQ1_M).reshape(x.shape)
