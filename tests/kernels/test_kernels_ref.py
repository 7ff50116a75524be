"""Torch references vs libggml (llama.cpp's own C code): bit-exact dequantized values.

The weights hold outliers, all-zero rows, all-zero and tiny sub-blocks, at odd row counts.
"""

import numpy as np
import pytest
import torch

from dq.kernels import ref_dequant
from dq.kernels.ref_quant import (
    FAKE_QUANT_FORMATS,
    error_sums,
    fake_quant,
    quant_error,
)
from dq.quant import FORMATS, QuantFormat, libggml

SHAPES = [(3, 256), (5, 512)]


def make_weights(rows: int, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    w = rng.standard_normal((rows, n)).astype(np.float32)
    w[0, 5], w[0, n - 7] = 40.0, -55.0  # outliers
    w[1] = 0.0  # all-zero row
    w[2, :32] = 0.0  # all-zero sub-blocks
    w[2, 40:56] = 1e-3  # tiny sub-block
    if rows > 3:
        w[3] *= 1e-4
        w[4, ::7] *= 30.0
    return w


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("fmt", FAKE_QUANT_FORMATS, ids=str)
def test_fake_quant_bit_exact_vs_libggml(fmt, shape):
    w = make_weights(*shape)
    want = libggml.dequantize(libggml.quantize(w, fmt), fmt, w.shape)
    got = fake_quant(torch.from_numpy(w), fmt).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", FAKE_QUANT_FORMATS, ids=str)
def test_imatrix_fake_quant_equals_libggml_with_imatrix(fmt):
    """With an imatrix, libggml runs quantize_row_*_impl; the ports give the same values (a sparse,
    heavy-tailed imatrix so the importance weights change the chosen scales)."""
    w = make_weights(5, 768, seed=7)
    im = (np.random.default_rng(8).random(768) ** 4 + 1e-3).astype(np.float32)
    want = libggml.dequantize(libggml.quantize(w, fmt, im), fmt, w.shape)
    got = fake_quant(torch.from_numpy(w), fmt, torch.from_numpy(im)).numpy()
    np.testing.assert_array_equal(got, want)  # values: Q6_K's zeros may differ in sign only
    if fmt not in (QuantFormat.Q8_0, QuantFormat.TQ1_0, QuantFormat.TQ2_0):  # the imatrix changed the values
        assert not np.array_equal(fake_quant(torch.from_numpy(w), fmt).numpy(), want)
    err = quant_error(torch.from_numpy(w), fmt, torch.from_numpy(im), imatrix_quantizer=True)
    truth = error_sums(torch.from_numpy(w), torch.from_numpy(want), torch.from_numpy(im))
    assert all(torch.equal(err[k], truth[k]) for k in truth)


@pytest.mark.parametrize("fmt", [f for f in QuantFormat], ids=str)
def test_dequant_bit_exact_vs_libggml(fmt):
    w = make_weights(3, 512, seed=1)
    imatrix = np.random.default_rng(2).random(512).astype(np.float32) + 0.1
    raw = libggml.quantize(w, fmt, imatrix)
    want = libggml.dequantize(raw, fmt, w.shape)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    got = ref_dequant.dequantize(data, fmt, w.shape).numpy()
    np.testing.assert_array_equal(got.view(np.uint32), want.view(np.uint32))
    bf = ref_dequant.dequantize(data, fmt, w.shape, torch.bfloat16)
    assert bf.dtype == torch.bfloat16 and torch.equal(bf, torch.from_numpy(want).to(torch.bfloat16))


def test_error_sums_hand_computed():
    w = torch.tensor([[1.0, -2.0], [0.0, 3.0]])
    deq = torch.tensor([[1.5, -2.0], [0.0, 2.0]])
    out = error_sums(w, deq, torch.tensor([2.0, 1.0]))
    assert out["sse"].tolist() == [0.25, 1.0]
    assert out["wsse"].tolist() == [0.5, 1.0]
    assert out["sumsq"].tolist() == [5.0, 9.0]
    assert out["wsumsq"].tolist() == [6.0, 9.0]


# The no-imatrix quantizer against llama.cpp's imatrix one (quantize_row_*_impl, importance-weighted
# scale search, ported above and used with imatrix_quantizer=True). Measured on these weights (5x512
# Gaussian with outliers, imatrix uniform in [0.1, 1.1]):
# wsse(no-imatrix quantizer) / wsse(llama.cpp imatrix quantizer). Q8_0/TQ*_0 ignore the imatrix in C.
IMATRIX_WSSE_RATIO = {
    QuantFormat.Q8_0: 1.0, QuantFormat.Q4_0: 1.0587, QuantFormat.Q4_1: 1.7693, QuantFormat.Q5_0: 1.0131,
    QuantFormat.Q5_1: 1.1853, QuantFormat.TQ1_0: 1.0, QuantFormat.TQ2_0: 1.0, QuantFormat.Q2_K: 2.8148,
    QuantFormat.Q3_K: 1.1165, QuantFormat.Q4_K: 0.9883, QuantFormat.Q5_K: 0.9716, QuantFormat.Q6_K: 1.0109,
    QuantFormat.IQ4_NL: 1.0331, QuantFormat.IQ4_XS: 1.0396,
}


@pytest.mark.parametrize("fmt", FAKE_QUANT_FORMATS, ids=str)
def test_imatrix_path_difference_is_bounded(fmt):
    w = make_weights(5, 512, seed=3)
    im = np.random.default_rng(4).random(512).astype(np.float32) + 0.1
    with_im = libggml.dequantize(libggml.quantize(w, fmt, im), fmt, w.shape)
    ref = fake_quant(torch.from_numpy(w), fmt)
    ggml_w = float(((w - with_im) ** 2 * im).sum())
    ours_w = float(error_sums(torch.from_numpy(w), ref, torch.from_numpy(im))["wsse"].sum())
    assert ours_w / ggml_w == pytest.approx(IMATRIX_WSSE_RATIO[fmt], rel=1e-3)
    assert ours_w / ggml_w <= 3.0  # the stated bound


def test_all_formats_covered():
    assert set(ref_dequant._DEQ) | {f for f, s in FORMATS.items() if s.is_float} == set(QuantFormat)
