"""The torch port of the IQ lattice quantizers (IQ2_XXS, IQ2_XS, IQ2_S, IQ3_XXS, IQ3_S) writes libggml's bytes."""

import numpy as np
import pytest
import torch

from dq.kernels import quant_error
from dq.kernels.ref_iqgrid import GRID_FORMATS, fake_quant_iqgrid, quantize_iqgrid
from dq.kernels.ref_quant import error_sums
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat


def _weights(rows: int, n: int, seed: int) -> np.ndarray:
    """Gaussian rows at mixed scales, with the blocks that take the C code's side branches."""
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, n)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    w[0, 5], w[0, n - 7] = 40.0, -55.0  # outliers
    w[1] = 0.0  # an all-zero super-block: d = 0, no bits
    w[2, :32] = 0.0  # an all-zero block inside a live super-block
    w[2, 40:56] = 1e-9  # below IQ3_XXS's and IQ2_S's GROUP_MAX_EPS (1e-8) but not the others' (1e-15)
    w[3, 64:96] = -np.abs(w[3, 64:96])  # every sign negative: even flips, no parity fix
    w[4, 100:108] = [-1, 2, 3, 4, 5, 6, 7, 8]  # one negative in 8: the parity fix moves a sign
    return w


def _imatrix(n: int, seed: int, zeros: bool) -> np.ndarray:
    im = (np.random.default_rng(seed).random(n) ** 4 + 1e-3).astype(np.float32)  # sparse, heavy-tailed
    if zeros:
        im[::17] = 0.0  # channels no calibration token reached
    return im


@pytest.mark.parametrize("shape", [(7, 256), (6, 768)], ids=str)
@pytest.mark.parametrize("imatrix", ["uniform", "sparse", "zeros"])
@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=str)
def test_bytes_equal_ggml_quantize_chunk(fmt, imatrix, shape):
    w = _weights(*shape, seed=shape[1])
    im = np.ones(shape[1], np.float32) if imatrix == "uniform" else _imatrix(shape[1], 5, imatrix == "zeros")
    want = np.frombuffer(libggml.quantize(w, fmt, im), np.uint8).reshape(-1, FORMATS[fmt].type_size)
    got = quantize_iqgrid(torch.from_numpy(w), fmt, torch.from_numpy(im)).numpy()
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=str)
def test_quant_error_is_libggml_round_trip(fmt):
    """``quant_error`` (what ``dq analyze --device cuda`` measures) = the error of llama.cpp's stored tensor,
    with the imatrix, and without one as ``dq`` quantizes then: uniform weights, or (IQ3_S) libggml's own ``x^2``."""
    w = _weights(5, 512, seed=3)
    im = _imatrix(512, 4, zeros=False)
    for imt in (im, None):
        stored = libggml.quantize(w, fmt, np.ones(512, np.float32) if imt is None and FORMATS[fmt].needs_imatrix
                                  else imt)
        truth = error_sums(torch.from_numpy(w), torch.from_numpy(libggml.dequantize(stored, fmt, w.shape)),
                           None if imt is None else torch.from_numpy(imt))
        got = quant_error(torch.from_numpy(w), fmt, None if imt is None else torch.from_numpy(imt),
                          imatrix_quantizer=True, return_dequantized=True)
        assert all(torch.equal(got[k], truth[k]) for k in truth)
        assert torch.equal(got["deq"], fake_quant_iqgrid(torch.from_numpy(w), fmt,
                                                         None if imt is None else torch.from_numpy(imt)))


def test_iq3_s_without_imatrix_weights_by_x_squared():
    """IQ3_S is the one lattice type llama.cpp quantizes without an imatrix (weights ``x^2``); the port follows."""
    w = _weights(6, 512, seed=9)
    want = np.frombuffer(libggml.quantize(w, QuantFormat.IQ3_S), np.uint8).reshape(-1, 110)
    np.testing.assert_array_equal(quantize_iqgrid(torch.from_numpy(w), QuantFormat.IQ3_S).numpy(), want)


def test_rejects_misaligned_rows_and_other_types():
    with pytest.raises(ValueError, match="multiple of"):
        quantize_iqgrid(torch.zeros(2, 320), QuantFormat.IQ2_XXS)
    with pytest.raises(ValueError, match="handles"):
        quantize_iqgrid(torch.zeros(2, 256), QuantFormat.IQ1_S)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", GRID_FORMATS, ids=str)
def test_cuda_bytes_equal_libggml(fmt):
    w = _weights(33, 1024, seed=11)
    im = _imatrix(1024, 12, zeros=True)
    want = np.frombuffer(libggml.quantize(w, fmt, im), np.uint8).reshape(-1, FORMATS[fmt].type_size)
    got = quantize_iqgrid(torch.from_numpy(w).cuda(), fmt, torch.from_numpy(im).cuda()).cpu().numpy()
    np.testing.assert_array_equal(got, want)
