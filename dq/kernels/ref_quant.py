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

import torch

from dq.quant.formats import FORMATS, QuantFormat

__all__ = [
    "FAKE_QUANT_FORMATS",
    "fake_quant",
    "quant_error",
    "error_sums",
    "nearest_int",
    "roundf",
    "fp16_round",
    "first_absmax",
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
    """ggml-quants.c ``nearest_int``: the 1.5*2^23 trick is round-half-to-even for ``|x| <= 4194303``.

    Returns a float tensor holding integers (the C code converts them back to float at every use).
    """
    return torch.round(x)


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
    ``torch.argmax`` also returns the first maximal index.
    """
    ax = x.abs()
    idx = ax.argmax(dim=-1, keepdim=True)
    return x.gather(-1, idx).squeeze(-1), ax.gather(-1, idx).squeeze(-1)


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


def _q8_0(b: torch.Tensor) -> torch.Tensor:
    # quantize_row_q8_0_ref + dequantize_row_q8_0
    amax = b.abs().amax(dim=1)
    d = sdiv(amax, 127.0)
    q = roundf(b * _safe_inv(d)[:, None])
    return q * fp16_round(d)[:, None]


def _q4_0_q5_0(b: torch.Tensor, nlev: int) -> torch.Tensor:
    # quantize_row_q4_0_ref / quantize_row_q5_0_ref: d = max / -8 (-16), q = MIN(15, (int8_t)(x*id + 8.5f))
    half = nlev // 2
    mx, _ = first_absmax(b)
    d = sdiv(mx, float(-half))
    q = torch.clamp(torch.trunc(b * _safe_inv(d)[:, None] + (half + 0.5)), max=nlev - 1)
    return (q - half) * fp16_round(d)[:, None]


def _q4_1_q5_1(b: torch.Tensor, nlev: int) -> torch.Tensor:
    # quantize_row_q4_1_ref / quantize_row_q5_1_ref; dequant is `x0*d + m`
    mn = b.amin(dim=1)
    mx = b.amax(dim=1)
    d = sdiv(mx - mn, float(nlev - 1))
    q = torch.trunc((b - mn[:, None]) * _safe_inv(d)[:, None] + 0.5)
    # Q4_1 clamps with MIN(15, .); Q5_1 stores only 5 bits of an uint8 (a 32 would wrap to 0)
    q = torch.clamp(q, max=nlev - 1) if nlev == 16 else torch.remainder(q, 32)
    return q * fp16_round(d)[:, None] + fp16_round(mn)[:, None]


def _tq(b: torch.Tensor) -> torch.Tensor:
    # quantize_row_tq1_0_ref / tq2_0_ref: lroundf(x*id) in {-1, 0, 1}; both packings are lossless
    d = b.abs().amax(dim=1)
    q = roundf(b * _safe_inv(d)[:, None])
    return q * fp16_round(d)[:, None]


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
    if fmt not in FAKE_QUANT_FORMATS:
        raise ValueError(f"no reference quantizer for {fmt}; supported: {[f.value for f in FAKE_QUANT_FORMATS]}")
    x = weight.to(torch.float32)
    if x.ndim != 2:
        raise ValueError(f"fake_quant expects a 2-D [rows, n_per_row] tensor, got shape {tuple(x.shape)}")
    bs = FORMATS[fmt].block_size
    if x.shape[1] % bs:
        raise ValueError(f"row length {x.shape[1]} is not a multiple of {fmt}'s block size {bs}")
    if fmt in (QuantFormat.IQ4_NL, QuantFormat.IQ4_XS):
        from dq.kernels.ref_iq4 import fake_quant_iq4

        return fake_quant_iq4(x, fmt, None if imatrix is None else imatrix.reshape(-1))
    b = x.reshape(-1, bs)
    if imatrix is not None:
        if fmt.value.endswith("_K"):
            from dq.kernels.ref_kquant import fake_quant_k_imatrix

            return fake_quant_k_imatrix(b, fmt, imatrix.reshape(-1)).reshape(x.shape)
        if fmt in (QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q5_0, QuantFormat.Q5_1):
            from dq.kernels.ref_kquant import fake_quant_legacy_imatrix

            return fake_quant_legacy_imatrix(x, fmt, imatrix.reshape(-1))
    if fmt is QuantFormat.Q8_0:
        out = _q8_0(b)
    elif fmt is QuantFormat.Q4_0:
        out = _q4_0_q5_0(b, 16)
    elif fmt is QuantFormat.Q5_0:
        out = _q4_0_q5_0(b, 32)
    elif fmt is QuantFormat.Q4_1:
        out = _q4_1_q5_1(b, 16)
    elif fmt is QuantFormat.Q5_1:
        out = _q4_1_q5_1(b, 32)
    elif fmt in (QuantFormat.TQ1_0, QuantFormat.TQ2_0):
        out = _tq(b)
    else:
        from dq.kernels.ref_kquant import fake_quant_k

        out = fake_quant_k(b, fmt)
    return out.reshape(x.shape)


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
