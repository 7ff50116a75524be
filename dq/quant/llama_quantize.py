"""llama.cpp's own ``llama_model_quantize`` (what ``llama-quantize`` runs), called from Python.

dq uses it for two things: to learn which type llama.cpp's preset mixes (``Q4_K_M``, ``IQ2_XXS``, ...)
give each tensor (a dry run; llama.cpp's per-tensor decisions reach us only through its log, which is
captured for the duration of the call), and as the reference writer that dq's own GGUF writer is tested
and benchmarked against.
"""

from __future__ import annotations

import contextlib
import ctypes
import re
import threading
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from dq.atomic import atomic_path
from dq.errors import UnknownFormatError
from dq.quant.formats import FORMATS, QuantFormat, parse_format

__all__ = ["PRESETS", "parse_preset", "LlamaQuantizeResult", "llama_quantize"]

# llama-quantize's QUANT_OPTIONS (tools/quantize/quantize.cpp) -> enum llama_ftype (include/llama.h).
PRESETS: dict[str, int] = {
    "Q4_0": 2, "Q4_1": 3, "Q5_0": 8, "Q5_1": 9, "Q8_0": 7, "F16": 1, "BF16": 32, "F32": 0,
    "IQ2_XXS": 19, "IQ2_XS": 20, "IQ2_S": 28, "IQ2_M": 29, "IQ1_S": 24, "IQ1_M": 31,
    "TQ1_0": 36, "TQ2_0": 37, "Q2_K": 10, "Q2_K_S": 21, "IQ3_XXS": 23, "IQ3_S": 26, "IQ3_M": 27,
    "Q3_K": 12, "IQ3_XS": 22, "Q3_K_S": 11, "Q3_K_M": 12, "Q3_K_L": 13, "IQ4_NL": 25, "IQ4_XS": 30,
    "Q4_K": 15, "Q4_K_S": 14, "Q4_K_M": 15, "Q5_K": 17, "Q5_K_S": 16, "Q5_K_M": 17, "Q6_K": 18,
    "MXFP4_MOE": 38,
}

# "[  12/ 272]   blk.0.attn_q.weight - [  576,   576,     1,     1], type =   bf16, size = ... (q4_K)"
_TENSOR_LINE = re.compile(
    r"\[\s*\d+/\s*\d+\]\s+(?P<name>\S+)\s+-\s+\[[^\]]*\],\s+type\s+=\s+(?P<src>\S+),\s+"
    r"(?:converting to\s+(?P<conv>\S+)\s+\.\.\s+)?"
    r"size\s+=\s+[\d.]+\s+MiB(?:\s+->\s+[\d.]+\s+MiB\s+\((?P<dst>[^)]+)\))?"
)
# "warning: blk.0.attn_q.weight - ncols    576 not divisible by 256 (required for type    q4_K) "
_FALLBACK_LINE = re.compile(r"warning:\s+(?P<name>\S+)\s+-\s+ncols\s+\d+\s+not divisible by\s+\d+\s+"
                            r"\(required for type\s+(?P<req>[^)\s]+)\)")
_QUANTIZE_LOCK = threading.Lock()  # llama_log_set is process-wide: one capture at a time


def parse_preset(name: str) -> str:
    """Normalise a llama-quantize preset name (``q4_k_m`` -> ``Q4_K_M``) or raise with the valid set."""
    key = name.strip().upper()
    if key not in PRESETS:
        raise UnknownFormatError(f"unknown llama.cpp preset {name!r}; choose one of: {', '.join(PRESETS)}")
    return key


@dataclass(frozen=True)
class LlamaQuantizeResult:
    """Per-tensor types llama.cpp chose (``types``, after its block-size fallback), the type it wanted
    where it fell back (``requested``), and its full log."""

    types: dict[str, QuantFormat]
    requested: dict[str, QuantFormat]
    log: str


@contextlib.contextmanager
def _captured_llama_log() -> Iterator[list[str]]:
    import llama_cpp

    chunks: list[str] = []

    @llama_cpp.llama_log_callback
    def _callback(level: int, text: bytes, user_data: ctypes.c_void_p) -> None:
        chunks.append(text.decode("utf-8", "replace"))

    with _QUANTIZE_LOCK:
        llama_cpp.llama_log_set(_callback, ctypes.c_void_p(0))
        try:
            yield chunks
        finally:
            from llama_cpp import _logger

            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))


def _parse_types(log: str) -> dict[str, QuantFormat]:
    types: dict[str, QuantFormat] = {}
    for m in _TENSOR_LINE.finditer(log):
        types[m.group("name")] = parse_format(m.group("dst") or m.group("conv") or m.group("src"))
    return types


def llama_quantize(
    src: str | Path,
    dst: str | Path | None,
    preset: str,
    *,
    overrides: Sequence[tuple[str, QuantFormat]] = (),
    imatrix: Mapping[str, np.ndarray] | None = None,
    dry_run: bool = False,
    n_threads: int = 0,
    pure: bool = False,
) -> LlamaQuantizeResult:
    """Run llama.cpp's ``llama_model_quantize``.

    Args:
        src: BF16/F16/F32 GGUF.
        dst: output GGUF (ignored when ``dry_run``).
        preset: a :data:`PRESETS` name.
        overrides: ``(regex, type)`` pairs, llama-quantize's ``--tensor-type`` (first match wins).
        imatrix: tensor name -> float32 importance vector (``ne0 * n_expert`` values, already divided by
            counts, as ``tools/quantize`` passes it).
        dry_run: only decide types and sizes.
        n_threads: 0 = hardware concurrency.
        pure: llama-quantize ``--pure``.

    Returns:
        The type llama.cpp gave each tensor, parsed from its log, and the log.

    Raises:
        RuntimeError: llama.cpp failed; the message carries its log's tail.
    """
    import llama_cpp

    preset = parse_preset(preset)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = PRESETS[preset]
    params.nthread = n_threads
    params.dry_run = dry_run
    params.pure = pure
    keep: list[object] = []  # keep ctypes buffers alive for the call
    if overrides:
        arr = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, fmt) in enumerate(overrides):
            arr[i].pattern = pattern.encode()
            arr[i].type = FORMATS[parse_format(fmt)].ggml_id
        arr[len(overrides)].pattern = None
        params.tt_overrides = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_tensor_override))
        keep.append(arr)
    if imatrix:
        arr = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(sorted(imatrix.items())):
            v = np.ascontiguousarray(values, dtype=np.float32)
            keep.append(v)
            arr[i].name = name.encode()
            arr[i].data = v.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            arr[i].size = v.size
        arr[len(imatrix)].name = None
        params.imatrix = ctypes.cast(arr, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
        keep.append(arr)
    # llama.cpp writes its output in place; a failure (or a kill) midway would leave a truncated GGUF under the
    # final name, which a later run would take for a finished file: write beside it and rename when done
    with contextlib.ExitStack() as stack:
        out = "/dev/null" if dst is None or dry_run else str(stack.enter_context(atomic_path(dst)))
        with _captured_llama_log() as chunks:
            rc = llama_cpp.llama_model_quantize(str(src).encode(), out.encode(), ctypes.byref(params))
        log = "".join(chunks)
        if rc != 0:
            raise RuntimeError(f"llama_model_quantize failed ({rc}):\n" + "\n".join(log.splitlines()[-12:]))
    requested = {m.group("name"): parse_format(m.group("req")) for m in _FALLBACK_LINE.finditer(log)}
    return LlamaQuantizeResult(types=_parse_types(log), requested=requested, log=log)
