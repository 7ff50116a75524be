"""GGUF bytes on any torch device: ``ggml_quantize_chunk``'s output for every type dq emits, bit for bit.

:func:`quantize_bytes` is the one entry point. For each type it runs the torch port of libggml's quantizer
(``quantize_row_<type>_ref`` without an imatrix, ``quantize_row_<type>_impl`` with one; Q8_0, TQ1_0, TQ2_0
and MXFP4 ignore the imatrix, as libggml does) and lays the result out as the C structs in ggml-common.h:

* the non-lattice types (Q8_0, Q4_0/Q4_1/Q5_0/Q5_1, Q2_K..Q6_K, TQ1_0/TQ2_0, IQ4_NL/IQ4_XS) come out of
  :func:`dq.kernels.ref_quant.quantize_blocks` as :class:`~dq.kernels.ref_quant.QBlocks` (fp16 scales, the
  scale bytes as C packs them, every weight's level); :func:`pack_blocks` splits the levels' bits as the
  ``quantize_row_*`` packing loops do;
* the lattice types (IQ2_XXS/IQ2_XS/IQ2_S/IQ3_XXS/IQ3_S, IQ1_S/IQ1_M) already produce blocks
  (:mod:`dq.kernels.ref_iqgrid`, :mod:`dq.kernels.ref_iq1`);
* MXFP4 is ported here (``quantize_row_mxfp4_ref``); F32/F16/BF16 are plain conversions (round to nearest
  even, as ``ggml_fp32_to_fp16_row``/``ggml_fp32_to_bf16_row``).

Rows are quantized in chunks, so peak memory stays bounded whatever the tensor size.
``tests/kernels/test_ref_pack.py`` compares the bytes with ``libggml.quantize`` for every type.

Example:
    >>> import torch
    >>> from dq.quant import QuantFormat
    >>> quantize_bytes(torch.randn(3, 256), QuantFormat.Q4_K).shape
    torch.Size([432])
"""

from __future__ import annotations

import torch

from dq.errors import ImatrixRequiredError
from dq.kernels.ref_quant import FAKE_QUANT_FORMATS, QBlocks, quantize_blocks
from dq.quant.formats import FORMATS, QuantFormat, row_nbytes

__all__ = ["PACK_FORMATS", "quantize_bytes", "pack_blocks"]

_Q = QuantFormat
_LATTICE = (_Q.IQ2_XXS, _Q.IQ2_XS, _Q.IQ2_S, _Q.IQ3_XXS, _Q.IQ3_S, _Q.IQ1_S, _Q.IQ1_M)
_FLOATS = {_Q.F32: torch.float32, _Q.F16: torch.float16, _Q.BF16: torch.bfloat16}
# every type quantize_bytes writes
PACK_FORMATS: tuple[QuantFormat, ...] = (*_FLOATS, *FAKE_QUANT_FORMATS, *_LATTICE, _Q.MXFP4)
# weights per pass: every search temporary is a float32 tensor of the chunk's size (IQ4's 16 trial scales make
# it 16 times that, hence a quarter of it); larger on a GPU, where each pass costs a few thousand launches
_CHUNK_ELEMENTS = {"cpu": 1 << 21, "cuda": 1 << 25}
_KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)  # kvalues_mxfp4, doubled E2M1


def _f16(d: torch.Tensor) -> torch.Tensor:
    """``GGML_FP32_TO_FP16`` of ``d`` ``[B]`` as ``[B, 2]`` little-endian bytes (``d`` holds fp16 values already).

    A NaN scale (float32 sums overflowed: weights beyond ~1e18) is x86's default NaN 0xffc00000 in libggml,
    0xfe00 once converted; a GPU's arithmetic makes 0x7fffffff instead, so there NaN is written as 0xfe00.
    """
    h = d.to(torch.float16).contiguous().view(torch.int16)
    if d.device.type != "cpu":
        h = torch.where(torch.isnan(d), torch.full_like(h, -512), h)  # 0xfe00 as int16
    return h.view(torch.uint8).reshape(-1, 2)


def _le(words: torch.Tensor, nbytes: int) -> torch.Tensor:
    """Little-endian bytes of integer ``words`` ``[B]`` as ``[B, nbytes]``."""
    return torch.stack([(words >> (8 * i)) & 255 for i in range(nbytes)], -1)


def _bits(levels: torch.Tensor, width: int) -> torch.Tensor:
    """``sum_k levels[..., k, :] << (width * k)`` over the second-to-last dim (disjoint bit fields)."""
    shifts = width * torch.arange(levels.shape[-2], device=levels.device, dtype=levels.dtype)
    return (levels << shifts[:, None]).sum(-2)


def _crumbs(lv: torch.Tensor) -> torch.Tensor:
    # qs[j/4 + l] = L[j + l] | L[j + l + 32] << 2 | L[j + l + 64] << 4 | L[j + l + 96] << 6, j = 0, 128
    # (quantize_row_q2_K_ref, q3_K_ref, tq2_0_ref)
    return _bits(lv.reshape(lv.shape[0], -1, 4, 32), 2).reshape(lv.shape[0], -1)


def _nibbles(lv: torch.Tensor, half: int) -> torch.Tensor:
    # q[l] = L[j + l] | L[j + l + half] << 4 for each run of 2*half weights (Q4_0 and IQ4: 16, Q4_K: 32)
    return _bits(lv.reshape(lv.shape[0], -1, 2, half), 4).reshape(lv.shape[0], -1)


def _tq1(q: torch.Tensor) -> torch.Tensor:
    """quantize_row_tq1_0_ref's packing of levels ``q`` ``[B, 256]`` in -1..1: 5 trits per byte in qs[48]
    (first trit most significant), 4 per byte (times 3) in qh[4], each then ``(q*256 + 242) / 243``."""
    b = q.shape[0]
    t = q + 1
    dev = q.device
    p5 = torch.tensor([81, 27, 9, 3, 1], device=dev, dtype=t.dtype)[:, None]
    q0 = (t[:, :160].reshape(b, 5, 32) * p5).sum(1)  # qs[m] <- x[m + 32 n], n = 0..4
    q1 = (t[:, 160:240].reshape(b, 5, 16) * p5).sum(1)  # qs[32 + m] <- x[160 + m + 16 n]
    q2 = (t[:, 240:].reshape(b, 4, 4) * p5[1:]).sum(1) * 3  # qh[j] <- x[240 + j + 4 m], `q *= 3`
    return (torch.cat([q0, q1, q2], 1) * 256 + 242) // 243


def pack_blocks(qb: QBlocks) -> torch.Tensor:
    """Lay out :class:`~dq.kernels.ref_quant.QBlocks` as ggml-common.h's ``block_<type>`` structs.

    Args:
        qb: the fields of ``B`` blocks of a non-lattice type (:data:`~dq.kernels.ref_quant.FAKE_QUANT_FORMATS`).

    Returns:
        uint8 ``[B, type_size]`` on the fields' device.
    """
    f, lv = qb.fmt, qb.levels.to(torch.int32)
    b = lv.shape[0]
    d = _f16(qb.d)
    if f is _Q.Q8_0:  # d, qs[32] int8
        parts = [d, lv & 0xFF]
    elif f in (_Q.Q4_0, _Q.IQ4_NL):  # d, qs[16]
        parts = [d, _nibbles(lv, 16)]
    elif f is _Q.Q4_1:  # d, m, qs[16]
        parts = [d, _f16(qb.dmin), _nibbles(lv, 16)]
    elif f in (_Q.Q5_0, _Q.Q5_1):  # d, (m), qh: bit j = the 5th bit of weight j, qs[16] low nibbles
        qh = (((lv >> 4) & 1).to(torch.int64) << torch.arange(32, device=lv.device)).sum(1)
        parts = [d] + ([_f16(qb.dmin)] if f is _Q.Q5_1 else []) + [_le(qh, 4), _nibbles(lv & 0xF, 16)]
    elif f is _Q.Q2_K:  # scales[16], qs[64], d, dmin
        parts = [qb.scales, _crumbs(lv), d, _f16(qb.dmin)]
    elif f is _Q.Q3_K:  # hmask[32]: bit b of byte m is L[32 b + m] > 3; qs[64] of L & 3; scales[12]; d
        hmask = _bits((lv > 3).to(torch.int32).reshape(b, 8, 32), 1)
        parts = [hmask, _crumbs(lv & 3), qb.scales, d]
    elif f is _Q.Q4_K:  # d, dmin, scales[12], qs[128]
        parts = [d, _f16(qb.dmin), qb.scales, _nibbles(lv, 32)]
    elif f is _Q.Q5_K:  # d, dmin, scales[12], qh[32]: bit b of byte j is L[32 b + j] > 15, qs[128]
        parts = [d, _f16(qb.dmin), qb.scales, _bits((lv >> 4).reshape(b, 8, 32), 1), _nibbles(lv & 0xF, 32)]
    elif f is _Q.Q6_K:  # ql[128], qh[64], scales[16] int8, d (quantize_row_q6_K_ref's loop over two halves)
        lr = lv.reshape(b, 2, 4, 32)
        lo = lr & 0xF
        ql = torch.cat([lo[:, :, 0] | (lo[:, :, 2] << 4), lo[:, :, 1] | (lo[:, :, 3] << 4)], 2)
        parts = [ql.reshape(b, 128), _bits(lr >> 4, 2).reshape(b, 64), qb.scales, d]
    elif f is _Q.IQ4_XS:  # d, scales_h, scales_l[4], qs[128] (16 bytes per 32 weights)
        parts = [d, qb.scales, _nibbles(lv, 16)]
    elif f is _Q.TQ2_0:  # qs[64] of (q + 1) in 2-bit fields, d
        parts = [_crumbs(lv + 1), d]
    elif f is _Q.TQ1_0:  # qs[48], qh[4], d
        parts = [_tq1(lv), d]
    else:
        raise ValueError(f"pack_blocks handles {[x.value for x in FAKE_QUANT_FORMATS]}, not {f}")
    out = torch.cat([p.to(torch.uint8) for p in parts], 1)
    assert out.shape == (b, FORMATS[f].type_size), (f, out.shape)
    return out


def _mxfp4(x: torch.Tensor) -> torch.Tensor:
    """quantize_row_mxfp4_ref on blocks ``x`` ``[B, 32]``: uint8 ``[B, 17]`` (e, qs[16])."""
    amax = x.abs().amax(1)
    # `(uint8_t)(floorf(log2f(amax)) - 2 + 127)`: log2 in float64 rounded to float32 is log2f's value
    lg = torch.floor(torch.log2(torch.where(amax > 0, amax, torch.ones_like(amax)).double()).float())
    e = torch.where(amax > 0, (lg - 2 + 127).to(torch.int64) & 0xFF, torch.zeros_like(amax, dtype=torch.int64))
    # GGML_E8M0_TO_FP32_HALF: 2^(e - 128), as float bits
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(torch.int32)
    d = bits.view(torch.float32)[:, None]
    # best_index_mxfp4: the first table value of smallest |kvalues[i]*d - x|, scanned in C order
    best_err = (_KVALUES_MXFP4[0] * d - x).abs()
    best = torch.zeros_like(x, dtype=torch.int32)
    for i, k in enumerate(_KVALUES_MXFP4[1:], 1):
        err = (k * d - x).abs()
        better = err < best_err
        best_err = torch.where(better, err, best_err)
        best = torch.where(better, i, best)
    return torch.cat([e[:, None], _nibbles(best, 16)], 1).to(torch.uint8)


def _quantize_rows(x: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None) -> torch.Tensor:
    """uint8 ``[blocks, type_size]`` of the rows ``x`` (one chunk)."""
    if fmt is _Q.MXFP4:
        return _mxfp4(x.reshape(-1, 32))
    if fmt in (_Q.IQ1_S, _Q.IQ1_M):
        from dq.kernels.ref_iq1 import quantize_iq1_m, quantize_iq1_s

        return (quantize_iq1_s if fmt is _Q.IQ1_S else quantize_iq1_m)(x, imatrix)
    if fmt in _LATTICE:
        from dq.kernels.ref_iqgrid import quantize_iqgrid

        return quantize_iqgrid(x, fmt, imatrix)
    return pack_blocks(quantize_blocks(x, fmt, imatrix))


def quantize_bytes(weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """The GGUF payload of ``weight`` stored as ``fmt``: ``libggml.quantize(weight, fmt, imatrix)``, on ``weight``'s device.

    Args:
        weight: ``[rows, n_per_row]`` float tensor (converted to float32), on any device.
        fmt: one of :data:`PACK_FORMATS`; ``n_per_row`` must be a multiple of its block size.
        imatrix: ``[n_per_row]`` importance weights, or None. As in ``ggml_quantize_chunk``: None picks
            ``quantize_row_<type>_ref``, an imatrix ``quantize_row_<type>_impl``; Q8_0, TQ1_0, TQ2_0, MXFP4 and
            the float types ignore it.

    Returns:
        uint8 ``[rows * row_nbytes(fmt, n_per_row)]`` on ``weight.device``, byte-identical to libggml's.

    Raises:
        ValueError: unsupported type, misaligned row length, or an imatrix of the wrong length.
        ImatrixRequiredError: ``fmt`` needs an imatrix (IQ1_*, IQ2_*, IQ3_XXS) and none was given.

    Example:
        >>> import torch
        >>> from dq.quant import QuantFormat
        >>> quantize_bytes(torch.zeros(2, 32), QuantFormat.Q8_0).tolist()[:3]
        [0, 0, 0]
    """
    if fmt not in PACK_FORMATS:
        raise ValueError(f"quantize_bytes supports {[f.value for f in PACK_FORMATS]}, not {fmt}")
    if weight.ndim != 2:
        raise ValueError(f"quantize_bytes expects a 2-D [rows, n_per_row] tensor, got shape {tuple(weight.shape)}")
    rows, n = weight.shape
    row_size = row_nbytes(fmt, n)  # raises on a misaligned row length
    if FORMATS[fmt].needs_imatrix and imatrix is None:
        raise ImatrixRequiredError(f"{fmt} needs an importance matrix (llama.cpp refuses it without one); pass "
                                   f"an [n_per_row] imatrix or choose a type that does not need one, e.g. Q2_K")
    x = weight.to(torch.float32)
    if fmt in _FLOATS:
        return x.to(_FLOATS[fmt]).contiguous().view(torch.uint8).reshape(-1)
    im = None
    if imatrix is not None:
        im = imatrix.to(device=x.device, dtype=torch.float32).reshape(-1)
        if im.numel() != n:
            raise ValueError(f"imatrix has {im.numel()} values, expected {n} (one per input column)")
    chunk = _CHUNK_ELEMENTS.get(x.device.type, _CHUNK_ELEMENTS["cuda"])
    if fmt in (_Q.IQ4_NL, _Q.IQ4_XS):
        chunk //= 4
    step = max(1, chunk // n)
    out = torch.empty(rows * row_size, dtype=torch.uint8, device=x.device)
    for r in range(0, rows, step):
        r1 = min(rows, r + step)
        out[r * row_size : r1 * row_size] = _quantize_rows(x[r:r1], fmt, im).reshape(-1)
    return out
