"""``quantize_bytes`` (the GGUF payload, computed with torch on any device) = ``libggml.quantize``, byte for byte."""

import numpy as np
import pytest
import torch

from dq.errors import ImatrixRequiredError
from dq.kernels import ref_pack
from dq.kernels.ref_pack import PACK_FORMATS, pack_blocks, quantize_bytes
from dq.kernels.ref_quant import FAKE_QUANT_FORMATS, fake_quant, nearest_int, quantize_blocks
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat

Q = QuantFormat
BLOCK_TYPES = (Q.F16, Q.BF16, Q.F32, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K,
               Q.Q6_K, Q.TQ1_0, Q.TQ2_0, Q.IQ4_NL, Q.IQ4_XS, Q.MXFP4)
LATTICE_TYPES = (Q.IQ3_S, Q.IQ3_XXS, Q.IQ2_S, Q.IQ2_XS, Q.IQ2_XXS, Q.IQ1_M, Q.IQ1_S)
SHAPES = [(5, 512), (3, 768), (7, 96)]


def _weights(rows: int, n: int, seed: int) -> np.ndarray:
    """Rows at mixed scales, with the blocks that take the C code's side branches."""
    rng = np.random.default_rng(seed)
    m = max(rows, 5)  # the edge-case rows below, then the first `rows`
    w = (rng.standard_normal((m, n)) * rng.uniform(0.01, 2.0, (m, 1))).astype(np.float32)
    w[0, 5], w[0, n - 7] = 40.0, -55.0  # outliers: the other sub-blocks' scales round to 0 (`if (!d) continue;`)
    w[1] = 0.0  # an all-zero row: dead blocks, d = 0
    w[1, 33::2] = -0.0  # ... with signed zeros (C's `max = 0` start, `min = x[0]`)
    w[2, :32] = 0.0  # an all-zero block inside a live row
    w[2, 40:56] = 1e-9  # tiny, above GROUP_MAX_EPS (1e-15)
    w[2, 64:80] = 1e-17  # below it
    w[3, :64] = np.abs(w[3, :64]) + 0.5  # positive blocks: Q4_1's min > 0, K-quants' `if (min > 0) min = 0`
    w[3, 64:96] = 3e-39 * np.sign(w[3, 64:96])  # subnormal: 1/d overflows, x*id is +-inf
    w[4, 16], w[4, 20] = 7.0, -7.0  # +m and -m in one block: the first one sets the scale's sign
    return w[:rows]


def _imatrix(n: int, seed: int, zeros: bool) -> np.ndarray:
    im = (np.random.default_rng(seed).random(n) ** 4 + 1e-3).astype(np.float32)  # sparse, heavy-tailed
    if zeros:
        im[::17] = 0.0  # channels no calibration token reached
    return im


def _check(w: np.ndarray, fmt: QuantFormat, im: np.ndarray | None) -> None:
    want = libggml.quantize(w, fmt, im)
    got = quantize_bytes(torch.from_numpy(w), fmt, None if im is None else torch.from_numpy(im))
    assert got.dtype == torch.uint8 and got.shape == (len(want),)
    if got.numpy().tobytes() != want:
        ts = FORMATS[fmt].type_size
        bad = np.argwhere(got.numpy().reshape(-1, ts) != np.frombuffer(want, np.uint8).reshape(-1, ts))
        pytest.fail(f"{fmt}: {len(bad)} bytes differ, first (block, byte): {bad[:4].tolist()}")


_CASES = [(f, s) for f in BLOCK_TYPES for s in SHAPES if s[1] % FORMATS[f].block_size == 0]


@pytest.mark.parametrize("imatrix", ["none", "sparse", "zeros"])
@pytest.mark.parametrize(("fmt", "shape"), _CASES, ids=[f"{f}-{s[0]}x{s[1]}" for f, s in _CASES])
def test_bytes_equal_libggml(fmt, shape, imatrix):
    """``_ref`` quantizers without an imatrix, ``_impl`` with one (ignored by Q8_0, TQ*, MXFP4, floats)."""
    w = _weights(*shape, seed=shape[1])
    _check(w, fmt, None if imatrix == "none" else _imatrix(shape[1], 5, imatrix == "zeros"))


@pytest.mark.parametrize("kind", ["student", "ints", "halves", "huge", "subnormal", "sparse"])
def test_bytes_equal_libggml_on_awkward_distributions(kind):
    """Heavy tails, exact ties (x*id on a .5), sums that overflow float32, subnormal blocks, mostly zeros."""
    rng = np.random.default_rng(11)
    shape = (4, 512)
    w = {
        "student": lambda: rng.standard_t(2, shape),
        "ints": lambda: rng.integers(-8, 8, shape) * 0.25,
        "halves": lambda: (rng.integers(-16, 16, shape) + 0.5) * 0.125,
        "huge": lambda: rng.standard_normal(shape) * 10.0 ** rng.uniform(15, 30, (4, 1)),
        "subnormal": lambda: rng.standard_normal(shape) * 10.0 ** rng.uniform(-45, -36, (4, 16)).repeat(32, 1),
        "sparse": lambda: rng.standard_normal(shape) * (rng.random(shape) < 0.05),
    }[kind]().astype(np.float32)
    for fmt in BLOCK_TYPES:
        for im in (None, _imatrix(512, 3, zeros=True)):
            _check(w, fmt, im)


@pytest.mark.parametrize("fmt", LATTICE_TYPES, ids=str)
def test_lattice_types_through_quantize_bytes(fmt):
    """The lattice ports already write blocks (their own tests cover the search); one small case each here."""
    w = _weights(2, 256, seed=7)  # an outlier row and a dead one
    _check(w, fmt, _imatrix(256, 9, zeros=True))
    if fmt is Q.IQ3_S:  # the one lattice type libggml also quantizes without an imatrix
        _check(w, fmt, None)
    else:
        with pytest.raises(ImatrixRequiredError):
            quantize_bytes(torch.from_numpy(w), fmt)


@pytest.mark.parametrize("fmt", [Q.Q4_K, Q.Q4_0, Q.IQ4_XS, Q.Q6_K], ids=str)
def test_row_chunks_do_not_change_the_bytes(fmt, monkeypatch):
    """A tensor quantized a few rows at a time (the per-row imatrix weights, row sigma2) gives the same bytes."""
    w = _weights(5, 512, seed=1)
    im = _imatrix(512, 2, zeros=True)
    monkeypatch.setattr(ref_pack, "_CHUNK_ELEMENTS", {"cpu": 1024, "cuda": 1024})
    _check(w, fmt, im)
    _check(w, fmt, None)


@pytest.mark.parametrize("fmt", [f for f in BLOCK_TYPES if f in FAKE_QUANT_FORMATS], ids=str)
def test_fields_dequantize_to_fake_quant(fmt):
    """``fake_quant`` is the dequantization of the same fields the bytes are packed from."""
    w = torch.from_numpy(_weights(5, 512, seed=4))
    qb = quantize_blocks(w, fmt)
    assert pack_blocks(qb).shape == (qb.levels.shape[0], FORMATS[fmt].type_size)
    assert torch.equal(qb.dequantize().reshape(w.shape), fake_quant(w, fmt))


def test_nearest_int_is_the_c_bit_trick_whatever_the_nan():
    """Ties to even; beyond 2^22 what ``x + 12582912.f``'s bits give; NaN 0 for x86's NaN and a GPU's 0x7fffffff."""
    gpu_nan = torch.tensor([0x7FFFFFFF], dtype=torch.int32).view(torch.float32)
    x = torch.cat([torch.tensor([2.5, 3.5, -2.5, -0.5, float("inf"), float("-inf"), float("nan")]), gpu_nan])
    assert nearest_int(x).tolist() == [2, 4, -2, 0, -4194304, -4194304, 0, 0]


def test_every_format_is_covered_and_bad_input_is_refused():
    assert set(PACK_FORMATS) == set(QuantFormat)
    with pytest.raises(ValueError, match="multiple"):
        quantize_bytes(torch.zeros(2, 100), Q.Q4_K)
    with pytest.raises(ValueError, match="imatrix"):
        quantize_bytes(torch.zeros(2, 256), Q.Q4_K, torch.ones(128))
    with pytest.raises(ValueError, match="2-D"):
        quantize_bytes(torch.zeros(256), Q.Q4_K)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("fmt", BLOCK_TYPES + LATTICE_TYPES, ids=str)
def test_cuda_bytes_equal_libggml(fmt):
    w = _weights(33, 1024, seed=11)
    im = _imatrix(1024, 12, zeros=True)
    for imt in ([im] if FORMATS[fmt].needs_imatrix else [None, im]):
        want = libggml.quantize(w, fmt, imt)
        got = quantize_bytes(torch.from_numpy(w).cuda(), fmt, None if imt is None else torch.from_numpy(imt).cuda())
        assert got.is_cuda
        assert got.cpu().numpy().tobytes() == want
