"""Torch reference of ggml's reference quantizers: fake-quantization (quantize -> dequantize) in float32.

Bit-exact with ``ggml_quantize_chunk`` followed by the type's ``to_float`` for the types in
:data:`FAKE_QUANT_FORMATS` when no importance matrix is given (``quantize_row_*_ref`` in ggml-quants.c).
Every float operation below is the C one, in the C order (no FMA: libggml-base is built without it), so
``x * id`` here and ``x*id`` there round identically. Sums that feed a decision are accumulated
sequentially, element by element, as the C loops do; a pairwise ``torch.sum`` would differ in the last
bit and occasionally flip a scale search.

This module covers the 32-weight types (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1) and the ternary types (TQ1_0,
TQ2_0); the K-quants' scale searches live in :mod:`dq.kernels.ref_kquant`, the non-linear IQ4_NL/IQ4_XS
search in :mod:`dq.kernels.ref_iq4` (which always quantizes as libggml does, imatrix or not). Both run on any torch device.

Every quantizer first computes its blocks' fields (:class:`QBlocks`, from :func:`quantize_blocks`: the fp16
scales, the scale bytes as C packs them, each weight's stored level); :func:`fake_quant` dequantizes them and
:mod:`dq.kernels.ref_pack` lays them out as GGUF bytes, so the two cannot drift apart.

Example:
    >>> import torch
    >>> from dq.quant import QuantFormat
    >>> w = torch.randn(3, 256)
    >>> fake_quant(w, QuantFormat.Q4_0).shape
    torch.Size([3, 256])
"""

from __future__ import annotations

import functools
import importlib.util
import os
from dataclasses import dataclass

import torch

from dq.quant.formats import FORMATS, QuantFormat

__all__ = [
    "FAKE_QUANT_FORMATS",
    "QBlocks",
    "quantize_blocks",
    "fake_quant",
    "quant_error",
    "error_sums",
    "nearest_int",
    "roundf",
    "fp16_round",
    "first_absmax",
    "first_min",
    "rdiv",
    "sdiv",
    "seq_sum",
    "seq_cumsum",
    "seq_kernels_on",
]

# Types whose ggml quantizers are ported: the reference (no-imatrix) one and, for the same types, the
# imatrix-aware quantize_row_*_impl (Q8_0 and TQ*_0 ignore the imatrix in libggml too).
FAKE_QUANT_FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat.Q8_0,
    QuantFormat.Q4_0,
    QuantFormat.Q4_1,
    QuantFormat.Q5_0,
    QuantFormat.Q5_1,
    QuantFormat.TQ1_0,
    QuantFormat.TQ2_0,
    QuantFormat.Q2_K,
    QuantFormat.Q3_K,
    QuantFormat.Q4_K,
    QuantFormat.Q5_K,
    QuantFormat.Q6_K,
    QuantFormat.IQ4_NL,
    QuantFormat.IQ4_XS,
)


def nearest_int(x: torch.Tensor) -> torch.Tensor:
    """ggml-quants.c ``nearest_int``, the 1.5*2^23 trick itself: ``x + 12582912.f``, low 23 bits minus 2^22.

    That is round-half-to-even for ``|x| <= 4194303``; beyond (C only asserts it), it is what the bits give:
    ``inf`` -> -4194304, and NaN -> 0 (x86's default NaN has mantissa 0x400000; a CUDA NaN is 0x7fffffff,
    hence the explicit case). Those occur where a sub-block's range is so small (subnormal) that the
    inverse scale overflows; a search then picks the levels C picks.

    Returns a float32 tensor holding integers (the C code converts them back to float at every use).
    """
    x = x.to(torch.float32)
    i = (x + 12582912.0).view(torch.int32)
    return torch.where(torch.isnan(x), 0.0, ((i & 0x7FFFFF) - 0x400000).to(torch.float32))


def roundf(x: torch.Tensor) -> torch.Tensor:
    """C ``roundf``/``lroundf``: round half away from zero (``quantize_row_q8_0_ref``, ``tq*_0``).

    ``trunc(x + copysign(0.5, x))`` is wrong for 0.49999997; the exact form compares the remainder.
    """
    t = torch.trunc(x)
    return torch.where((x - t).abs() >= 0.5, t + torch.sign(x), t)


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """GGML_FP32_TO_FP16 then back: round-to-nearest-even to half precision, as float32."""
    return x.to(torch.float16).to(torch.float32)


def first_absmax(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed value and magnitude of the first element of largest ``|x|`` along the last dim.

    The C loops use a strict ``amax < fabsf(v)``, so of ``-m`` and ``+m`` the first one wins;
    ``torch.argmax`` also returns the first maximal index. NaNs never pass the comparison, and an all-zero
    (or all-NaN) row keeps C's initial ``max = 0`` (+0, whatever the zeros' signs: ``max / -8`` is then -0.0).
    """
    ax = x.abs()
    ax = torch.where(torch.isnan(ax), torch.zeros_like(ax), ax)
    idx = ax.argmax(dim=-1, keepdim=True)
    v, a = x.gather(-1, idx).squeeze(-1), ax.gather(-1, idx).squeeze(-1)
    return torch.where(a > 0, v, torch.zeros_like(v)), a


def first_min(x: torch.Tensor) -> torch.Tensor:
    """``min = x[0]; if (x[i] < min) min = x[i]``: the first minimal element along the last dim (of equal
    -0.0 and +0.0 the first, whose sign then reaches a stored fp16 ``m``)."""
    return x.gather(-1, x.argmin(dim=-1, keepdim=True)).squeeze(-1)


def seq_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum along the last dim in C loop order, ``s = 0; for j: s += t[..., j]`` (a pairwise ``torch.sum``
    rounds differently and can flip a later comparison).

    On a CUDA tensor with Triton installed this is one kernel launch (:mod:`dq.kernels._triton_lattice`, the same
    float32 adds in the same order) instead of one launch per term.
    """
    if seq_kernels_on(t):
        from dq.kernels._triton_lattice import seq_sum_triton

        return seq_sum_triton(t)
    s = t[..., 0].clone()
    for j in range(1, t.shape[-1]):
        s = s + t[..., j]
    return s


def seq_cumsum(t: torch.Tensor) -> torch.Tensor:
    """C-order prefix sums along the last dim with a leading zero: ``[..., n + 1]`` float32,
    ``out[..., 0] = 0``, ``out[..., j + 1] = out[..., j] + t[..., j]`` (one Triton launch on CUDA)."""
    if seq_kernels_on(t):
        from dq.kernels._triton_lattice import seq_cumsum_triton

        return seq_cumsum_triton(t)
    out = [torch.zeros(t.shape[:-1], dtype=torch.float32, device=t.device)]
    for j in range(t.shape[-1]):
        out.append(out[-1] + t[..., j])
    return torch.stack(out, -1)


def seq_kernels_on(t: torch.Tensor) -> bool:
    """Whether :func:`seq_sum` runs as one Triton kernel: a float32 CUDA tensor, Triton importable, no interpreter."""
    return t.is_cuda and t.dtype == torch.float32 and os.environ.get("TRITON_INTERPRET", "0") != "1" and _have_triton()


@functools.cache
def _have_triton() -> bool:
    return importlib.util.find_spec("triton") is not None


def rdiv(num: float, t: torch.Tensor) -> torch.Tensor:
    """IEEE ``num / t`` in float32; ``num / t`` in torch is ``t.reciprocal() * num``, which rounds twice."""
    return torch.div(torch.full_like(t, num), t)


def sdiv(t: torch.Tensor, den: float) -> torch.Tensor:
    """IEEE ``t / den`` in float32; CUDA torch turns division by a scalar into a multiply by ``1/den``."""
    return torch.div(t, torch.full_like(t, den))


def _safe_inv(d: torch.Tensor) -> torch.Tensor:
    # `const float id = d ? 1.0f/d : 0.0f;`
    return torch.where(d != 0, rdiv(1.0, torch.where(d != 0, d, torch.ones_like(d))), torch.zeros_like(d))


@dataclass(frozen=True)
class QBlocks:
    """The fields of a run of ggml blocks before bit-packing: what ``quantize_row_*`` writes, as integers.

    One row per block (32 weights for Q8_0/Q4_*/Q5_*/IQ4_NL, 256 for the others). :meth:`dequantize` gives the
    fake-quantized floats (``dequantize_row_*``'s arithmetic), :func:`dq.kernels.ref_pack.pack_blocks` the
    GGUF bytes; both read the same fields, so the two agree by construction.

    Attributes:
        fmt: the GGML type.
        d: ``[B]`` float32 holding an fp16 value: ``y.d``.
        levels: ``[B, block]`` int32, each weight's stored level in C's ``L[]`` / ``q`` convention before
            its bits are split (Q8_0 and TQ*: signed; Q4_0 0..15 with offset 8; Q5_0 offset 16; Q3_K 0..7
            offset 4; Q6_K 0..63 offset 32; IQ4_*: an index into ``kvalues_iq4nl``).
        dmin: ``[B]`` fp16 value of ``y.m`` (Q4_1/Q5_1) or ``y.dmin`` (Q2_K/Q4_K/Q5_K), else None.
        scales: ``[B, k]`` int32 bytes of the sub-block scale field exactly as C wrote them (K types:
            ``y.scales``; IQ4_XS: ``scales_h`` little-endian then ``scales_l``), else None.
        sub_scale: ``[B, n_sub]`` float32 ``d * scale`` of each sub-block as ``dequantize_row_*`` forms it
            (K types, IQ4_XS), else None.
        sub_min: ``[B, n_sub]`` float32 ``dmin * min`` (Q2_K/Q4_K/Q5_K), else None.
    """

    fmt: QuantFormat
    d: torch.Tensor
    levels: torch.Tensor
    dmin: torch.Tensor | None = None
    scales: torch.Tensor | None = None
    sub_scale: torch.Tensor | None = None
    sub_min: torch.Tensor | None = None

    def dequantize(self) -> torch.Tensor:
        """float32 ``[B, block]``: the weights ``dequantize_row_<fmt>`` reads back from these fields."""
        if self.fmt in (QuantFormat.IQ4_NL, QuantFormat.IQ4_XS):
            from dq.kernels.ref_dequant import KVALUES_IQ4NL

            q = torch.tensor(KVALUES_IQ4NL, dtype=torch.float32, device=self.levels.device)[self.levels.long()]
        else:
            q = (self.levels - _LEVEL_OFFSET.get(self.fmt, 0)).to(torch.float32)
        if self.sub_scale is None:  # one scale per block: `x0*d (+ m)`
            out = q * self.d[:, None]
            return out if self.dmin is None else out + self.dmin[:, None]
        b, nsub = self.sub_scale.shape
        out = self.sub_scale[..., None] * q.reshape(b, nsub, -1)  # `dl * q` with dl = d * sc formed first
        if self.sub_min is not None:
            out = out - self.sub_min[..., None]
        return out.reshape(b, -1)


# stored level - offset = the signed level dequantize_row_* multiplies by (Q4_0: `(qs & 0x0F) - 8`)
_LEVEL_OFFSET = {QuantFormat.Q4_0: 8, QuantFormat.Q5_0: 16, QuantFormat.Q3_K: 4, QuantFormat.Q6_K: 32}


def _c_int(v: torch.Tensor) -> torch.Tensor:
    """C's float -> integer conversion as x86-64 does it (``cvttss2si``): truncation toward zero, and NaN, inf
    or out-of-range give INT_MIN, whose low byte (what an ``int8_t``/``uint8_t`` keeps) is 0. Non-finite
    values come from ``x*id`` when ``id = 1/d`` overflowed (a block of subnormal weights)."""
    return torch.where(v.abs() < 2147483648.0, torch.trunc(v), torch.zeros_like(v))


def _q8_0(b: torch.Tensor, fmt: QuantFormat) -> QBlocks:
    # quantize_row_q8_0_ref: d = amax/127, qs = roundf(x*id) (stored through an int8_t conversion)
    amax = b.abs().amax(dim=1)
    d = sdiv(amax, 127.0)
    q = _c_int(roundf(b * _safe_inv(d)[:, None]))
    return QBlocks(fmt, fp16_round(d), q.to(torch.int32))


def _q4_0_q5_0(b: torch.Tensor, fmt: QuantFormat) -> QBlocks:
    # quantize_row_q4_0_ref / quantize_row_q5_0_ref: d = max / -8 (-16), q = MIN(15, (int8_t)(x*id + 8.5f))
    nlev = 16 if fmt is QuantFormat.Q4_0 else 32
    half = nlev // 2
    mx, _ = first_absmax(b)
    d = sdiv(mx, float(-half))
    q = torch.clamp(_c_int(b * _safe_inv(d)[:, None] + (half + 0.5)), max=nlev - 1)
    return QBlocks(fmt, fp16_round(d), q.to(torch.int32))


def _q4_1_q5_1(b: torch.Tensor, fmt: QuantFormat) -> QBlocks:
    # quantize_row_q4_1_ref / quantize_row_q5_1_ref; dequant is `x0*d + m`
    nlev = 16 if fmt is QuantFormat.Q4_1 else 32
    mn = first_min(b)
    mx = -first_min(-b)  # the first maximal element (`if (v > max) max = v;`)
    d = sdiv(mx - mn, float(nlev - 1))
    q = _c_int((b - mn[:, None]) * _safe_inv(d)[:, None] + 0.5)
    # Q4_1 clamps with MIN(15, .); Q5_1 stores only 5 bits of an uint8 (a 32 would wrap to 0)
    q = torch.clamp(q, max=nlev - 1) if nlev == 16 else torch.remainder(q, 32)
    return QBlocks(fmt, fp16_round(d), q.to(torch.int32), dmin=fp16_round(mn))


def _tq(b: torch.Tensor, fmt: QuantFormat) -> QBlocks:
    # quantize_row_tq1_0_ref / tq2_0_ref: lroundf(x*id) in {-1, 0, 1}; both packings are lossless. A
    # non-finite x*id (id overflowed) makes glibc's lroundf return LONG_MIN, `(int)(LONG_MIN + 1)` = 1: level 0
    d = b.abs().amax(dim=1)
    q = _c_int(roundf(b * _safe_inv(d)[:, None]))
    return QBlocks(fmt, fp16_round(d), q.to(torch.int32))


_REF_BLOCKS = {
    QuantFormat.Q8_0: _q8_0, QuantFormat.Q4_0: _q4_0_q5_0, QuantFormat.Q5_0: _q4_0_q5_0,
    QuantFormat.Q4_1: _q4_1_q5_1, QuantFormat.Q5_1: _q4_1_q5_1, QuantFormat.TQ1_0: _tq, QuantFormat.TQ2_0: _tq,
}


def quantize_blocks(weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> QBlocks:
    """Quantize ``weight`` as ``ggml_quantize_chunk`` would, returning the blocks' fields (:class:`QBlocks`).

    Args:
        weight: ``[rows, n_per_row]`` float tensor (converted to float32), on any device.
        fmt: one of :data:`FAKE_QUANT_FORMATS`; ``n_per_row`` must be a multiple of its block size.
        imatrix: quantize as libggml does with this ``[n_per_row]`` imatrix (its ``quantize_row_*_impl``;
            Q8_0 and TQ*_0 ignore it there too); None: the ``quantize_row_*_ref`` quantizers.

    Returns:
        the fields of the ``rows * n_per_row / block`` blocks, in row order.

    Raises:
        ValueError: unsupported type or misaligned row length.
    """
    if fmt not in FAKE_QUANT_FORMATS:
        raise ValueError(f"no reference quantizer for {fmt}; supported: {[f.value for f in FAKE_QUANT_FORMATS]}")
    x = weight.to(torch.float32)
    if x.ndim != 2:
        raise ValueError(f"expected a 2-D [rows, n_per_row] tensor, got shape {tuple(x.shape)}")
    bs = FORMATS[fmt].block_size
    if x.shape[1] % bs:
        raise ValueError(f"row length {x.shape[1]} is not a multiple of {fmt}'s block size {bs}")
    im = None if imatrix is None else imatrix.reshape(-1)
    if fmt in (QuantFormat.IQ4_NL, QuantFormat.IQ4_XS):
        from dq.kernels.ref_iq4 import iq4_blocks

        return iq4_blocks(x, fmt, im)
    b = x.reshape(-1, bs)
    if im is not None and fmt.value.endswith("_K"):
        from dq.kernels.ref_kquant import k_blocks_imatrix

        return k_blocks_imatrix(b, fmt, im)
    if im is not None and fmt in (QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q5_0, QuantFormat.Q5_1):
        from dq.kernels.ref_kquant import legacy_blocks_imatrix

        return legacy_blocks_imatrix(x, fmt, im)
    if fmt in _REF_BLOCKS:
        return _REF_BLOCKS[fmt](b, fmt)
    from dq.kernels.ref_kquant import k_blocks

    return k_blocks(b, fmt)


def fake_quant(weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None) -> torch.Tensor:
    """Quantize then dequantize ``weight`` as ggml's reference quantizer for ``fmt`` would.

    Args:
        weight: ``[rows, n_per_row]`` float tensor (converted to float32), on any device.
        fmt: one of :data:`FAKE_QUANT_FORMATS`; ``n_per_row`` must be a multiple of its block size.
        imatrix: quantize as libggml does with this ``[n_per_row]`` imatrix (its ``quantize_row_*_impl``;
            Q8_0 and TQ*_0 ignore it there too).

    Returns:
        float32 tensor of ``weight``'s shape, equal bit for bit to
        ``libggml.dequantize(libggml.quantize(weight, fmt), fmt, shape)``.

    Raises:
        ValueError: unsupported type or misaligned row length.
    """
    if fmt in (QuantFormat.IQ4_NL, QuantFormat.IQ4_XS) and weight.ndim == 2:
        from dq.kernels.ref_iq4 import fake_quant_iq4  # chunks its rows: the trial search is memory-hungry

        return fake_quant_iq4(weight.to(torch.float32), fmt, None if imatrix is None else imatrix.reshape(-1))
    return quantize_blocks(weight, fmt, imatrix).dequantize().reshape(weight.shape)


def error_sums(
    weight: torch.Tensor, deq: torch.Tensor, imatrix: torch.Tensor | None = None
) -> dict[str, torch.Tensor]:
    """Per-row error reductions of a fake-quantized tensor, accumulated in float64.

    Args:
        weight: ``[rows, n]`` original weights.
        deq: ``[rows, n]`` dequantized weights.
        imatrix: optional ``[n]`` importance per input column (unit importance when ``None``).

    Returns:
        ``sse`` (sum of squared error), ``wsse`` (importance-weighted), ``sumsq`` (sum of squared
        weights) and ``wsumsq`` (importance-weighted), each a float32 ``[rows]`` tensor.
    """
    w = weight.to(torch.float64)
    e2 = (w - deq.to(torch.float64)) ** 2
    w2 = w * w
    out = {"sse": e2.sum(dim=1), "sumsq": w2.sum(dim=1)}
    if imatrix is None:
        out["wsse"], out["wsumsq"] = out["sse"], out["sumsq"]
    else:
        im = imatrix.to(device=w.device, dtype=torch.float64)[None, :]
        out["wsse"], out["wsumsq"] = (e2 * im).sum(dim=1), (w2 * im).sum(dim=1)
    return {k: v.to(torch.float32) for k, v in out.items()}


def quant_error(
    weight: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None = None, *, imatrix_quantizer: bool = False,
    return_dequantized: bool = False,
) -> dict[str, torch.Tensor]:
    """Reference per-row quantization error of ``weight`` stored as ``fmt``.

    By default the quantizer is ggml's reference (no-imatrix) one and ``imatrix`` only weights the error.
    With ``imatrix_quantizer`` it is libggml's imatrix-aware ``quantize_row_*_impl``, i.e. exactly what
    llama.cpp writes with that imatrix (the reference quantizer's weighted error is higher by a bounded,
    type-dependent factor: ``tests/kernels/test_kernels_ref.py``).

    Args:
        weight: ``[rows, n_per_row]`` float tensor.
        fmt: one of :data:`FAKE_QUANT_FORMATS`.
        imatrix: optional ``[n_per_row]`` importance weights.

    Returns:
        dict of per-row float32 tensors, see :func:`error_sums`.
    """
    deq = fake_quant(weight, fmt, imatrix if imatrix_quantizer else None)
    out = error_sums(weight, deq, imatrix)
    if return_dequantized:
        out["deq"] = deq
    return out
