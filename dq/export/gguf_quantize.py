"""Write a quantized GGUF with exactly the requested type per tensor.

The source is an unquantized GGUF from llama.cpp's converter; its metadata is copied byte for byte,
``general.file_type`` and the quantization keys are set as ``llama_model_quantize`` sets them, and each
tensor is quantized with libggml's ``ggml_quantize_chunk`` (through ``dq.quant.libggml``), one tensor in
memory at a time. MoE expert tensors (3-D) are quantized per expert with that expert's imatrix slice,
as llama.cpp does. The header is built first, so :func:`predict_size` is exact.

Example:
    >>> a = assign_types(read_source_tensors("m-bf16.gguf"), explicit={...})   # doctest: +SKIP
    >>> quantize_gguf("m-bf16.gguf", "m-mix.gguf", a, imatrix=read_imatrix("m.imatrix.gguf"))  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import dq
from dq.errors import ImatrixRequiredError, PlanError
from dq.export import gguf_keys as K
from dq.export.gguf_writer import DEFAULT_ALIGNMENT, GGUFFileWriter
from dq.quant import libggml
from dq.quant.assign import TensorChoice, TypeAssignment
from dq.quant.formats import FORMATS, QuantFormat
from dq.quant.imatrix import Imatrix

__all__ = ["QuantizeResult", "predict_size", "quantize_gguf", "file_type_for", "header_size"]

log = logging.getLogger(__name__)

# enum llama_ftype for a file whose bytes are mostly one type (general.file_type is informational).
_FTYPE = {
    QuantFormat.F32: 0, QuantFormat.F16: 1, QuantFormat.Q4_0: 2, QuantFormat.Q4_1: 3, QuantFormat.Q8_0: 7,
    QuantFormat.Q5_0: 8, QuantFormat.Q5_1: 9, QuantFormat.Q2_K: 10, QuantFormat.Q3_K: 12,
    QuantFormat.Q4_K: 15, QuantFormat.Q5_K: 17, QuantFormat.Q6_K: 18, QuantFormat.IQ2_XXS: 19,
    QuantFormat.IQ2_XS: 20, QuantFormat.IQ3_XXS: 23, QuantFormat.IQ1_S: 24, QuantFormat.IQ4_NL: 25,
    QuantFormat.IQ3_S: 26, QuantFormat.IQ2_S: 28, QuantFormat.IQ4_XS: 30, QuantFormat.IQ1_M: 31,
    QuantFormat.BF16: 32, QuantFormat.TQ1_0: 36, QuantFormat.TQ2_0: 37, QuantFormat.MXFP4: 38,
}


@dataclass(frozen=True)
class QuantizeResult:
    path: Path
    size: int
    assignment: TypeAssignment


def file_type_for(assignment: TypeAssignment, preset_ftype: int | None = None) -> int:
    """``general.file_type``: the preset's ftype, else that of the type holding most bytes."""
    if preset_ftype is not None:
        return preset_ftype
    by_bytes: Counter[QuantFormat] = Counter()
    for c in assignment.choices:
        if len(c.shape) >= 2:
            by_bytes[c.stored] += c.nbytes
    top = by_bytes.most_common(1)[0][0] if by_bytes else QuantFormat.F32
    return _FTYPE.get(top, 1024)  # LLAMA_FTYPE_GUESSED


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


def _build_writer(src_reader, assignment: TypeAssignment, imatrix: Imatrix | None,
                  imatrix_name: str | None, preset_ftype: int | None) -> GGUFFileWriter:
    align_field = src_reader.fields.get(K.GENERAL_ALIGNMENT)
    alignment = int(align_field.contents()) if align_field is not None else DEFAULT_ALIGNMENT
    w = GGUFFileWriter(alignment=alignment)
    for key, field in src_reader.fields.items():
        if key.startswith("GGUF."):  # gguf-py's pseudo-fields for the file header
            continue
        w.add_raw_kv(key, b"".join(np.asarray(p).tobytes() for p in field.parts))
    w.add_uint32(K.GENERAL_QUANTIZATION_VERSION, K.QUANTIZATION_VERSION)
    w.add_uint32(K.GENERAL_FILE_TYPE, file_type_for(assignment, preset_ftype))
    w.add_string(K.DQ_VERSION, dq.__version__)
    if imatrix is not None:
        w.add_string(K.QUANTIZE_IMATRIX_FILE, imatrix_name or "imatrix.gguf")
        if imatrix.datasets:
            w.add_string(K.QUANTIZE_IMATRIX_DATASET, imatrix.datasets[0])
        w.add_int32(K.QUANTIZE_IMATRIX_N_ENTRIES, len(imatrix.entries))
        w.add_int32(K.QUANTIZE_IMATRIX_N_CHUNKS, int(imatrix.chunk_count))
    for c in assignment.choices:
        w.add_tensor_info(c.name, c.shape, c.stored)
    return w


def _open_source(src: str | Path, assignment: TypeAssignment):
    from gguf import GGUFReader

    reader = GGUFReader(src)
    names = [t.name for t in reader.tensors]
    if names != [c.name for c in assignment.choices]:
        raise PlanError(f"the type assignment does not match the tensors of {src}; rebuild it for this file")
    return reader


def predict_size(src: str | Path, assignment: TypeAssignment, *, imatrix: Imatrix | None = None,
                 imatrix_name: str | None = None, preset_ftype: int | None = None) -> int:
    """Exact size in bytes of the file :func:`quantize_gguf` would write with the same arguments."""
    reader = _open_source(src, assignment)
    return _build_writer(reader, assignment, imatrix, imatrix_name, preset_ftype).total_size()


def _payload(choice: TensorChoice, raw: np.ndarray, imatrix: Imatrix | None, n_threads: int | None) -> bytes:
    if choice.stored is choice.source:
        return raw.tobytes()
    values = libggml.dequantize(raw, choice.source, choice.shape)
    ne0 = choice.shape[-1]
    weights = imatrix.weights_for(choice.name) if imatrix is not None else None
    mats = list(values) if values.ndim == 3 else [values.reshape(-1, ne0)]  # experts: one imatrix slice each
    parts = []
    for i, mat in enumerate(mats):
        im = None if weights is None else weights[i if weights.shape[0] > 1 else 0]
        if FORMATS[choice.stored].is_float:
            parts.append(libggml.quantize(mat, choice.stored))
        else:
            parts.append(libggml.quantize(mat, choice.stored, im, n_threads=n_threads))
    return b"".join(parts)


def quantize_gguf(
    src: str | Path,
    dst: str | Path,
    assignment: TypeAssignment,
    *,
    imatrix: Imatrix | None = None,
    imatrix_name: str | None = None,
    preset_ftype: int | None = None,
    n_threads: int | None = None,
    progress: Callable[[TensorChoice, int], None] | None = None,
) -> QuantizeResult:
    """Quantize ``src`` into ``dst`` (atomically) with the types in ``assignment``.

    Args:
        src: unquantized GGUF (BF16/F16/F32 from the converter).
        dst: output path; a temp file beside it is renamed into place only when complete.
        assignment: per-tensor types from :func:`dq.quant.assign.assign_types`.
        imatrix: importance matrix, required for IQ1/IQ2/IQ3_XXS types.
        imatrix_name: recorded as ``quantize.imatrix.file``.
        preset_ftype: ``general.file_type`` to record (default: from the dominant type).
        n_threads: quantizer threads.
        progress: called after each tensor with (choice, bytes written).

    Returns:
        The path, its size (equal to :func:`predict_size`) and the assignment.
    """
    reader = _open_source(src, assignment)
    _check_imatrix(assignment, imatrix)
    writer = _build_writer(reader, assignment, imatrix, imatrix_name, preset_ftype)
    expected = writer.total_size()
    writer.open(dst)
    try:
        for choice, tensor in zip(assignment.choices, reader.tensors):
            raw = np.asarray(tensor.data).reshape(-1).view(np.uint8)
            payload = _payload(choice, raw, imatrix, n_threads)
            writer.write_tensor(choice.name, payload)
            if progress is not None:
                progress(choice, len(payload))
        writer.close()
    except BaseException:
        writer.abort()
        raise
    size = Path(dst).stat().st_size
    assert size == expected, (size, expected)
    return QuantizeResult(Path(dst), size, assignment)


def header_size(src: str | Path, *, imatrix: Imatrix | None = None, imatrix_name: str | None = None) -> int:
    """Exact size of the (padded) header :func:`quantize_gguf` writes for ``src``; it does not depend on
    the tensor types, so a planner can price tensors separately."""
    from dq.quant.assign import assign_types, read_source_tensors

    kept = assign_types(read_source_tensors(src))
    reader = _open_source(src, kept)
    return len(_build_writer(reader, kept, imatrix, imatrix_name, None).header_bytes())
