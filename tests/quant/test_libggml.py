"""dq's ctypes bridge against gguf-py's independent numpy implementation (bytes and values)."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGMLQuantizationType, quants
from hypothesis import given, settings
from hypothesis import strategies as st

from dq.errors import ImatrixRequiredError
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat

# the types gguf-py can quantize in numpy (byte-identical to ggml's reference quantizers)
GGUF_PY_QUANTIZES = ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "TQ1_0", "TQ2_0", "MXFP4"]
K_AND_IQ = [f for f in QuantFormat if FORMATS[f].block_size == 256] + [QuantFormat.IQ4_NL]


def _weights(rows: int, cols: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, cols)).astype(np.float32)
    w[0, 3] = 25.0  # an outlier, as real down_proj rows have
    if rows > 2:
        w[2] = 0.0  # an all-zero row
    return w


def _imatrix(cols: int) -> np.ndarray:
    return (np.random.default_rng(1).random(cols) + 0.05).astype(np.float32)


@pytest.mark.parametrize("name", GGUF_PY_QUANTIZES)
def test_bytes_identical_to_gguf_py(name):
    fmt = QuantFormat(name)
    w = _weights(7, 512)
    assert libggml.quantize(w, fmt) == quants.quantize(w, GGMLQuantizationType[name]).tobytes()


@pytest.mark.parametrize("fmt", K_AND_IQ, ids=str)
def test_dequantize_identical_to_gguf_py(fmt):
    w = _weights(5, 512)
    blob = libggml.quantize(w, fmt, _imatrix(512))
    ours = libggml.dequantize(blob, fmt, w.shape)
    theirs = quants.dequantize(np.frombuffer(blob, np.uint8).reshape(5, -1), GGMLQuantizationType[fmt.value])
    np.testing.assert_array_equal(ours, theirs)
    # and the round trip is a quantization, not garbage: relative-error ceilings by bit width
    # (ternary types are made for ternary-trained weights: on Gaussian ones they lose about half)
    err = float(((ours - w) ** 2).sum() / (w**2).sum())
    ceiling = 0.7 if fmt.value.startswith("TQ") else {8: 1e-3, 6: 0.01, 5: 0.02, 4: 0.05}.get(
        int(FORMATS[fmt].bits_per_weight), 0.35)
    assert err < ceiling, (fmt, err)


@pytest.mark.parametrize("name", ["IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M", "IQ3_XXS", "IQ2_S"])
def test_imatrix_types_refuse_without_one(name):
    # ggml_quantize_chunk would abort the whole process for some of these; the bridge must raise first
    with pytest.raises(ImatrixRequiredError, match="--imatrix"):
        libggml.quantize(_weights(2, 256), QuantFormat(name))


def test_imatrix_is_used_and_lowers_weighted_error():
    w = _weights(64, 512)
    im = _imatrix(512) ** 4  # strongly uneven importance
    plain = libggml.dequantize(libggml.quantize(w, QuantFormat.Q4_K), QuantFormat.Q4_K, w.shape)
    weighted = libggml.dequantize(libggml.quantize(w, QuantFormat.Q4_K, im), QuantFormat.Q4_K, w.shape)
    def werr(d):
        return float((((d - w) ** 2) * im).sum())
    assert werr(weighted) < werr(plain)


def test_threads_do_not_change_bytes():
    w = _weights(300, 1024)  # five row chunks
    assert libggml.quantize(w, QuantFormat.IQ4_XS, n_threads=1) == libggml.quantize(w, QuantFormat.IQ4_XS, n_threads=4)


def test_a_shared_pool_gives_the_same_bytes_and_stays_usable():
    from concurrent.futures import ThreadPoolExecutor

    w, im = _weights(300, 1024), _imatrix(1024)
    one = libggml.quantize(w, QuantFormat.IQ2_XS, im, n_threads=1)
    with ThreadPoolExecutor(3) as pool:
        for _ in range(2):  # the pool is not shut down by a call
            blob = libggml.quantize(w, QuantFormat.IQ2_XS, im, n_threads=3, pool=pool)
            assert blob == one
            back = libggml.dequantize(blob, QuantFormat.IQ2_XS, w.shape, n_threads=3, pool=pool)
            np.testing.assert_array_equal(back, libggml.dequantize(one, QuantFormat.IQ2_XS, w.shape, n_threads=1))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match="block size 256"):
        libggml.quantize(_weights(2, 320), QuantFormat.Q4_K)
    with pytest.raises(ValueError, match="imatrix has shape"):
        libggml.quantize(_weights(2, 256), QuantFormat.Q4_K, np.ones(128, np.float32))
    with pytest.raises(ValueError, match="expected"):
        libggml.dequantize(b"\0" * 10, QuantFormat.Q8_0, (1, 32))


@settings(max_examples=25, deadline=None)
@given(rows=st.integers(1, 9), blocks=st.integers(1, 6), seed=st.integers(0, 2**16), scale=st.floats(1e-3, 1e3),
       name=st.sampled_from(["Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]))
def test_bytes_identical_to_gguf_py_at_any_shape(rows, blocks, seed, scale, name):
    w = (np.random.default_rng(seed).standard_normal((rows, 32 * blocks)) * scale).astype(np.float32)
    assert libggml.quantize(w, QuantFormat(name)) == quants.quantize(w, GGMLQuantizationType[name]).tobytes()


@pytest.mark.parametrize("source", [QuantFormat.BF16, QuantFormat.F16, QuantFormat.F32, QuantFormat.Q8_0])
@pytest.mark.parametrize("target", [QuantFormat.IQ2_XS, QuantFormat.Q4_K, QuantFormat.F16, QuantFormat.F32])
def test_requantize_equals_quantize_of_the_dequantized_tensor(source, target):
    """The writer converts and quantizes chunk by chunk; the bytes must be those of the two whole-tensor steps."""
    w, im = _weights(301, 512), _imatrix(512)  # rows not a multiple of any chunk
    raw = libggml.quantize(w, source)
    whole = libggml.dequantize(raw, source, w.shape)
    imx = None if FORMATS[target].is_float else im
    want = libggml.quantize(whole, target, imx, n_threads=1)
    assert libggml.requantize(raw, source, w.shape, target, imx, n_threads=3) == want
