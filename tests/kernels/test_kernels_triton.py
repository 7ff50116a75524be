"""Triton kernels vs the torch references and libggml, under TRITON_INTERPRET=1 on CPU (compiled on a GPU).

Error sums are fp32 tree reductions in the kernel and float64 in the reference: they agree to ~1e-7
relative. One weight rounded to a different level would move a row's sse by ~1e-3 relative, so the
1e-5 bound also checks that the kernel's quantization decisions equal ggml's.
"""

import numpy as np
import pytest
import torch

from tests._require import require

CUDA = torch.cuda.is_available()
triton = require("triton")

from dq.kernels import act_stats, dequantize, quant_error  # noqa: E402
from dq.kernels.api import TRITON_DEQUANT_FORMATS  # noqa: E402
from dq.kernels.ref_quant import error_sums  # noqa: E402
from dq.kernels.ref_quant import quant_error as quant_error_ref  # noqa: E402
from dq.quant import QuantFormat, libggml  # noqa: E402

from .test_kernels_ref import make_weights  # noqa: E402

DEV = "cuda" if CUDA else "cpu"
SIMPLE = [QuantFormat.Q8_0, QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q5_0, QuantFormat.Q5_1,
          QuantFormat.TQ1_0, QuantFormat.TQ2_0]
KQUANTS = [QuantFormat.Q2_K, QuantFormat.Q3_K, QuantFormat.Q4_K, QuantFormat.Q5_K, QuantFormat.Q6_K]
# interpreter time grows with lanes per program, not with rows: keep K-quant shapes small on CPU
K_SHAPE = (5, 1024) if CUDA else (3, 512)


def _check(fmt, shape, seed=0):
    w = torch.from_numpy(make_weights(*shape, seed=seed))
    im = torch.from_numpy(np.random.default_rng(seed + 10).random(shape[1]).astype(np.float32) + 0.1)
    want = quant_error_ref(w, fmt, im)
    got = quant_error(w.to(DEV), fmt, im.to(DEV), backend="triton")
    for k in want:
        torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-5, atol=1e-12, msg=f"{fmt} {k}")


@pytest.mark.parametrize("fmt", SIMPLE, ids=str)
def test_simple_error_kernels_match_reference(fmt):
    _check(fmt, (5, 768))


@pytest.mark.parametrize("fmt", KQUANTS, ids=str)
def test_kquant_error_kernels_match_reference(fmt):
    _check(fmt, K_SHAPE)


@pytest.mark.parametrize("fmt", [f for f in QuantFormat], ids=str)
def test_dequant_kernels_bit_exact_vs_libggml(fmt):
    w = make_weights(3, 512, seed=5)
    imatrix = np.random.default_rng(6).random(512).astype(np.float32) + 0.1
    raw = libggml.quantize(w, fmt, imatrix)
    want = libggml.dequantize(raw, fmt, w.shape)
    data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).to(DEV)
    backend = "triton" if fmt in TRITON_DEQUANT_FORMATS else "auto"  # F32/F16/BF16: torch
    got = dequantize(data, fmt, w.shape, backend=backend)
    np.testing.assert_array_equal(got.cpu().numpy().view(np.uint32), want.view(np.uint32))
    bf = dequantize(data, fmt, w.shape, torch.bfloat16, backend=backend).cpu()
    rne = torch.from_numpy(want).to(torch.bfloat16)
    if CUDA or backend == "auto":
        assert torch.equal(bf, rne)
    else:  # Triton's interpreter (numpy) truncates float32 to bfloat16; compiled Triton rounds to nearest even
        trunc = torch.from_numpy((want.view(np.uint32) & 0xFFFF0000).view(np.float32)).to(torch.bfloat16)
        assert bool(((bf == rne) | (bf == trunc)).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_act_stats_kernel_matches_reference(dtype):
    x = (torch.randn(3, 37, 200) * torch.linspace(0.1, 5, 200)).to(dtype)
    x[1, 3, 17] = -300.0
    want = act_stats(x, backend="torch")
    got = act_stats(x.to(DEV), backend="triton")
    assert int(got["count"]) == int(want["count"]) == 111
    torch.testing.assert_close(got["sum_sq"].cpu(), want["sum_sq"], rtol=1e-5, atol=1e-5)
    assert torch.equal(got["max_abs"].cpu(), want["max_abs"])


@pytest.mark.parametrize("fmt", SIMPLE + KQUANTS, ids=str)
def test_imatrix_quantizer_kernels_match_libggml(fmt):
    """imatrix_quantizer=True: the kernel quantizes as libggml's quantize_row_*_impl; its error sums equal
    those of libggml's own bytes with that imatrix."""
    # the interpreter runs ~8 s per 512-wide Q4_K row with the imatrix search: two rows on CPU
    w = make_weights(5, 1024, seed=11) if CUDA else make_weights(3, 512, seed=11)[:2].copy()
    im = (np.random.default_rng(12).random(w.shape[1]) ** 4 + 1e-3).astype(np.float32)
    deq = libggml.dequantize(libggml.quantize(w, fmt, im), fmt, w.shape)
    want = error_sums(torch.from_numpy(w), torch.from_numpy(deq), torch.from_numpy(im))
    got = quant_error(torch.from_numpy(w).to(DEV), fmt, torch.from_numpy(im).to(DEV), backend="triton",
                      imatrix_quantizer=True)
    for k in want:
        torch.testing.assert_close(got[k].cpu(), want[k], rtol=1e-5, atol=1e-12, msg=f"{fmt} {k}")


@pytest.mark.parametrize("fmt,imq", [(QuantFormat.Q4_0, False), (QuantFormat.TQ1_0, False), (QuantFormat.Q6_K, True),
                                     (QuantFormat.Q2_K, False), (QuantFormat.Q5_1, True)], ids=str)
def test_return_dequantized_equals_libggml(fmt, imq):
    """The same pass can write Q(W) (for activation errors): it equals libggml's dequantized bytes."""
    w = make_weights(3, 512, seed=13)
    im = np.random.default_rng(14).random(512).astype(np.float32) + 0.1
    want = libggml.dequantize(libggml.quantize(w, fmt, im if imq else None), fmt, w.shape)
    got = quant_error(torch.from_numpy(w).to(DEV), fmt, torch.from_numpy(im).to(DEV), backend="triton",
                      imatrix_quantizer=imq, return_dequantized=True)
    np.testing.assert_array_equal(got["deq"].cpu().numpy(), want)
    ref = quant_error_ref(torch.from_numpy(w), fmt, torch.from_numpy(im), imatrix_quantizer=imq,
                          return_dequantized=True)
    np.testing.assert_array_equal(ref["deq"].numpy(), want)
