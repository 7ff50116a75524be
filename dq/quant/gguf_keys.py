"""GGUF metadata keys dq reads or writes, as constants (never literals in code), after gguf-py's ``Keys``."""

from __future__ import annotations

from gguf import Keys

GENERAL_TYPE = Keys.General.TYPE  # "general.type"
GENERAL_ARCHITECTURE = Keys.General.ARCHITECTURE
GENERAL_ALIGNMENT = Keys.General.ALIGNMENT
GENERAL_FILE_TYPE = Keys.General.FILE_TYPE
GENERAL_QUANTIZATION_VERSION = Keys.General.QUANTIZATION_VERSION
GENERAL_QUANTIZED_BY = Keys.General.QUANTIZED_BY

# tools/imatrix and common/imatrix-loader.h
IMATRIX_DATASETS = "imatrix.datasets"
IMATRIX_CHUNK_COUNT = "imatrix.chunk_count"
IMATRIX_CHUNK_SIZE = "imatrix.chunk_size"

# src/llama-quant.cpp writes these when quantizing with an imatrix (LLM_KV_QUANTIZE_IMATRIX_*)
QUANTIZE_IMATRIX_FILE = "quantize.imatrix.file"
QUANTIZE_IMATRIX_DATASET = "quantize.imatrix.dataset"
QUANTIZE_IMATRIX_N_ENTRIES = "quantize.imatrix.entries_count"
QUANTIZE_IMATRIX_N_CHUNKS = "quantize.imatrix.chunks_count"

# dq's own provenance
DQ_VERSION = "dq.version"
DQ_PLAN_SOURCE = "dq.plan.source"

# GGML_QNT_VERSION in ggml.h
QUANTIZATION_VERSION = 2
