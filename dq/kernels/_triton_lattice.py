"""Triton kernels for the sequential loops of the lattice ports, one lane per row, one launch each.

The lattice ports (:mod:`dq.kernels.ref_iqgrid`, :mod:`dq.kernels.ref_iq1`) reproduce ggml's sequential
float32 loops: sums ``s = 0; for j: s += x[j]``, ``make_qp_quants``' level refinement, where each step
depends on the last, the nearest-neighbour scan of an off-grid point (``iq2_find_best_neighbour``), and
IQ1_S/IQ1_M's scan over every split of a sorted block (the torch port scores all splits at once and
replays only the near-best ones; here each lane runs C's scan itself). As torch ops that is a kernel launch (or ten) per step, and on a GPU those launches,
not the arithmetic, were most of the ports' time. Here each lane walks its row in C order with the same
float32 operations (no FMA contraction, ``div_rn``, round-half-even), so results are bit-identical to the
torch loops, which remain the CPU path and the reference (``tests/kernels/test_triton_lattice.py``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from dq.kernels._triton_math import div, rne

__all__ = ["seq_sum_triton", "seq_cumsum_triton", "make_qp_scale_triton", "best_neighbour_triton", "iq1_split_triton"]

_LANES = 256


@triton.jit
def _seq_sum_kernel(x_ptr, out_ptr, rows, n, CUMULATIVE: tl.constexpr, LANES: tl.constexpr):
    r = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = r < rows
    base = r.to(tl.int64) * n
    if CUMULATIVE:  # out[r, 0] = 0, out[r, j + 1] = out[r, j] + x[r, j]
        acc = tl.zeros([LANES], tl.float32)
        obase = r.to(tl.int64) * (n + 1)
        tl.store(out_ptr + obase, acc, mask=live)
        for j in range(0, n):
            acc = acc + tl.load(x_ptr + base + j, mask=live, other=0.0)
            tl.store(out_ptr + obase + j + 1, acc, mask=live)
    else:  # s = x[r, 0]; s += x[r, j] (starting from the first term keeps a -0.0 sum's sign, as the loop does)
        acc = tl.load(x_ptr + base, mask=live, other=0.0)
        for j in range(1, n):
            acc = acc + tl.load(x_ptr + base + j, mask=live, other=0.0)
        tl.store(out_ptr + r, acc, mask=live)


def _run(t: torch.Tensor, cumulative: bool) -> torch.Tensor:
    n = t.shape[-1]
    x = t.to(torch.float32).reshape(-1, n).contiguous()
    rows = x.shape[0]
    out = torch.empty((rows, n + 1) if cumulative else (rows,), dtype=torch.float32, device=x.device)
    if rows:
        _seq_sum_kernel[(triton.cdiv(rows, _LANES),)](x, out, rows, n, CUMULATIVE=cumulative, LANES=_LANES,
                                                      enable_fp_fusion=False)
    return out.reshape(*t.shape[:-1], n + 1) if cumulative else out.reshape(t.shape[:-1])


def seq_sum_triton(t: torch.Tensor) -> torch.Tensor:
    """``t.sum(-1)`` summed in C order in float32 (``s = t[..., 0]; s += t[..., 1]; ...``)."""
    return _run(t, False)


def seq_cumsum_triton(t: torch.Tensor) -> torch.Tensor:
    """Prefix sums in C order with a leading zero: ``[..., n + 1]``, ``out[..., j + 1] = out[..., j] + t[..., j]``."""
    return _run(t, True)


@triton.jit
def _make_qp_kernel(x_ptr, w_ptr, l_ptr, out_ptr, blocks, n, NMAX: tl.constexpr, LANES: tl.constexpr):
    b = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = b < blocks
    base = b.to(tl.int64) * n
    nmax = tl.full([LANES], NMAX, tl.float32)
    mx = tl.zeros([LANES], tl.float32)
    for i in range(0, n):  # max = MAX(max, x[i]) from 0
        xi = tl.load(x_ptr + base + i, mask=live, other=0.0)
        mx = tl.where(mx > xi, mx, xi)
    safe = tl.where(mx > 0, mx, 1.0)
    iscale = div(nmax, safe)
    scale = div(tl.full([LANES], 1.0, tl.float32), iscale)
    best = tl.zeros([LANES], tl.float32)
    for i in range(0, n):  # L = nearest_int(iscale*x) stored as uint8
        xi = tl.load(x_ptr + base + i, mask=live, other=0.0)
        wi = tl.load(w_ptr + base + i, mask=live, other=0.0)
        li = (rne(iscale * xi).to(tl.int32) & 255).to(tl.float32)
        diff = xi - scale * li
        best = best + wi * diff * diff
    for k in range(0, 8):  # is = -4..-1, 1..4
        iscale_is = div(tl.full([LANES], 0.1, tl.float32) * ((k - 4 + k // 4) * 1.0) + nmax, safe)  # (0.1f*is + nmax)/max
        scale_is = div(tl.full([LANES], 1.0, tl.float32), iscale_is)
        mse = tl.zeros([LANES], tl.float32)
        for i in range(0, n):
            xi = tl.load(x_ptr + base + i, mask=live, other=0.0)
            wi = tl.load(w_ptr + base + i, mask=live, other=0.0)
            li = tl.minimum(rne(iscale_is * xi), nmax)
            diff = xi - scale_is * li
            mse = mse + wi * diff * diff
        better = mse < best
        best = tl.where(better, mse, best)
        iscale = tl.where(better, iscale_is, iscale)
    sumlx = tl.zeros([LANES], tl.float32)
    suml2 = tl.zeros([LANES], tl.float32)
    for i in range(0, n):
        xi = tl.load(x_ptr + base + i, mask=live, other=0.0)
        wi = tl.load(w_ptr + base + i, mask=live, other=0.0)
        li = tl.minimum(rne(iscale * xi), nmax)
        tl.store(l_ptr + base + i, li.to(tl.int32) & 255, mask=live)
        sumlx = sumlx + wi * xi * li
        suml2 = suml2 + wi * li * li
    active = live
    for _ in range(0, 5):  # C stops a block's passes at the first one that changes nothing
        changed = tl.zeros([LANES], tl.int1)
        for i in range(0, n):
            xi = tl.load(x_ptr + base + i, mask=live, other=0.0)
            wi = tl.load(w_ptr + base + i, mask=live, other=0.0)
            lq = tl.load(l_ptr + base + i, mask=live, other=0)
            li = lq.to(tl.float32)
            slx = sumlx - wi * xi * li
            sl2 = suml2 - wi * li * li
            ok = active & (slx > 0) & (sl2 > 0)
            new_l = tl.minimum(rne(div(xi * sl2, tl.where(ok, slx, 1.0))), nmax)
            ok = ok & (new_l != li)
            slx = slx + wi * xi * new_l
            sl2 = sl2 + wi * new_l * new_l
            take = ok & (slx * slx * suml2 > sumlx * sumlx * sl2)
            tl.store(l_ptr + base + i, tl.where(take, new_l.to(tl.int32) & 255, lq), mask=live)
            sumlx = tl.where(take, slx, sumlx)
            suml2 = tl.where(take, sl2, suml2)
            changed = changed | take
        active = active & changed
    pos = suml2 > 0
    tl.store(out_ptr + b, tl.where(pos, div(sumlx, tl.where(pos, suml2, 1.0)), 0.0), mask=live)


def make_qp_scale_triton(x: torch.Tensor, w: torch.Tensor, nmax: int) -> torch.Tensor:
    """The scale ``make_qp_quants(n, nmax, x, L, w)`` returns, for blocks ``[B, n]`` (see
    :func:`dq.kernels.ref_iqgrid._make_qp_quants`, whose loops this runs one lane per block)."""
    x = x.to(torch.float32).contiguous()
    w = w.to(torch.float32).contiguous()
    blocks, n = x.shape
    out = torch.empty(blocks, dtype=torch.float32, device=x.device)
    levels = torch.empty((blocks, n), dtype=torch.int32, device=x.device)
    if blocks:
        _make_qp_kernel[(triton.cdiv(blocks, _LANES),)](x, w, levels, out, blocks, n, NMAX=nmax, LANES=_LANES,
                                                        enable_fp_fusion=False)
    return out


@triton.jit
def _best_neighbour_kernel(nb_ptr, cnt_ptr, q_ptr, u_ptr, x_ptr, w_ptr, s_ptr, out_ptr, rows, nb_stride,
                           GROUP: tl.constexpr, LANES: tl.constexpr):
    r = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = r < rows
    u = tl.load(u_ptr + r, mask=live, other=0)
    count = tl.load(cnt_ptr + u, mask=live, other=0)
    scale = tl.load(s_ptr + r, mask=live, other=0.0)
    best = tl.full([LANES], float("inf"), tl.float32)
    pick = tl.full([LANES], -1, tl.int64)
    longest = tl.max(count, 0)
    for j in range(0, longest):  # `for j in 1..num_neighbors: if (d2 < best_d2)`: the first minimum
        on = live & (j < count)
        g = tl.load(nb_ptr + u * nb_stride + j, mask=on, other=0)
        d2 = tl.zeros([LANES], tl.float32)
        for i in tl.static_range(GROUP):
            xi = tl.load(x_ptr + r.to(tl.int64) * GROUP + i, mask=on, other=0.0)
            wi = tl.load(w_ptr + r.to(tl.int64) * GROUP + i, mask=on, other=0.0)
            qi = tl.load(q_ptr + g * GROUP + i, mask=on, other=0.0)
            diff = scale * qi - xi
            d2 = d2 + wi * diff * diff
        take = on & (d2 < best)
        best = tl.where(take, d2, best)
        pick = tl.where(take, g, pick)
    tl.store(out_ptr + r, pick, mask=live)


def best_neighbour_triton(neighbours: torch.Tensor, counts: torch.Tensor, q: torch.Tensor, u: torch.Tensor,
                          xv: torch.Tensor, wa: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """Grid index of the neighbour of each packed point ``u`` ``[N]`` nearest ``xv`` ``[N, group]`` (weights
    ``wa``, at ``scale`` ``[N]``): ``sum wa*(scale*q - xv)^2`` over the point's list, the first minimum
    (see :func:`dq.kernels.ref_iqgrid._best_neighbour`). ``neighbours`` ``[K, n_max]`` int64 lists padded with
    -1, ``counts`` ``[K]``, ``q`` ``[G, group]`` float32."""
    rows, group = xv.shape
    out = torch.empty(rows, dtype=torch.int64, device=xv.device)
    if rows:
        _best_neighbour_kernel[(triton.cdiv(rows, _LANES),)](
            neighbours.contiguous(), counts.contiguous(), q.contiguous(), u.contiguous(),
            xv.to(torch.float32).contiguous(), wa.to(torch.float32).contiguous(),
            scale.to(torch.float32).contiguous(), out, rows, neighbours.shape[1], GROUP=group, LANES=_LANES,
            enable_fp_fusion=False)
    return out


@triton.jit
def _accept(qx, q2, best, scale, pick, c):
    # `if (sumq2 > 0 && sumqx*sumqx > best_score*sumq2) { scale = sumqx/sumq2; best_score = scale*sumqx; }`
    take = (q2 > 0) & (qx * qx > best * q2)
    scale = tl.where(take, div(qx, tl.where(take, q2, 1.0)), scale)
    best = tl.where(take, scale * qx, best)
    pick = tl.where(take, c, pick)
    return best, scale, pick


@triton.jit
def _iq1_s_split_kernel(sx_ptr, sw_ptr, scale_ptr, pick_ptr, blocks, BLOCK: tl.constexpr, LANES: tl.constexpr):
    r = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = r < blocks
    base = r.to(tl.int64) * (BLOCK + 1)
    x0 = tl.load(sx_ptr + base, mask=live, other=0.0)
    w0 = tl.load(sw_ptr + base, mask=live, other=0.0)
    xn = tl.load(sx_ptr + base + BLOCK, mask=live, other=0.0)
    wn = tl.load(sw_ptr + base + BLOCK, mask=live, other=0.0)
    best = tl.full([LANES], -3.4028234663852886e38, tl.float32)
    scale = tl.zeros([LANES], tl.float32)
    pick = tl.full([LANES], -1, tl.int32)
    for i1 in range(0, BLOCK + 1):
        x1 = tl.load(sx_ptr + base + i1, mask=live, other=0.0)
        w1 = tl.load(sw_ptr + base + i1, mask=live, other=0.0)
        for i2 in range(i1, BLOCK + 1):
            c = 2 * (i1 * (BLOCK + 1) - i1 * (i1 - 1) // 2 + i2 - i1)  # candidate index in C order
            x2 = tl.load(sx_ptr + base + i2, mask=live, other=0.0)
            w2 = tl.load(sw_ptr + base + i2, mask=live, other=0.0)
            a_x, b_x, c_x = x1 - x0, x2 - x1, xn - x2
            a_w, b_w, c_w = w1 - w0, w2 - w1, wn - w2
            # x_p = (-7/8, 1/8, 9/8), then x_m = (-9/8, -1/8, 7/8)
            qx = a_x * -0.875 + b_x * 0.125 + c_x * 1.125
            q2 = a_w * -0.875 * -0.875 + b_w * 0.125 * 0.125 + c_w * 1.125 * 1.125
            best, scale, pick = _accept(qx, q2, best, scale, pick, c)
            qx = a_x * -1.125 + b_x * -0.125 + c_x * 0.875
            q2 = a_w * -1.125 * -1.125 + b_w * -0.125 * -0.125 + c_w * 0.875 * 0.875
            best, scale, pick = _accept(qx, q2, best, scale, pick, c + 1)
    tl.store(scale_ptr + r, scale, mask=live)
    tl.store(pick_ptr + r, pick, mask=live)


@triton.jit
def _iq1_m_split_kernel(p0x_ptr, p1x_ptr, p0w_ptr, p1w_ptr, scale_ptr, pick_ptr, blocks, BLOCK: tl.constexpr,
                        LANES: tl.constexpr):
    r = tl.program_id(0) * LANES + tl.arange(0, LANES)
    live = r < blocks
    base = r.to(tl.int64) * (BLOCK + 1)
    t0x = tl.load(p0x_ptr + base + BLOCK, mask=live, other=0.0)
    t1x = tl.load(p1x_ptr + base + BLOCK, mask=live, other=0.0)
    t0w = tl.load(p0w_ptr + base + BLOCK, mask=live, other=0.0)
    t1w = tl.load(p1w_ptr + base + BLOCK, mask=live, other=0.0)
    best = tl.full([LANES], -3.4028234663852886e38, tl.float32)
    scale = tl.zeros([LANES], tl.float32)
    pick = tl.full([LANES], -1, tl.int32)
    for i1 in range(0, BLOCK + 1):
        a0x = tl.load(p0x_ptr + base + i1, mask=live, other=0.0)
        a1x = tl.load(p1x_ptr + base + i1, mask=live, other=0.0)
        a0w = tl.load(p0w_ptr + base + i1, mask=live, other=0.0)
        a1w = tl.load(p1w_ptr + base + i1, mask=live, other=0.0)
        for i2 in range(i1, BLOCK + 1):
            c = 4 * (i1 * (BLOCK + 1) - i1 * (i1 - 1) // 2 + i2 - i1)
            b0x = tl.load(p0x_ptr + base + i2, mask=live, other=0.0)
            b1x = tl.load(p1x_ptr + base + i2, mask=live, other=0.0)
            b0w = tl.load(p0w_ptr + base + i2, mask=live, other=0.0)
            b1w = tl.load(p1w_ptr + base + i2, mask=live, other=0.0)
            # per half: qx = T*v2 - (px[i1] + px[i2]); q2 = W*v2*v2 + pw[i1]*c1 + pw[i2]*c2 (x_p: v2 = 9/8,
            # c1 = 3/4, c2 = -5/4; x_m: v2 = 7/8, c1 = 5/4, c2 = -3/4)
            s0 = a0x + b0x
            s1 = a1x + b1x
            qp0 = t0x * 1.125 - s0
            qm0 = t0x * 0.875 - s0
            qp1 = t1x * 1.125 - s1
            qm1 = t1x * 0.875 - s1
            wp0 = t0w * 1.125 * 1.125 + a0w * 0.75 + b0w * -1.25
            wm0 = t0w * 0.875 * 0.875 + a0w * 1.25 + b0w * -0.75
            wp1 = t1w * 1.125 * 1.125 + a1w * 0.75 + b1w * -1.25
            wm1 = t1w * 0.875 * 0.875 + a1w * 1.25 + b1w * -0.75
            best, scale, pick = _accept(qp0 + qp1, wp0 + wp1, best, scale, pick, c)
            best, scale, pick = _accept(qp0 + qm1, wp0 + wm1, best, scale, pick, c + 1)
            best, scale, pick = _accept(qm0 + qp1, wm0 + wp1, best, scale, pick, c + 2)
            best, scale, pick = _accept(qm0 + qm1, wm0 + wm1, best, scale, pick, c + 3)
    tl.store(scale_ptr + r, scale, mask=live)
    tl.store(pick_ptr + r, pick, mask=live)


def iq1_split_triton(sums: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, torch.Tensor]:
    """C's scan over every split of sorted IQ1 blocks: ``(scale [B], pick [B])``, ``pick`` the accepted
    candidate in C order (IQ1_S: ``2*split + shift``; IQ1_M: ``4*split + k``) or -1.

    ``sums``: IQ1_S's prefix sums ``(sumx, sumw)`` ``[B, 33]``, or IQ1_M's per-half ``(px0, px1, pw0, pw1)``
    ``[B, 17]`` (:func:`dq.kernels.ref_iq1._split_search`, ``_split_search_m``).
    """
    sums = tuple(t.to(torch.float32).contiguous() for t in sums)
    blocks, width = sums[0].shape
    scale = torch.empty(blocks, dtype=torch.float32, device=sums[0].device)
    pick = torch.empty(blocks, dtype=torch.int32, device=sums[0].device)
    if blocks:
        kernel = _iq1_s_split_kernel if len(sums) == 2 else _iq1_m_split_kernel
        kernel[(triton.cdiv(blocks, _LANES),)](*sums, scale, pick, blocks, BLOCK=width - 1, LANES=_LANES,
                                                enable_fp_fusion=False)
    return scale, pick.long()
