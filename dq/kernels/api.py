"""Dispatch between the Triton kernels (GPU) and the torch references (CPU, or any device).

``backend="auto"`` picks Triton for CUDA tensors when Triton imports and a kernel exists for the type,
else the torch reference. ``backend="triton"`` on CPU tensors needs ``TRITON_INTERPRET=1`` (as in CI).
Kernels never choose formats: callers pass a :class:`~dq.quant.formats.QuantFormat` or ``FormatSpec``.

Example:
    >>> import torch
    >>> from dq.quant import QuantFormat
    >>> err = quant_error(torch.randn(4, 256), QuantFormat.Q4_K, backend="torch")
    >>> sorted(err)
    ['sse', 'sumsq', 'wsse', 'wsumsq']
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
from collections.abc import Sequence
from typing import Literal

import torch

from dq.kernels.ref_iqgrid import GRID_FORMATS
from dq.kernels.ref_quant import FAKE_QUANT_FORMATS
from dq.quant.formats import FORMATS, FormatSpec, QuantFormat

__all__ = [
    "quant_error", "dequantize", "act_stats", "triton_available", "resolve_backend", "Backend",
    "TRITON_DEQUANT_FORMATS", "QUANT_ERROR_FORMATS", "LATTICE_FORMATS",
]

log = logging.getLogger(__name__)

Backend = Literal["auto", "triton", "torch"]
_BACKENDS = ("auto", "triton", "torch")


@functools.cache
def triton_available() -> bool:
    """Whether the ``triton`` package can be imported (checked without importing it)."""
    return importlib.util.find_spec("triton") is not None


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _as_format(fmt: QuantFormat | FormatSpec) -> QuantFormat:
    if isinstance(fmt, QuantFormat):
        return fmt
    if isinstance(fmt, FormatSpec):
        for k, v in FORMATS.items():
            if v.ggml_id == fmt.ggml_id:
                return k
    raise TypeError(f"expected a QuantFormat or FormatSpec, got {fmt!r}; parse names with dq.quant.parse_format")


def resolve_backend(backend: str, device: torch.device, has_kernel: bool) -> Literal["triton", "torch"]:
    """The backend that will run: ``auto`` means Triton for CUDA tensors with a kernel, else torch.

    Raises:
        ValueError: unknown backend, or ``triton`` requested where it cannot run.
    """
    if backend not in _BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {_BACKENDS}")
    if backend == "torch":
        return "torch"
    can = has_kernel and triton_available() and (device.type == "cuda" or _interpret())
    if backend == "triton":
        if not can:
            raise ValueError(
                f"backend='triton' cannot run here (triton installed: {triton_available()}, device: {device}, "
                f"kernel for this type: {has_kernel}); use backend='auto' or 'torch', a CUDA tensor, or "
                f"TRITON_INTERPRET=1 for CPU tensors"
            )
        return "triton"
    return "triton" if can and device.type == "cuda" else "torch"


def quant_error(
    weight: torch.Tensor,
    fmt: QuantFormat | FormatSpec,
    imatrix: torch.Tensor | None = None,
    backend: Backend = "auto",
    *,
    imatrix_quantizer: bool = False,
    return_dequantized: bool = False,
) -> dict[str, torch.Tensor]:
    """Per-row error of storing ``weight`` as ``fmt`` (ggml's quantizer, fake-quantized).

    Args:
        weight: ``[rows, n_per_row]`` float tensor; ``n_per_row`` a multiple of the type's block size.
        fmt: the candidate type (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0, Q2_K..Q6_K, IQ4_NL, IQ4_XS;
            IQ3_XXS, IQ3_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_S and IQ1_M through the torch ports
            :mod:`dq.kernels.ref_iqgrid` and :mod:`dq.kernels.ref_iq1`).
        imatrix: optional ``[n_per_row]`` importance weights; they weight the error.
        backend: ``auto``, ``triton`` or ``torch``.
        imatrix_quantizer: also quantize with the imatrix as libggml does (``quantize_row_*_impl``). Off:
            ggml's reference (no-imatrix) quantizer, see :func:`dq.kernels.ref_quant.quant_error`. The IQ
            lattice types always quantize with the imatrix (uniform weights without one, as llama.cpp
            requires one for them; IQ3_S without one weights by ``x^2``, as libggml does).
        return_dequantized: also return the fake-quantized weights (float32) as ``"deq"``, from the same
            pass (for activation errors).

    Returns:
        ``{"sse", "wsse", "sumsq", "wsumsq"}``, float32 ``[rows]`` tensors on ``weight.device``.

    Raises:
        ValueError: unsupported type, shape or backend.
    """
    f = _as_format(fmt)
    if f not in QUANT_ERROR_FORMATS:
        raise ValueError(f"quant_error supports {[x.value for x in QUANT_ERROR_FORMATS]}, not {f}")
    if weight.ndim != 2 or weight.shape[1] % FORMATS[f].block_size:
        raise ValueError(
            f"weight must be [rows, n_per_row] with n_per_row a multiple of {FORMATS[f].block_size} for {f}, "
            f"got shape {tuple(weight.shape)}; use dq.quant.effective_format for llama.cpp's fallback type"
        )
    if imatrix is not None and tuple(imatrix.shape) != (weight.shape[1],):
        raise ValueError(f"imatrix has shape {tuple(imatrix.shape)}, expected ({weight.shape[1]},)")
    if f in LATTICE_FORMATS:  # the lattice searches run as torch ops on the tensor's device (no fused Triton kernel)
        from dq.kernels.ref_iq1 import fake_quant_iq1_m, fake_quant_iq1_s
        from dq.kernels.ref_iqgrid import fake_quant_iqgrid
        from dq.kernels.ref_quant import error_sums

        resolve_backend("torch" if backend == "auto" else backend, weight.device, False)
        im = imatrix
        if im is None and FORMATS[f].needs_imatrix:  # as dq quantizes them without one; IQ3_S keeps C's x^2
            im = torch.ones(weight.shape[1], dtype=torch.float32, device=weight.device)
        if f is QuantFormat.IQ1_S:
            deq = fake_quant_iq1_s(weight, im)
        else:
            deq = fake_quant_iq1_m(weight, im) if f is QuantFormat.IQ1_M else fake_quant_iqgrid(weight, f, im)
        out = error_sums(weight, deq, imatrix)
        if return_dequantized:
            out["deq"] = deq
        return out
    if resolve_backend(backend, weight.device, True) == "triton":
        if f in (QuantFormat.IQ4_NL, QuantFormat.IQ4_XS):
            from dq.kernels._triton_iq4 import quant_error_iq4_triton as quant_error_triton
        else:
            from dq.kernels._triton_quant import quant_error_triton

        return quant_error_triton(weight, f, imatrix, imatrix_quantizer=imatrix_quantizer,
                                  return_dequantized=return_dequantized)
    from dq.kernels.ref_quant import quant_error as ref

    return ref(weight, f, imatrix, imatrix_quantizer=imatrix_quantizer, return_dequantized=return_dequantized)


def dequantize(
    data: torch.Tensor,
    fmt: QuantFormat | FormatSpec,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    backend: Backend = "auto",
) -> torch.Tensor:
    """Dequantize a GGUF tensor payload (uint8 tensor of raw bytes) into ``dtype``.

    Args:
        data: uint8 tensor holding the payload (flattened).
        fmt: its GGML type; every type in ``FORMATS`` is supported.
        shape: numpy shape of the result (last dim is the row length).
        dtype: ``torch.float32`` or ``torch.bfloat16``.
        backend: ``auto``, ``triton`` or ``torch``; every quantized type has a Triton kernel (the IQ2/IQ3/IQ1
            lattice types in :mod:`dq.kernels._triton_iqdequant`), F32/F16/BF16 convert through torch.

    Returns:
        tensor of ``shape`` and ``dtype`` on ``data.device``.
    """
    from dq.kernels import ref_dequant

    f = _as_format(fmt)
    if dtype not in (torch.float32, torch.bfloat16):
        raise ValueError(f"dequantize writes float32 or bfloat16, not {dtype}")
    has_kernel = f in TRITON_DEQUANT_FORMATS
    if resolve_backend(backend, data.device, has_kernel or FORMATS[f].is_float) == "triton" and has_kernel:
        shape_t = tuple(int(s) for s in shape)
        n = 1
        for s in shape_t:
            n *= s
        from dq.quant.formats import tensor_nbytes

        if data.dtype != torch.uint8 or data.numel() != tensor_nbytes(f, shape_t):
            raise ValueError(f"{f} payload must be {tensor_nbytes(f, shape_t)} uint8 bytes for shape {shape_t}")
        from dq.kernels._triton_dequant import dequantize_triton

        return dequantize_triton(data.contiguous().reshape(-1), f, n, dtype).reshape(shape_t)
    return ref_dequant.dequantize(data, f, shape, dtype)


# Types with a Triton dequant kernel (mirrors _triton_dequant.TRITON_DEQUANT_FORMATS: its _KIND, then
# _triton_iqdequant's lattice types), so listing needs no Triton import.
TRITON_DEQUANT_FORMATS: tuple[QuantFormat, ...] = (
    QuantFormat.Q8_0, QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q5_0, QuantFormat.Q5_1,
    QuantFormat.Q2_K, QuantFormat.Q3_K, QuantFormat.Q4_K, QuantFormat.Q5_K, QuantFormat.Q6_K,
    QuantFormat.TQ2_0, QuantFormat.IQ4_NL, QuantFormat.IQ4_XS, QuantFormat.MXFP4, QuantFormat.TQ1_0,
    QuantFormat.IQ2_XXS, QuantFormat.IQ2_XS, QuantFormat.IQ2_S, QuantFormat.IQ3_XXS, QuantFormat.IQ3_S,
    QuantFormat.IQ1_S, QuantFormat.IQ1_M,
)


# The IQ lattice types, ported as torch ops (byte-exact with libggml) that run on any device.
LATTICE_FORMATS: tuple[QuantFormat, ...] = GRID_FORMATS + (QuantFormat.IQ1_S, QuantFormat.IQ1_M)
# Types quant_error measures: the ported reference and imatrix quantizers, and the lattice searches.
QUANT_ERROR_FORMATS: tuple[QuantFormat, ...] = FAKE_QUANT_FORMATS + LATTICE_FORMATS


def act_stats(x: torch.Tensor, backend: Backend = "auto") -> dict[str, torch.Tensor]:
    """Activation statistics of one ``[tokens, channels]`` input: the imatrix and super-weight inputs.

    Args:
        x: activations ``[..., channels]`` (leading dims are flattened into tokens), any float dtype.
        backend: ``auto``, ``triton`` or ``torch``.

    Returns:
        ``sum_sq`` (float32 ``[channels]``, sum of x^2 over tokens), ``max_abs`` (float32 ``[channels]``)
        and ``count`` (int64 scalar tensor, number of tokens).
    """
    x2 = x.reshape(-1, x.shape[-1])
    count = torch.tensor(x2.shape[0], dtype=torch.int64)
    if resolve_backend(backend, x.device, True) == "triton":
        from dq.kernels._triton_dequant import act_stats_triton

        sq, mx = act_stats_triton(x2.contiguous())
    else:
        xf = x2.to(torch.float32)
        sq, mx = (xf * xf).sum(dim=0), xf.abs().amax(dim=0)
    return {"sum_sq": sq, "max_abs": mx, "count": count}
