"""The torch ports of IQ1_S's and IQ1_M's quantizers (``quantize_row_iq1_{s,m}_impl``) write libggml's bytes."""

import numpy as np
import pytest
import torch

from dq.kernels import quant_error
from dq.kernels.ref_iq1 import fake_quant_iq1_m, fake_quant_iq1_s, quantize_iq1_m, quantize_iq1_s
from dq.kernels.ref_quant import error_sums
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat

PORTS = {QuantFormat.IQ1_S: (quantize_iq1_s, fake_quant_iq1_s), QuantFormat.IQ1_M: (quantize_iq1_m, fake_quant_iq1_m)}
TYPES = pytest.mark.parametrize("fmt", list(PORTS), ids=lambda f: f.value)


def _weights(rows: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows at mixed scales, with the blocks that take the C code's side branches."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    w[0, 5], w[0, n - 7] = 40.0, -55.0  # outliers
    w[1] = 0.0  # an all-zero super-block: d = 0, no bits
    w[2, :32] = 1e-13  # a block below GROUP_MAX_EPS inside a live super-block
    w[2, 40:56] = 0.0  # equal values: the sort's tie order decides which side of a split they fall
    w[3, 64:96] = np.round(w[3, 64:96] * 2) / 2  # many exact ties
    w[3, 136:144] = -np.abs(w[3, 136:144])  # IQ1_M: halves with opposite signs in one block
    return w


def _blocks(fmt, data) -> np.ndarray:
    return np.frombuffer(data, np.uint8).reshape(-1, FORMATS[fmt].type_size)


@TYPES
@pytest.mark.parametrize("shape", [(5, 256), (6, 768)], ids=str)
@pytest.mark.parametrize("imatrix", ["uniform", "sparse", "zeros"])
def test_bytes_equal_ggml_quantize_chunk(fmt, imatrix, shape):
    w = _weights(*shape, seed=shape[1])
    rng = np.random.default_rng(5)
    im = np.ones(shape[1], np.float32) if imatrix == "uniform" else (rng.random(shape[1]) ** 4 + 1e-3).astype(np.float32)
    if imatrix == "zeros":
        im[::17] = 0.0
    want = _blocks(fmt, libggml.quantize(w, fmt, im))
    got = PORTS[fmt][0](torch.from_numpy(w), torch.from_numpy(im)).numpy()
    np.testing.assert_array_equal(got, want)


@TYPES
def test_quant_error_is_libggml_round_trip(fmt):
    """What ``dq analyze --device cuda`` measures for the type is the error of llama.cpp's stored tensor."""
    w = _weights(4, 512, seed=3)
    im = (np.random.default_rng(4).random(512) + 0.1).astype(np.float32)
    truth = error_sums(torch.from_numpy(w),
                       torch.from_numpy(libggml.dequantize(libggml.quantize(w, fmt, im), fmt, w.shape)),
                       torch.from_numpy(im))
    got = quant_error(torch.from_numpy(w), fmt, torch.from_numpy(im), imatrix_quantizer=True, return_dequantized=True)
    assert all(torch.equal(got[k], truth[k]) for k in truth)
    assert torch.equal(got["deq"], PORTS[fmt][1](torch.from_numpy(w), torch.from_numpy(im)))


@TYPES
def test_rejects_misaligned_rows(fmt):
    with pytest.raises(ValueError, match="multiple of"):
        PORTS[fmt][0](torch.zeros(2, 320))


@TYPES
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bytes_equal_libggml(fmt):
    w = _weights(33, 1024, seed=11)
    im = (np.random.default_rng(12).random(1024) ** 4 + 1e-3).astype(np.float32)
    want = _blocks(fmt, libggml.quantize(w, fmt, im))
    got = PORTS[fmt][0](torch.from_numpy(w).cuda(), torch.from_numpy(im).cuda()).cpu().numpy()
    np.testing.assert_array_equal(got, want)
