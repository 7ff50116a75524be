"""The type table against libggml's own numbers, and the size arithmetic against hand computation."""

from __future__ import annotations

import pytest

from dq.errors import UnknownFormatError
from dq.quant import libggml
from dq.quant.formats import (
    FORMATS,
    QuantFormat,
    effective_format,
    fallback_format,
    parse_format,
    row_nbytes,
    tensor_nbytes,
)


@pytest.mark.parametrize("fmt", list(QuantFormat), ids=str)
def test_table_matches_libggml(fmt):
    assert libggml.ggml_block_size(fmt) == FORMATS[fmt].block_size
    assert libggml.ggml_type_size(fmt) == FORMATS[fmt].type_size


def test_table_matches_gguf_py_ids_and_sizes():
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    for fmt, spec in FORMATS.items():
        gt = GGMLQuantizationType[fmt.value]
        assert gt.value == spec.ggml_id
        assert GGML_QUANT_SIZES[gt] == (spec.block_size, spec.type_size)


def test_needs_imatrix_is_a_superset_of_ggml_requires_imatrix():
    lib = libggml._lib()
    for fmt, spec in FORMATS.items():
        if lib.ggml_quantize_requires_imatrix(spec.ggml_id):
            assert spec.needs_imatrix, fmt


def test_hand_computed_sizes():
    # Q4_K: 256 weights in 144 bytes; Q8_0: 32 in 34; 4.5 and 8.5 bits per weight
    assert row_nbytes(QuantFormat.Q4_K, 512) == 288
    assert tensor_nbytes(QuantFormat.Q8_0, (3, 64)) == 3 * 2 * 34
    assert tensor_nbytes(QuantFormat.IQ2_XXS, (2, 4, 256)) == 8 * 66
    assert FORMATS[QuantFormat.Q4_K].bits_per_weight == 4.5
    assert FORMATS[QuantFormat.IQ1_S].bits_per_weight == 1.5625


def test_misaligned_rows_raise_instead_of_rounding():
    with pytest.raises(ValueError, match="block size 256"):
        row_nbytes(QuantFormat.Q4_K, 576)


def test_fallbacks_follow_llama_cpp():
    # tensor_type_fallback in llama-quant.cpp: 256-block types fall back to a 32-block type, else F16
    assert fallback_format(QuantFormat.Q4_K, 576) is QuantFormat.Q5_0
    assert fallback_format(QuantFormat.Q6_K, 576) is QuantFormat.Q8_0
    assert fallback_format(QuantFormat.IQ2_XXS, 576) is QuantFormat.IQ4_NL
    assert fallback_format(QuantFormat.Q2_K, 576) is QuantFormat.Q4_0
    assert fallback_format(QuantFormat.Q4_K, 100) is QuantFormat.F16
    assert fallback_format(QuantFormat.Q4_K, 512) is QuantFormat.Q4_K
    assert effective_format(QuantFormat.IQ1_S, (10, 1536)) is QuantFormat.IQ1_S


def test_parse_format():
    assert parse_format("q4_k") is QuantFormat.Q4_K
    assert parse_format(" IQ2_XXS ") is QuantFormat.IQ2_XXS
    assert parse_format(8) is QuantFormat.Q8_0
    with pytest.raises(UnknownFormatError, match="Q4_K"):
        parse_format("Q4_KK")
