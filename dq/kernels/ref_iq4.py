"""Torch port of ggml's non-linear 4-bit quantizers, IQ4_NL and IQ4_XS (``quantize_row_iq4_nl_impl``).

Both store 4-bit indices into the 16-value table ``kvalues_iq4nl``: IQ4_NL one fp16 scale per 32 weights,
IQ4_XS a 6-bit scale per 32 weights under one fp16 scale per 256. The C search, per 32-weight block:

1. weights ``w = x^2``, or with an imatrix ``qw * sqrt(sigma2 + x^2)`` (``sigma2 = 2/n * sum x^2`` over
   the super-block);
2. a first scale ``-max/values[0]`` (``max`` the signed value of largest magnitude), its least-squares
   refit ``sumqx/sumq2``, then 15 trial inverse scales ``(itry + values[0]) / max``, ``itry = -7..7``,
   keeping the refit whose ``sumqx^2/sumq2`` is largest;
3. IQ4_XS: the block scales rounded to 6 bits against ``-max_scale/32`` and every weight re-indexed
   against its rounded scale; IQ4_NL: re-indexed against the block's own (unrounded) scale.

The trials run at once as an extra dimension; the 32-term sums are accumulated in C loop order so every
comparison is decided on the same float32 value as in libggml (``tests/kernels/test_ref_iq4.py`` checks
the round trip bit for bit against ``ggml_quantize_chunk`` + ``to_float``, with and without imatrix). It
runs on any torch device: on CUDA it is how ``dq analyze --device cuda`` measures these two types.
:func:`iq4_blocks` returns the blocks' fields (fp16 scales, 6-bit scale bytes, table indices) that
:mod:`dq.kernels.ref_pack` writes as GGUF bytes.
"""

from __future__ import annotations

import torch

from dq.kernels.ref_dequant import KVALUES_IQ4NL
from dq.kernels.ref_kquant import GROUP_MAX_EPS
from dq.kernels.ref_quant import QBlocks, first_absmax, fp16_round, nearest_int, rdiv, sdiv, seq_sum
from dq.quant.formats import QuantFormat

__all__ = ["IQ4_FORMATS", "fake_quant_iq4", "iq4_blocks"]

IQ4_FORMATS = (QuantFormat.IQ4_NL, QuantFormat.IQ4_XS)
_NTRY = 7  # ggml_quantize_chunk's quantize_iq4_nl / quantize_iq4_xs both search itry = -7..7
_BLOCK = 32
_CHUNK_ELEMENTS = 1 << 24  # rows quantized per pass: about 1 GiB for each of the [chunk, 16] float temporaries


def _best_index(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``best_index_int8(16, values, x)``: index of the nearest table value, ties to the upper one."""
    n = values.numel()
    mu = torch.searchsorted(values, x, right=True).clamp(1, n - 1)  # values[mu-1] <= x < values[mu]
    lo, hi = values[mu - 1], values[mu]
    idx = torch.where(x - lo < hi - x, mu - 1, mu)
    idx = torch.where(x <= values[0], torch.zeros_like(idx), idx)
    return torch.where(x >= values[-1], torch.full_like(idx, n - 1), idx)


def _block_scales(xb: torch.Tensor, w: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """Step 2 for blocks ``xb`` ``[B, 32]`` with weights ``w``: the chosen scale of each block (0 if flat)."""
    mx, amax = first_absmax(xb)
    flat = amax < GROUP_MAX_EPS
    safe_max = torch.where(flat, torch.ones_like(mx), mx)
    v0 = float(values[0])
    d0 = sdiv(-safe_max, v0)  # ntry > 0: d = -max/values[0]
    trials = torch.tensor([float(i) + v0 for i in range(-_NTRY, _NTRY + 1)], device=xb.device)
    # inverse scales: 1/d0 first, then (itry + values[0])/max
    ids = torch.cat([rdiv(1.0, d0)[:, None], torch.div(trials[None, :], safe_max[:, None])], dim=1)  # [B, 16]
    al = ids[:, :, None] * xb[:, None, :]
    q = values[_best_index(values, al)]
    wq = w[:, None, :] * q
    sumqx = seq_sum(wq * xb[:, None, :])
    sumq2 = seq_sum(wq * q)
    pos = sumq2 > 0
    refit = torch.where(pos, sumqx / torch.where(pos, sumq2, torch.ones_like(sumq2)), torch.zeros_like(sumqx))
    d = refit[:, 0]
    best = d * sumqx[:, 0]
    for t in range(1, ids.shape[1]):
        better = pos[:, t] & (sumqx[:, t] * sumqx[:, t] > best * sumq2[:, t])
        d = torch.where(better, refit[:, t], d)
        best = torch.where(better, d * sumqx[:, t], best)
    return torch.where(flat, torch.zeros_like(d), d)


def _check(x: torch.Tensor, fmt: QuantFormat) -> int:
    if fmt not in IQ4_FORMATS:
        raise ValueError(f"the IQ4 port handles {[f.value for f in IQ4_FORMATS]}, not {fmt}")
    sb = 256 if fmt is QuantFormat.IQ4_XS else _BLOCK
    if x.shape[1] % sb:
        raise ValueError(f"row length {x.shape[1]} is not a multiple of {fmt}'s block size {sb}")
    return sb


def fake_quant_iq4(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``x`` ``[rows, n]`` as libggml's IQ4_NL / IQ4_XS quantizer would.

    Args:
        x: float32 ``[rows, n]``, ``n`` a multiple of 32 (IQ4_NL) or 256 (IQ4_XS).
        fmt: ``IQ4_NL`` or ``IQ4_XS``.
        imatrix: optional ``[n]`` importance weights (``quant_weights`` in C).

    Returns:
        float32 ``[rows, n]``, bit-identical to ``to_float(ggml_quantize_chunk(x, imatrix))``.
    """
    sb = _check(x, fmt)
    rows, n = x.shape
    step = max(1, _CHUNK_ELEMENTS // n)  # the 16 trial scales make 16 temporaries of the chunk's size
    parts = [_iq4_rows(x[r : r + step], fmt, sb, imatrix).dequantize().reshape(-1, n) for r in range(0, rows, step)]
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def iq4_blocks(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> QBlocks:
    """The fields of the IQ4_NL / IQ4_XS blocks libggml writes for ``x`` ``[rows, n]`` (``quantize_row_iq4_nl_impl``).

    Args:
        x: float32 ``[rows, n]``; keep ``rows * n`` moderate (the search holds 16 trial copies of ``x``).
        fmt: ``IQ4_NL`` or ``IQ4_XS``.
        imatrix: optional ``[n]`` importance weights.

    Returns:
        :class:`~dq.kernels.ref_quant.QBlocks`: ``d``, the table index of every weight, and for IQ4_XS the
        six scale bytes (``scales_h`` little-endian, ``scales_l``) with the per-32 dequant scales.
    """
    return _iq4_rows(x, fmt, _check(x, fmt), imatrix)


def _iq4_rows(x: torch.Tensor, fmt: QuantFormat, sb: int, imatrix: torch.Tensor | None) -> QBlocks:
    rows, n = x.shape
    values = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=x.device)
    sup = x.reshape(-1, sb)  # super-blocks, in row order
    if imatrix is None:
        w = sup * sup
    else:
        sigma2 = seq_sum(sup * sup) * (2.0 / sb)  # `sigma2 *= 2.f/super_block_size` (exact: a power of two)
        qw = imatrix.to(device=x.device, dtype=torch.float32).reshape(1, n // sb, sb).expand(rows, -1, -1)
        w = qw.reshape(-1, sb) * torch.sqrt((sigma2[:, None] + sup * sup).double()).float()
    xb = sup.reshape(-1, _BLOCK)
    scales = _block_scales(xb, w.reshape(-1, _BLOCK), values)  # [nblocks]
    if fmt is QuantFormat.IQ4_NL:  # `dh[0] = GGML_FP32_TO_FP16(scales[0])`, re-indexed against 1/scales[0]
        inv = torch.where(scales != 0, rdiv(1.0, torch.where(scales != 0, scales, torch.ones_like(scales))),
                          torch.zeros_like(scales))
        idx = _best_index(values, inv[:, None] * xb)
        return QBlocks(fmt, fp16_round(scales), idx.to(torch.int32))
    s = scales.reshape(-1, sb // _BLOCK)
    max_scale, _ = first_absmax(s)
    d = sdiv(-max_scale, 32.0)
    inv_d = torch.where(d != 0, rdiv(1.0, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))
    lv = nearest_int(inv_d[:, None] * s).clamp(-32, 31)
    dl = d[:, None] * lv
    idl = torch.where(dl != 0, rdiv(1.0, torch.where(dl != 0, dl, torch.ones_like(dl))), torch.zeros_like(dl))
    idx = _best_index(values, idl.reshape(-1)[:, None] * xb).reshape(-1, sb)
    code = (lv + 32).to(torch.int32)  # l += 32: 4 low bits in scales_l (two per byte), 2 high in scales_h
    sh = ((code >> 4) << (2 * torch.arange(code.shape[1], device=x.device))).sum(1, keepdim=True)
    sl = (code[:, 0::2] & 0xF) | ((code[:, 1::2] & 0xF) << 4)
    d16 = fp16_round(d)
    return QBlocks(fmt, d16, idx.to(torch.int32), scales=torch.cat([sh & 0xFF, sh >> 8, sl], 1),
                   sub_scale=d16[:, None] * lv)  # dequant: d * (ls - 32), d the stored fp16
