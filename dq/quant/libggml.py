"""llama.cpp's own quantizers, called through ctypes from the pinned llama-cpp-python wheel.

``quantize`` wraps ``ggml_quantize_chunk`` (every GGML type, imatrix included) and ``dequantize`` wraps
each type's ``to_float`` from ``ggml_get_type_traits``. Both are bit-exact with llama-quantize, because
they are the same C code. ctypes releases the GIL, so row chunks run on a thread pool: each worker takes
the next chunk of 16K-256K weights as it finishes one, as llama-quantize's threads do. A caller that converts
many tensors passes one ``pool`` to every call, so threads are not started and joined per tensor.

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
import itertools
import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from dq.errors import ImatrixRequiredError
from dq.quant.formats import FORMATS, QuantFormat, row_nbytes

__all__ = ["quantize", "requantize", "requantize_array", "dequantize", "default_threads", "library_path", "ggml_block_size", "ggml_type_size"]

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


def default_threads() -> int:
    """Quantizer threads when none are asked for: the CPU count, at most 8."""
    return max(1, min(8, os.cpu_count() or 1))


def _row_chunks(n_rows: int, n_per_row: int, n_threads: int) -> list[tuple[int, int]]:
    # ~32 chunks per thread, of 16K..256K weights: the threads finish a tensor within a small chunk of
    # each other (a thread idle at each tensor's end is what made dq slower than llama-quantize), and
    # the per-chunk cost of ctypes stays small
    target = min(1 << 18, max(1 << 14, n_rows * n_per_row // (32 * n_threads)))
    rows_per = max(1, target // max(1, n_per_row))
    return [(r, min(n_rows, r + rows_per)) for r in range(0, n_rows, rows_per)]


def _map_chunks(run: Callable[[tuple[int, int]], object], chunks: list[tuple[int, int]], n_threads: int,
                pool: ThreadPoolExecutor | None) -> list:
    """``[run(c) for c in chunks]`` on ``n_threads`` workers that each take the next chunk when free."""
    n_workers = min(n_threads, len(chunks))
    if n_workers <= 1:
        return [run(c) for c in chunks]
    results: list = [None] * len(chunks)
    ticket = itertools.count()  # next() on a count is atomic under the GIL

    def worker() -> None:
        while (i := next(ticket)) < len(chunks):
            results[i] = run(chunks[i])

    own = pool is None
    pool = pool or ThreadPoolExecutor(max_workers=n_workers)
    try:
        for f in [pool.submit(worker) for _ in range(n_workers)]:
            f.result()
    finally:
        if own:
            pool.shutdown()
    return results


def quantize(
    weights: np.ndarray,
    fmt: QuantFormat,
    imatrix: np.ndarray | None = None,
    *,
    n_threads: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> bytes:
    """Quantize a 2-D float array with llama.cpp's ``ggml_quantize_chunk``.

    Args:
        weights: ``[rows, n_per_row]`` array; converted to contiguous float32.
        fmt: target type; ``n_per_row`` must be a multiple of its block size.
        imatrix: optional ``[n_per_row]`` importance weights (mean squared activation per input column).
        n_threads: worker threads over row chunks (default: CPU count, at most 8).
        pool: run them on this executor (with at least ``n_threads`` workers) instead of a new one.

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
    im = _checked_imatrix(fmt, imatrix, n_per_row)
    if fmt is QuantFormat.F32:
        return w.tobytes()
    out = np.empty(n_rows * row_size, dtype=np.uint8)
    quantize_rows = _row_quantizer(fmt, n_per_row, im)

    def run(chunk: tuple[int, int]) -> int:
        r0, r1 = chunk
        return quantize_rows(w[r0:r1].ctypes.data_as(_F32P), out.ctypes.data + r0 * row_size, r1 - r0)

    n_threads = n_threads or default_threads()
    _check_written(_map_chunks(run, _row_chunks(n_rows, n_per_row, n_threads), n_threads, pool), out, fmt)
    return out.tobytes()


def requantize(
    data: bytes | np.ndarray,
    source: QuantFormat,
    shape: Sequence[int],
    fmt: QuantFormat,
    imatrix: np.ndarray | None = None,
    *,
    n_threads: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> bytes:
    """``quantize(dequantize(data, source, shape), fmt, imatrix)`` without the whole float32 tensor.

    Returns ``bytes``; :func:`requantize_array` returns the same payload as the uint8 array it was written
    into, without the copy (what a writer that takes any buffer wants).

    Each row chunk is converted to float32 and quantized by the same worker while it is in its cache;
    no step waits for the whole tensor, and only a chunk per thread of float32 exists at a time.
    The bytes are those of ``quantize`` (the same C calls on the same rows).

    Args:
        data: the ``source`` payload of a ``[rows, n_per_row]`` tensor (``shape``'s last dimension is the row).
        source: its GGML type (BF16/F16/F32 from the converter, or any type with a ``to_float``).
        shape: the tensor's shape; all but the last dimension are rows.
        fmt, imatrix, n_threads, pool: as for :func:`quantize`.
    """
    return requantize_array(data, source, shape, fmt, imatrix, n_threads=n_threads, pool=pool).tobytes()


def requantize_array(
    data: bytes | np.ndarray,
    source: QuantFormat,
    shape: Sequence[int],
    fmt: QuantFormat,
    imatrix: np.ndarray | None = None,
    *,
    n_threads: int | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> np.ndarray:
    """:func:`requantize`'s payload as a flat uint8 array (no copy into ``bytes``)."""
    shape = tuple(int(d) for d in shape)
    n_per_row = shape[-1]
    n_rows = int(np.prod(shape[:-1], dtype=np.int64)) if len(shape) > 1 else 1
    buf = _payload_buffer(data, source, n_rows, n_per_row)
    row_size = row_nbytes(fmt, n_per_row)
    im = _checked_imatrix(fmt, imatrix, n_per_row)
    if fmt is QuantFormat.F32:
        return dequantize(buf, source, shape, n_threads=n_threads, pool=pool).reshape(-1).view(np.uint8)
    src_row = buf.nbytes // n_rows
    out = np.empty(n_rows * row_size, dtype=np.uint8)
    to_float = None if source is QuantFormat.F32 else _to_float(source)
    quantize_rows = _row_quantizer(fmt, n_per_row, im)

    def run(chunk: tuple[int, int]) -> int:
        r0, r1 = chunk
        if to_float is None:
            src = ctypes.cast(buf.ctypes.data + r0 * src_row, _F32P)
        else:
            tmp = np.empty((r1 - r0) * n_per_row, dtype=np.float32)
            to_float(buf.ctypes.data + r0 * src_row, tmp.ctypes.data_as(_F32P), tmp.size)
            src = tmp.ctypes.data_as(_F32P)
        return quantize_rows(src, out.ctypes.data + r0 * row_size, r1 - r0)

    n_threads = n_threads or default_threads()
    _check_written(_map_chunks(run, _row_chunks(n_rows, n_per_row, n_threads), n_threads, pool), out, fmt)
    return out


def _checked_imatrix(fmt: QuantFormat, imatrix: np.ndarray | None, n_per_row: int) -> np.ndarray | None:
    if FORMATS[fmt].needs_imatrix and imatrix is None:
        raise ImatrixRequiredError(
            f"{fmt} needs an importance matrix (llama.cpp refuses it without one); pass --imatrix FILE "
            f"(from `dq analyze` or llama-imatrix) or choose a type that does not need one, e.g. Q2_K"
        )
    if imatrix is None:
        return None
    im = np.ascontiguousarray(imatrix, dtype=np.float32)
    if im.shape != (n_per_row,):
        raise ValueError(f"imatrix has shape {im.shape}, expected ({n_per_row},) for rows of {n_per_row}")
    return im


def _row_quantizer(fmt: QuantFormat, n_per_row: int, im: np.ndarray | None) -> Callable[..., int]:
    """``f(src_f32_ptr, dst_address, n_rows) -> bytes written``: ggml_quantize_chunk for whole rows."""
    _init_type(fmt)
    lib, ggml_id = _lib(), FORMATS[fmt].ggml_id
    im_ptr = im.ctypes.data_as(_F32P) if im is not None else None

    def quantize_rows(src, dst: int, n_rows: int) -> int:
        return lib.ggml_quantize_chunk(ggml_id, src, dst, 0, n_rows, n_per_row, im_ptr)

    return quantize_rows


def _check_written(written: list[int], out: np.ndarray, fmt: QuantFormat) -> None:
    if sum(written) != out.nbytes:
        raise RuntimeError(f"ggml_quantize_chunk wrote {sum(written):,} bytes of {fmt}, expected {out.nbytes:,}: "
                           f"is the installed llama-cpp-python the pinned 0.3.36?")


def _payload_buffer(data: bytes | np.ndarray, fmt: QuantFormat, n_rows: int, n_per_row: int) -> np.ndarray:
    buf = np.frombuffer(data, dtype=np.uint8) if isinstance(data, (bytes, bytearray, memoryview)) else data
    buf = np.ascontiguousarray(buf.reshape(-1).view(np.uint8))
    expected = n_rows * row_nbytes(fmt, n_per_row)
    if buf.nbytes != expected:
        raise ValueError(f"{fmt} payload has {buf.nbytes} bytes, expected {expected} for {n_rows} rows of {n_per_row}")
    return buf


def dequantize(data: bytes | np.ndarray, fmt: QuantFormat, shape: Sequence[int], *,
               n_threads: int | None = None, pool: ThreadPoolExecutor | None = None) -> np.ndarray:
    """Dequantize a GGUF tensor payload with the type's ``to_float`` from libggml.

    Args:
        data: the raw payload (``bytes`` or a uint8 array, e.g. a GGUFReader tensor's ``data``).
        fmt: its GGML type.
        shape: numpy shape of the float tensor (last dimension is the row length).
        n_threads: worker threads over row chunks (default: CPU count, at most 8).
        pool: run them on this executor instead of a new one.

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

    n_threads = n_threads or default_threads()
    _map_chunks(run, _row_chunks(n_rows, n_per_row, n_threads), n_threads, pool)
    return out.reshape(shape)
