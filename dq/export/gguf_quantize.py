"""Write a quantized GGUF with exactly the requested type per tensor.

The source is an unquantized GGUF from llama.cpp's converter; its metadata is copied byte for byte,
``general.file_type`` and the quantization keys are set as ``llama_model_quantize`` sets them, and each
tensor is quantized with libggml's ``ggml_quantize_chunk`` (through ``dq.quant.libggml``) on one thread
pool for the whole file, or on a GPU by dq's kernels (``device="cuda"``, the same bytes;
:mod:`dq.export.tensor_quantizers`), while a writer thread writes the tensor before it: at most two
tensors are in memory at a time. MoE expert tensors (3-D) are quantized per expert with that expert's
imatrix slice, as llama.cpp does. The header is built first (:mod:`dq.quant.layout`), so :func:`dq.quant.layout.predict_size` is exact.

Example:
    >>> a = assign_types(read_source_tensors("m-bf16.gguf"), explicit={...})   # doctest: +SKIP
    >>> quantize_gguf("m-bf16.gguf", "m-mix.gguf", a, imatrix=read_imatrix("m.imatrix.gguf"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dq.errors import ImatrixRequiredError, PlanError
from dq.export.tensor_quantizers import KernelQuantizer, LibggmlQuantizer
from dq.quant import libggml
from dq.quant.assign import TensorChoice, TypeAssignment
from dq.quant.formats import FORMATS, tensor_nbytes
from dq.quant.gguf_split import shard_paths
from dq.quant.imatrix import Imatrix
from dq.quant.layout import build_shard_writers, open_source

if TYPE_CHECKING:
    from dq.export.tensor_cache import TensorCache
    from dq.quant.gguf_header import GGUFHeader

__all__ = ["QuantizeResult", "quantize_gguf"]

log = logging.getLogger(__name__)

Quantizer = Callable[[TensorChoice, np.ndarray, "np.ndarray | None"], "bytes | np.ndarray"]


@dataclass(frozen=True)
class QuantizeResult:
    path: Path  # the file, or the first shard of a split
    size: int  # all shards together
    assignment: TypeAssignment
    files: tuple[Path, ...] = ()  # every file written (the shards of a split, in order)


def _check_imatrix(assignment: TypeAssignment, imatrix: Imatrix | None) -> None:
    for c in assignment.choices:
        if c.stored is c.source or not FORMATS[c.stored].needs_imatrix:
            continue
        if imatrix is None or c.name not in imatrix.entries:
            where = "no --imatrix was given" if imatrix is None else f"the imatrix has no entry for {c.name}"
            raise ImatrixRequiredError(
                f"{c.name} is to be stored as {c.stored}, which needs an importance matrix, but {where}; "
                f"pass --imatrix FILE (from `dq analyze`) or choose a type that needs none (e.g. Q2_K, Q3_K)"
            )
        n_mat = imatrix.entries[c.name].sums.shape
        expected = (c.shape[0] if len(c.shape) == 3 else 1, c.shape[-1])
        if tuple(n_mat) != expected:
            raise PlanError(f"imatrix entry for {c.name} has shape {n_mat}, expected {expected}: wrong model?")


def quantize_gguf(
    src: str | Path | GGUFHeader,
    dst: str | Path,
    assignment: TypeAssignment,
    *,
    imatrix: Imatrix | None = None,
    imatrix_name: str | None = None,
    preset_ftype: int | None = None,
    n_threads: int | None = None,
    progress: Callable[[TensorChoice, int], None] | None = None,
    tensor_cache: TensorCache | None = None,
    split_max_bytes: int = 0,
    device: str = "cpu",
    kernels: bool | None = None,
) -> QuantizeResult:
    """Quantize ``src`` into ``dst`` (atomically) with the types in ``assignment``.

    Args:
        src: unquantized GGUF (BF16/F16/F32 from the converter), or its header already parsed
            (:func:`dq.quant.gguf_header.read_gguf_header`; the header is then not read again).
        dst: output path; a temp file beside it is renamed into place only when complete.
        assignment: per-tensor types from :func:`dq.quant.assign.assign_types`.
        imatrix: importance matrix, required for IQ1/IQ2/IQ3_XXS types.
        imatrix_name: recorded as ``quantize.imatrix.file``.
        preset_ftype: ``general.file_type`` to record (default: from the dominant type).
        n_threads: quantizer threads (default: CPU count, at most 8).
        progress: called after each tensor with (choice, bytes written).
        tensor_cache: reuse (and keep) quantized tensor bytes across calls (:mod:`dq.export.tensor_cache`).
        split_max_bytes: write llama.cpp's split layout, shards of at most this many payload bytes
            (``dst``'s stem + ``-0000k-of-0000n.gguf``; :mod:`dq.quant.gguf_split`); 0 = one file.
        device: where tensors are quantized: ``cpu`` (libggml) or a CUDA device (dq's kernels).
        kernels: use dq's kernels on ``device`` (default: for any device but ``cpu``); ``kernels=True`` with
            ``device="cpu"`` runs the torch ports on the CPU (what the tests compare with libggml).

    Returns:
        The path, its size (equal to :func:`predict_size`) and the assignment.
    """
    header = open_source(src, assignment)
    _check_imatrix(assignment, imatrix)
    writers = build_shard_writers(header, assignment, imatrix, imatrix_name, preset_ftype, split_max_bytes)
    paths = shard_paths(dst, len(writers))
    expected = sum(w.total_size() for w, _ in writers)
    n_threads = n_threads or libggml.default_threads()
    done: list[Path] = []
    with ThreadPoolExecutor(n_threads, thread_name_prefix="dq-quant") as pool, \
            ThreadPoolExecutor(1, thread_name_prefix="dq-write") as io:
        quantizer: Quantizer = LibggmlQuantizer(n_threads, pool)
        if kernels if kernels is not None else str(device) != "cpu":
            quantizer = KernelQuantizer(device, quantizer)
        try:
            for (writer, idx), path in zip(writers, paths):
                writer.open(path)
                pending: Future | None = None  # the previous tensor's write
                try:
                    for i in idx:
                        choice, tensor = assignment.choices[i], header.tensors[i]
                        payload = _cached_payload(choice, tensor, header, imatrix, quantizer, tensor_cache)
                        if pending is not None:
                            pending.result()
                        pending = io.submit(writer.write_tensor, choice.name, payload)
                        if progress is not None:
                            progress(choice, _nbytes(payload))
                    if pending is not None:
                        pending.result()
                    writer.close()
                except BaseException:
                    if pending is not None:
                        pending.cancel()
                        _wait_quietly(pending)
                    writer.abort()
                    raise
                done.append(path)
        except BaseException:
            for path in done:  # all shards or none
                path.unlink(missing_ok=True)
            raise
    size = sum(p.stat().st_size for p in paths)
    if size != expected:
        raise RuntimeError(f"{dst} has {size:,} bytes where its header promised {expected:,} (a bug in dq)")
    return QuantizeResult(paths[0], size, assignment, tuple(paths))


def _nbytes(payload: bytes | np.ndarray) -> int:
    return payload.nbytes if isinstance(payload, np.ndarray) else len(payload)


def _wait_quietly(f: Future) -> None:
    try:
        f.result()
    except BaseException:  # the error being raised already says what went wrong  # noqa: BLE001
        pass


def _cached_payload(choice: TensorChoice, tensor, header: GGUFHeader, imatrix: Imatrix | None, quantizer: Quantizer,
                    tensor_cache: TensorCache | None) -> bytes | np.ndarray:
    raw = header.tensor_bytes(tensor, tensor_nbytes(choice.source, choice.shape))
    weights = imatrix.weights_for(choice.name) if imatrix is not None else None
    if tensor_cache is None or choice.stored is choice.source:
        return quantizer(choice, raw, weights)
    digest = tensor_cache.source_digest(header.path, choice.name, raw)
    payload = tensor_cache.get(digest, choice.stored, weights, choice.nbytes)
    if payload is None:
        payload = quantizer(choice, raw, weights)
        tensor_cache.put(digest, choice.stored, weights, payload)
    return payload
