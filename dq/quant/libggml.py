"""llama.cpp's own quantizers, called through ctypes from the pinned llama-cpp-python wheel.

``quantize`` wraps ``ggml_quantize_chunk`` (every GGML type, imatrix included) and ``dequantize`` wraps
each type's ``to_float`` from ``ggml_get_type_traits``. Both are bit-exact with llama-quantize, because
they are the same C code. ctypes releases the GIL, so row chunks run on a thread pool.

Example:
    >>> import numpy as np
    >>> from dq.quant import QuantFormat
    >>> w = np.random.default_rng(0).standard_normal((4, 256), dtype=np.float32)
    >>> blob = quantize(w, QuantFormat.Q4_K)
    >>> dequantize(blob, QuantFormat.Q4_K, w.shape).shape
    (4, 256)
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dq.errors import ImatrixRequiredError
from dq.quant.formats import FORMATS, QuantFormat, row_nbytes

__all__ = ["quantize", "dequantize", "library_path", "ggml_block_size", "ggml_type_size"]

_F32P = ctypes.POINTER(ctypes.c_float)
_TO_FLOAT = ctypes.CFUNCTYPE(None, ctypes.c_void_p, _F32P, ctypes.c_int64)


class _TypeTraits(ctypes.Structure):
    # struct ggml_type_traits in ggml.h (llama.cpp vendored in llama-cpp-python 0.3.36)
    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


def library_path() -> Path:
    """Path of ``libggml-base`` inside the installed llama-cpp-python wheel (``DQ_LIBGGML`` overrides)."""
    override = os.environ.get("DQ_LIBGGML")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        raise ImportError(
            "llama-cpp-python is not installed; install it with `pip install llama-cpp-python==0.3.36` "
            "(dq's quantizers are llama.cpp's own, from that wheel)"
        )
    libdir = Path(spec.origin).parent / "lib"
    for name in ("libggml-base.so", "libggml-base.dylib", "ggml-base.dll"):
        if (libdir / name).exists():
            return libdir / name
    raise ImportError(f"libggml-base not found in {libdir}; reinstall llama-cpp-python==0.3.36")


@functools.cache
def _lib() -> ctypes.CDLL:
    lib = ctypes.CDLL(str(library_path()))
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [
        ctypes.c_int, _F32P, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, _F32P,
    ]
    lib.ggml_quantize_init.argtypes = [ctypes.c_int]
    lib.ggml_quantize_init.restype = None
    lib.ggml_get_type_traits.restype = ctypes.POINTER(_TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_blck_size.restype = ctypes.c_int64
    lib.ggml_blck_size.argtypes = [ctypes.c_int]
    lib.ggml_type_size.restype = ctypes.c_size_t
    lib.ggml_type_size.argtypes = [ctypes.c_int]
    lib.ggml_quantize_requires_imatrix.restype = ctypes.c_bool
    lib.ggml_quantize_requires_imatrix.argtypes = [ctypes.c_int]
    lib.ggml_validate_row_data.restype = ctypes.c_bool
    lib.ggml_validate_row_data.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]
    return lib


@functools.cache
def _to_float(fmt: QuantFormat):
    traits = _lib().ggml_get_type_traits(FORMATS[fmt].ggml_id).contents
    if not traits.to_float:
        raise ValueError(f"libggml has no to_float for {fmt}")
    return _TO_FLOAT(traits.to_float)


@functools.cache
def _init_type(fmt: QuantFormat) -> None:
    # ggml_quantize_init builds the IQ grids lazily; do it once, before threads race on it.
    _lib().ggml_quantize_init(FORMATS[fmt].ggml_id)


def ggml_block_size(fmt: QuantFormat) -> int:
    """Block size as libggml reports it (used to check the type table)."""
    return int(_lib().ggml_blck_size(FORMATS[fmt].ggml_id))


def ggml_type_size(fmt: QuantFormat) -> int:
    """Bytes per block as libggml reports it (used to check the type table)."""
    return int(_lib().ggml_type_size(FORMATS[fmt].ggml_id))


def _default_threads() -> int:
    return max(1, min(8, os.cpu_count() or 1))


def _row_chunks(n_rows: int, n_per_row: int, n_threads: int) -> list[tuple[int, int]]:
    # ~256K weights per task keeps threads busy without drowning small tensors in overhead.
    rows_per = max(1, min(n_rows, (1 << 18) // max(1, n_per_row)))
    rows_per = max(rows_per, -(-n_rows // (n_threads * 8)))
    return [(r, min(n_rows, r + rows_per)) for r in range(0, n_rows, rows_per)]


def quantize(
    weights: np.ndarray,
    fmt: QuantFormat,
    imatrix: np.ndarray | None = None,
    *,
    n_threads: int | None = None,
) -> bytes:
    """Quantize a 2-D float array with llama.cpp's ``ggml_quantize_chunk``.

    Args:
        weights: ``[rows, n_per_row]`` array; converted to contiguous float32.
        fmt: target type; ``n_per_row`` must be a multiple of its block size.
        imatrix: optional ``[n_per_row]`` importance weights (mean squared activation per input column).
        n_threads: worker threads over row chunks (default: CPU count, at most 8).

    Returns:
        The GGUF tensor payload, ``rows * row_nbytes(fmt, n_per_row)`` bytes.

    Raises:
        ImatrixRequiredError: ``fmt`` needs an importance matrix and none was given.
        ValueError: shape or imatrix length does not fit.
    """
    w = np.ascontiguousarray(weights, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"quantize expects a 2-D [rows, n_per_row] array, got shape {w.shape}")
    n_rows, n_per_row = w.shape
    row_size = row_nbytes(fmt, n_per_row)
    spec = FORMATS[fmt]
    if spec.needs_imatrix and imatrix is None:
        raise ImatrixRequiredError(
            f"{fmt} needs an importance matrix (llama.cpp refuses it without one); pass --imatrix FILE "
            f"(from `dq analyze` or llama-imatrix) or choose a type that does not need one, e.g. Q2_K"
        )
    im = None
    if imatrix is not None:
        im = np.ascontiguousarray(imatrix, dtype=np.float32)
        if im.shape != (n_per_row,):
            raise ValueError(f"imatrix has shape {im.shape}, expected ({n_per_row},) for rows of {n_per_row}")
    out = np.empty(n_rows * row_size, dtype=np.uint8)
    if spec.is_float and fmt is QuantFormat.F32:
        return w.tobytes()
    _init_type(fmt)
    lib = _lib()
    im_ptr = im.ctypes.data_as(_F32P) if im is not None else None

    def run(chunk: tuple[int, int]) -> int:
        r0, r1 = chunk
        src = w[r0:r1].ctypes.data_as(_F32P)
        dst = out.ctypes.data + r0 * row_size
        return lib.ggml_quantize_chunk(spec.ggml_id, src, dst, 0, r1 - r0, n_per_row, im_ptr)

    chunks = _row_chunks(n_rows, n_per_row, n_threads or _default_threads())
    if len(chunks) == 1:
        written = [run(chunks[0])]
    else:
        with ThreadPoolExecutor(max_workers=n_threads or _default_threads()) as pool:
            written = list(pool.map(run, chunks))
    if sum(written) != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {sum(written):,} bytes of {fmt}, expected {out.nbytes:,}: "
                           f"is the installed llama-cpp-python the pinned 0.3.36?")
    return out.tobytes()


def dequantize(data: bytes | np.ndarray, fmt: QuantFormat, shape: Sequence[int]) -> np.ndarray:
    """Dequantize a GGUF tensor payload with the type's ``to_float`` from libggml.

    Args:
        data: the raw payload (``bytes`` or a uint8 array, e.g. a GGUFReader tensor's ``data``).
        fmt: its GGML type.
        shape: numpy shape of the float tensor (last dimension is the row length).

    Returns:
        float32 array of ``shape``.
    """
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    buf = np.ascontiguousarray(buf.reshape(-1).view(np.uint8))
    shape = tuple(int(d) for d in shape)
    n = int(np.prod(shape))
    expected = (n // shape[-1]) * row_nbytes(fmt, shape[-1])
    if buf.nbytes != expected:
        raise ValueError(f"{fmt} payload has {buf.nbytes} bytes, expected {expected} for shape {shape}")
    if fmt is QuantFormat.F32:
        return buf.view(np.float32).reshape(shape).copy()
    out = np.empty(n, dtype=np.float32)
    fn = _to_float(fmt)
    n_per_row = shape[-1]
    n_rows = n // n_per_row
    row_size = expected // n_rows

    def run(chunk: tuple[int, int]) -> None:
        r0, r1 = chunk
        fn(buf.ctypes.data + r0 * row_size, out[r0 * n_per_row :].ctypes.data_as(_F32P), (r1 - r0) * n_per_row)

    chunks = _row_chunks(n_rows, n_per_row, _default_threads())
    if len(chunks) == 1:  # a small tensor: no thread pool (its start-up cost more than the conversion)
        run(chunks[0])
    else:
        with ThreadPoolExecutor(max_workers=_default_threads()) as pool:
            list(pool.map(run, chunks))
    return out.reshape(shape)
