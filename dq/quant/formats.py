"""The GGML type table: every storage type dq can emit, as data.

All shape <-> byte arithmetic in dq goes through :func:`row_nbytes` and :func:`tensor_nbytes`, which raise
on misalignment instead of rounding. The numbers mirror ``ggml.c``'s ``type_traits`` (and gguf-py's
``GGML_QUANT_SIZES``); ``tests/quant/test_formats.py`` checks every row against the libggml that ships in
the pinned llama-cpp-python wheel.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum

from dq.errors import UnknownFormatError

__all__ = [
    "QuantFormat",
    "FormatSpec",
    "FORMATS",
    "parse_format",
    "row_nbytes",
    "tensor_nbytes",
    "fallback_format",
    "effective_format",
]


class QuantFormat(str, Enum):
    """GGML storage types; values are the GGUF type names, ``value`` of ``ggml_id`` is ggml's enum."""

    F32 = "F32"
    F16 = "F16"
    BF16 = "BF16"
    Q8_0 = "Q8_0"
    Q6_K = "Q6_K"
    Q5_K = "Q5_K"
    Q5_1 = "Q5_1"
    Q5_0 = "Q5_0"
    Q4_K = "Q4_K"
    Q4_1 = "Q4_1"
    Q4_0 = "Q4_0"
    IQ4_NL = "IQ4_NL"
    IQ4_XS = "IQ4_XS"
    MXFP4 = "MXFP4"
    Q3_K = "Q3_K"
    IQ3_S = "IQ3_S"
    IQ3_XXS = "IQ3_XXS"
    Q2_K = "Q2_K"
    IQ2_S = "IQ2_S"
    IQ2_XS = "IQ2_XS"
    IQ2_XXS = "IQ2_XXS"
    TQ2_0 = "TQ2_0"
    IQ1_M = "IQ1_M"
    TQ1_0 = "TQ1_0"
    IQ1_S = "IQ1_S"

    @property
    def spec(self) -> FormatSpec:
        return FORMATS[self]

    def __str__(self) -> str:  # so f-strings and argparse show "Q4_K", not "QuantFormat.Q4_K"
        return self.value


@dataclass(frozen=True)
class FormatSpec:
    """One row of the type table.

    Attributes:
        ggml_id: value of ``enum ggml_type`` (and of ``gguf.GGMLQuantizationType``).
        block_size: weights per block; a row length must be a multiple of it.
        type_size: bytes per block.
        needs_imatrix: llama.cpp refuses to quantize to this type without an importance matrix
            (``tensor_requires_imatrix`` in ``llama-quant.cpp``; a superset of
            ``ggml_quantize_requires_imatrix``, which aborts the process instead of raising).
        fallback: llama.cpp's replacement when a row length is not a multiple of ``block_size``
            (``tensor_type_fallback`` in ``llama-quant.cpp``); ``None`` for types that need none.
        is_float: stored as plain floats (F32/F16/BF16), not blocks.
    """

    ggml_id: int
    block_size: int
    type_size: int
    needs_imatrix: bool = False
    fallback: QuantFormat | None = None
    is_float: bool = False

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.type_size / self.block_size


_F = QuantFormat
# Tables may be long; logic stays short. Fallbacks copied from llama-quant.cpp tensor_type_fallback
# (llama.cpp vendored in llama-cpp-python 0.3.36).
FORMATS: dict[QuantFormat, FormatSpec] = {
    _F.F32: FormatSpec(0, 1, 4, is_float=True),
    _F.F16: FormatSpec(1, 1, 2, is_float=True),
    _F.BF16: FormatSpec(30, 1, 2, is_float=True),
    _F.Q8_0: FormatSpec(8, 32, 34),
    _F.Q6_K: FormatSpec(14, 256, 210, fallback=_F.Q8_0),
    _F.Q5_K: FormatSpec(13, 256, 176, fallback=_F.Q5_1),
    _F.Q5_1: FormatSpec(7, 32, 24),
    _F.Q5_0: FormatSpec(6, 32, 22),
    _F.Q4_K: FormatSpec(12, 256, 144, fallback=_F.Q5_0),
    _F.Q4_1: FormatSpec(3, 32, 20),
    _F.Q4_0: FormatSpec(2, 32, 18),
    _F.IQ4_NL: FormatSpec(20, 32, 18),
    _F.IQ4_XS: FormatSpec(23, 256, 136, fallback=_F.IQ4_NL),
    _F.MXFP4: FormatSpec(39, 32, 17),
    _F.Q3_K: FormatSpec(11, 256, 110, fallback=_F.Q4_0),
    _F.IQ3_S: FormatSpec(21, 256, 110, fallback=_F.IQ4_NL),
    _F.IQ3_XXS: FormatSpec(18, 256, 98, needs_imatrix=True, fallback=_F.IQ4_NL),
    _F.Q2_K: FormatSpec(10, 256, 84, fallback=_F.Q4_0),
    _F.IQ2_S: FormatSpec(22, 256, 82, needs_imatrix=True, fallback=_F.IQ4_NL),
    _F.IQ2_XS: FormatSpec(17, 256, 74, needs_imatrix=True, fallback=_F.IQ4_NL),
    _F.IQ2_XXS: FormatSpec(16, 256, 66, needs_imatrix=True, fallback=_F.IQ4_NL),
    _F.TQ2_0: FormatSpec(35, 256, 66, fallback=_F.Q4_0),
    _F.IQ1_M: FormatSpec(29, 256, 56, needs_imatrix=True, fallback=_F.IQ4_NL),
    _F.TQ1_0: FormatSpec(34, 256, 54, fallback=_F.Q4_0),
    _F.IQ1_S: FormatSpec(19, 256, 50, needs_imatrix=True, fallback=_F.IQ4_NL),
}

_BY_ID: dict[int, QuantFormat] = {spec.ggml_id: fmt for fmt, spec in FORMATS.items()}


def parse_format(name: str | int | QuantFormat) -> QuantFormat:
    """Parse a GGML type name (case-insensitive, ``q4_k`` or ``Q4_K``) or ggml id into a QuantFormat.

    Raises:
        UnknownFormatError: naming the value and listing the valid names.
    """
    if isinstance(name, QuantFormat):
        return name
    if isinstance(name, int):
        if name in _BY_ID:
            return _BY_ID[name]
        raise UnknownFormatError(f"unknown GGML type id {name}; dq supports ids {sorted(_BY_ID)}")
    key = str(name).strip().upper()
    try:
        return QuantFormat(key)
    except ValueError:
        valid = ", ".join(f.value for f in QuantFormat)
        raise UnknownFormatError(f"unknown GGML type {name!r}; choose one of: {valid}") from None


def row_nbytes(fmt: QuantFormat, n_per_row: int) -> int:
    """Bytes of one row of ``n_per_row`` weights stored as ``fmt`` (ggml_row_size).

    Raises:
        ValueError: if ``n_per_row`` is not a multiple of the format's block size.

    Example:
        >>> row_nbytes(QuantFormat.Q4_K, 512)
        288
    """
    spec = FORMATS[fmt]
    if n_per_row <= 0 or n_per_row % spec.block_size:
        raise ValueError(
            f"row length {n_per_row} is not a positive multiple of {fmt}'s block size {spec.block_size}; "
            f"use effective_format() to get llama.cpp's fallback type"
        )
    return n_per_row // spec.block_size * spec.type_size


def tensor_nbytes(fmt: QuantFormat, shape: Sequence[int]) -> int:
    """Bytes of a tensor of numpy ``shape`` (rows last dim is the row length) stored as ``fmt``."""
    if not shape:
        raise ValueError("a tensor needs at least one dimension")
    n_rows = 1
    for d in shape[:-1]:
        n_rows *= int(d)
    return n_rows * row_nbytes(fmt, int(shape[-1]))


def fallback_format(fmt: QuantFormat, n_per_row: int) -> QuantFormat:
    """llama.cpp's replacement type for a row length that ``fmt`` cannot hold.

    Mirrors ``tensor_type_fallback``: a 256-block type falls back to its 32-block twin, and a row that
    even that cannot hold is stored as F16.
    """
    spec = FORMATS[fmt]
    if n_per_row % spec.block_size == 0:
        return fmt
    out = spec.fallback if spec.fallback is not None else fmt
    if n_per_row % FORMATS[out].block_size:
        out = QuantFormat.F16
    return out


def effective_format(fmt: QuantFormat, shape: Sequence[int]) -> QuantFormat:
    """The type a tensor of ``shape`` is really stored in when ``fmt`` is requested."""
    return fallback_format(fmt, int(shape[-1]))
