"""The IQ lattice dequant kernels (``dq.kernels._triton_iqdequant``) are bit-exact with libggml's ``to_float``.

Under TRITON_INTERPRET=1 on CPU (compiled on a GPU). Each type is checked on libggml's own quantization of
weights with outliers, an all-zero super-block and an all-zero sub-block, and on random payloads, which
reach every grid index, sign pattern and scale nibble (the fp16 scales kept finite, so no NaN payloads
are compared). Float32 outputs are compared as bit patterns (so -0.0 must be -0.0), with libggml and with
the torch reference :mod:`dq.kernels.ref_dequant`.
"""

import numpy as np
import pytest
import torch

from tests._require import require

CUDA = torch.cuda.is_available()
triton = require("triton")

from dq.kernels import api as kernels_api  # noqa: E402
from dq.kernels import dequantize, ref_dequant  # noqa: E402
from dq.kernels._triton_dequant import TRITON_DEQUANT_FORMATS, dequantize_triton  # noqa: E402
from dq.kernels._triton_iqdequant import IQ_DEQUANT_FORMATS  # noqa: E402
from dq.quant import QuantFormat, libggml  # noqa: E402
from dq.quant.formats import FORMATS  # noqa: E402

from .test_kernels_ref import make_weights  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
LATTICE = [QuantFormat.IQ2_XXS, QuantFormat.IQ2_XS, QuantFormat.IQ2_S, QuantFormat.IQ3_XXS, QuantFormat.IQ3_S,
           QuantFormat.IQ1_S, QuantFormat.IQ1_M]


def _bits(x: torch.Tensor | np.ndarray) -> np.ndarray:
    a = x.cpu().numpy() if isinstance(x, torch.Tensor) else x
    return np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)


def _random_payload(fmt: QuantFormat, n_blocks: int, seed: int) -> np.ndarray:
    """Random blocks with finite fp16 scales; block 1 is all zero bytes (d = 0: every weight +-0)."""
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 256, (n_blocks, FORMATS[fmt].type_size), dtype=np.uint8)
    if fmt is QuantFormat.IQ1_M:  # d sits in the scales' top nibbles: bit 14 of the fp16 lives in byte 55
        raw[:, 55] &= 0xBF  # exponent below all-ones: finite
    else:
        d = rng.standard_normal(n_blocks).astype(np.float16)
        raw[:, :2] = d.view(np.uint8).reshape(n_blocks, 2)
    raw[1] = 0
    return raw.reshape(-1)


def _check(raw: np.ndarray, fmt: QuantFormat, shape: tuple[int, int]) -> None:
    want = libggml.dequantize(raw.tobytes(), fmt, shape)
    data = torch.from_numpy(raw.copy()).to(DEV)
    got = dequantize(data, fmt, shape, backend="triton")
    assert got.shape == shape and got.dtype == torch.float32
    np.testing.assert_array_equal(_bits(got), _bits(want), err_msg=f"{fmt} vs libggml")
    ref = ref_dequant.dequantize(data, fmt, shape)
    np.testing.assert_array_equal(_bits(got), _bits(ref), err_msg=f"{fmt} vs the torch reference")
    bf = dequantize(data, fmt, shape, torch.bfloat16, backend="triton").cpu()
    rne = torch.from_numpy(want).to(torch.bfloat16)
    if CUDA:
        assert torch.equal(bf.view(torch.int16), rne.view(torch.int16))
    else:  # Triton's interpreter (numpy) truncates float32 to bfloat16; compiled Triton rounds to nearest even
        trunc = torch.from_numpy((want.view(np.uint32) & 0xFFFF0000).view(np.float32)).to(torch.bfloat16)
        assert bool(((bf.view(torch.int16) == rne.view(torch.int16))
                     | (bf.view(torch.int16) == trunc.view(torch.int16))).all())


@pytest.mark.parametrize("shape", [(3, 256), (5, 768)], ids=str)
@pytest.mark.parametrize("fmt", LATTICE, ids=str)
def test_libggml_quantized_weights(fmt, shape):
    w = make_weights(*shape, seed=shape[1])  # row 1 all zero: zero super-blocks
    im = np.random.default_rng(shape[0]).random(shape[1]).astype(np.float32) + 0.1
    raw = np.frombuffer(libggml.quantize(w, fmt, im), dtype=np.uint8)
    _check(raw, fmt, shape)


@pytest.mark.parametrize("fmt", LATTICE, ids=str)
def test_random_payloads(fmt):
    shape = (5, 512)
    _check(_random_payload(fmt, 10, seed=list(QuantFormat).index(fmt)), fmt, shape)


def test_odd_address_payload():
    """A payload at an odd address (a GGUF slice, say) is copied before the kernel's int16 view."""
    fmt = QuantFormat.IQ2_XS
    raw = _random_payload(fmt, 3, seed=3)
    buf = torch.zeros(raw.size + 1, dtype=torch.uint8)
    buf[1:] = torch.from_numpy(raw)
    data = buf.to(DEV)[1:]
    assert data.data_ptr() % 2 == 1
    got = dequantize_triton(data, fmt, 3 * 256, torch.float32)
    np.testing.assert_array_equal(_bits(got), _bits(libggml.dequantize(raw.tobytes(), fmt, (3, 256))).reshape(-1))


def test_lattice_formats_are_listed():
    """api's Triton-free list mirrors the kernel modules', and holds every lattice type."""
    assert kernels_api.TRITON_DEQUANT_FORMATS == TRITON_DEQUANT_FORMATS
    assert set(IQ_DEQUANT_FORMATS) == set(LATTICE) <= set(TRITON_DEQUANT_FORMATS)
    assert set(kernels_api.LATTICE_FORMATS) == set(LATTICE)
