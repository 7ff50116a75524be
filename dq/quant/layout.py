"""The layout of a quantized GGUF: its metadata, tensor table and size, before any tensor is written.

The header does not depend on the tensor types, so the planner prices a file exactly (:func:`header_size`
plus each tensor's padded bytes) and the writer (:mod:`dq.export.gguf_quantize`) builds its header with the
same :func:`build_writer`. Metadata is the source GGUF's, byte for byte, plus ``general.file_type`` and the
quantization keys as ``llama_model_quantize`` sets them.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import dq
from dq.errors import PlanError
from dq.quant import gguf_keys as K
from dq.quant.assign import TypeAssignment
from dq.quant.formats import QuantFormat
from dq.quant.gguf_header import GGUFHeader, read_gguf_header
from dq.quant.gguf_split import plan_shards, split_kvs
from dq.quant.gguf_writer import GGUFFileWriter
from dq.quant.imatrix import Imatrix

__all__ = ["file_type_for", "build_writer", "build_shard_writers", "open_source", "predict_size", "header_size"]

# enum llama_ftype for a file whose bytes are mostly one type (general.file_type is informational).
_FTYPE = {
    QuantFormat.F32: 0, QuantFormat.F16: 1, QuantFormat.Q4_0: 2, QuantFormat.Q4_1: 3, QuantFormat.Q8_0: 7,
    QuantFormat.Q5_0: 8, QuantFormat.Q5_1: 9, QuantFormat.Q2_K: 10, QuantFormat.Q3_K: 12,
    QuantFormat.Q4_K: 15, QuantFormat.Q5_K: 17, QuantFormat.Q6_K: 18, QuantFormat.IQ2_XXS: 19,
    QuantFormat.IQ2_XS: 20, QuantFormat.IQ3_XXS: 23, QuantFormat.IQ1_S: 24, QuantFormat.IQ4_NL: 25,
    QuantFormat.IQ3_S: 26, QuantFormat.IQ2_S: 28, QuantFormat.IQ4_XS: 30, QuantFormat.IQ1_M: 31,
    QuantFormat.BF16: 32, QuantFormat.TQ1_0: 36, QuantFormat.TQ2_0: 37, QuantFormat.MXFP4: 38,
}


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


def build_writer(src: GGUFHeader, assignment: TypeAssignment, imatrix: Imatrix | None,
                 imatrix_name: str | None, preset_ftype: int | None) -> GGUFFileWriter:
    """The quantized file's header: ``src``'s KV pairs byte for byte, the quantization keys, the tensor table."""
    w = GGUFFileWriter(alignment=src.alignment)
    for key, raw in src.kv.items():
        w.add_raw_kv(key, raw)
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


def build_shard_writers(src: GGUFHeader, assignment: TypeAssignment, imatrix: Imatrix | None,
                        imatrix_name: str | None, preset_ftype: int | None,
                        split_max_bytes: int = 0) -> list[tuple[GGUFFileWriter, list[int]]]:
    """One writer per shard of llama.cpp's split layout (:mod:`dq.quant.gguf_split`) and the indices of the
    assignment's tensors it holds; a single writer when ``split_max_bytes`` is 0 or everything fits."""
    full = build_writer(src, assignment, imatrix, imatrix_name, preset_ftype)
    shards = plan_shards([c.nbytes for c in assignment.choices], split_max_bytes)
    if len(shards) == 1:
        return [(full, shards[0])]
    out = []
    for k, idx in enumerate(shards):
        w = GGUFFileWriter(alignment=src.alignment)
        kv = full.kv_pairs() if k == 0 else {key: raw for key, raw in full.kv_pairs().items()
                                             if key == K.GENERAL_ALIGNMENT}
        for key, raw in {**kv, **split_kvs(k, len(shards), len(assignment.choices))}.items():
            w.add_raw_kv(key, raw)
        for i in idx:
            c = assignment.choices[i]
            w.add_tensor_info(c.name, c.shape, c.stored)
        out.append((w, idx))
    return out


def open_source(src: str | Path | GGUFHeader, assignment: TypeAssignment) -> GGUFHeader:
    """``src``'s header, checked against ``assignment``'s tensor list."""
    header = src if isinstance(src, GGUFHeader) else read_gguf_header(src)
    if [t.name for t in header.tensors] != [c.name for c in assignment.choices]:
        raise PlanError(f"the type assignment does not match the tensors of {header.path}; rebuild it for this file")
    return header


def predict_size(src: str | Path | GGUFHeader, assignment: TypeAssignment, *, imatrix: Imatrix | None = None,
                 imatrix_name: str | None = None, preset_ftype: int | None = None, split_max_bytes: int = 0) -> int:
    """Exact size in bytes of the file :func:`quantize_gguf` would write with the same arguments."""
    header = open_source(src, assignment)
    return sum(w.total_size() for w, _ in build_shard_writers(header, assignment, imatrix, imatrix_name, preset_ftype,
                                                                split_max_bytes))


def header_size(src: str | Path | GGUFHeader, *, imatrix: Imatrix | None = None, imatrix_name: str | None = None) -> int:
    """Exact size of the (padded) header :func:`quantize_gguf` writes for ``src``; it does not depend on
    the tensor types, so a planner can price tensors separately."""
    from dq.quant.assign import assign_types, read_source_tensors

    header = src if isinstance(src, GGUFHeader) else read_gguf_header(src)
    kept = assign_types(read_source_tensors(header))
    return len(build_writer(header, kept, imatrix, imatrix_name, None).header_bytes())
