"""Which quantizers measure errors (`dq analyze --device`), and that the kernel path agrees with libggml.

Oracles: libggml itself (the kernel path uses ggml's reference quantizers, bit-exact without an imatrix,
so the error ratios agree to float rounding), and the log line a CPU run must print. The kernel path runs
here on CPU tensors through the kernels' torch reference; on a CUDA machine the same test also runs the
Triton kernels.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from dq.analysis import measure
from dq.analysis.measure import MatrixInput, measure_path, measure_tensor
from dq.quant.formats import QuantFormat as F

_CPU_LINE = "measuring errors on the CPU path: libggml"


def test_cpu_device_logs_the_libggml_path(caplog):
    with caplog.at_level(logging.INFO, logger="dq.analysis.measure"):
        assert measure_path("cpu") == "libggml"
    assert any(_CPU_LINE in r.getMessage() and "--device cpu" in r.getMessage() for r in caplog.records)


def test_cuda_without_triton_or_gpu_falls_back_and_says_why(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr("dq.kernels.api.triton_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="dq.analysis.measure"):
        assert measure_path("cuda") == "libggml"
    assert any(_CPU_LINE in r.getMessage() and "Triton is not installed" in r.getMessage() for r in caplog.records)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="dq.analysis.measure"):
        assert measure_path("cuda:0") == "libggml"
    assert "torch sees no CUDA device" in caplog.text


def test_measure_path_is_silent_when_not_announcing(caplog):
    with caplog.at_level(logging.INFO, logger="dq.analysis.measure"):
        measure_path("cpu", announce=False)
    assert not caplog.records


def test_analyze_on_cpu_says_it_uses_libggml(tiny_llama_dir, tmp_path, caplog):
    from dq.analysis.analyze import AnalyzeOptions, analyze

    opts = AnalyzeOptions(candidates=("Q8_0",), n_tokens=256, seq_len=128, act_tokens=16, super_weights=False,
                          plots=False, max_elements=1 << 14)
    with caplog.at_level(logging.INFO, logger="dq.analysis"):
        analyze(tiny_llama_dir, tmp_path / "a", opts)
    lines = [r.getMessage() for r in caplog.records if r.name == "dq.analysis.measure"]
    assert len(lines) == 1 and _CPU_LINE in lines[0]


def _mats(rng: np.random.Generator, rows: int, cols: int, experts: int = 1, imatrix: bool = False):
    out = []
    for _ in range(experts):
        w = (rng.standard_normal((rows, cols)) * 0.02).astype(np.float32)
        w[0, 3] = 0.5  # an outlier, as real weights have
        x = (rng.standard_normal((24, cols)) * np.linspace(0.2, 3.0, cols)).astype(np.float32)
        im = (x.astype(np.float64) ** 2).mean(0).astype(np.float32) if imatrix else None
        out.append(MatrixInput(w, im, x))
    return out


# Q4_K on 512 columns stays Q4_K; Q5_K on 288 falls back to Q5_1, IQ4_XS on 288 to IQ4_NL (both ported).
@pytest.mark.parametrize("cols,fmts", [(512, [F.Q8_0, F.Q4_K, F.Q2_K, F.IQ4_XS]), (288, [F.Q5_K, F.TQ2_0, F.IQ4_XS])])
def test_kernel_path_equals_libggml_without_imatrix(cols, fmts):
    mats = _mats(np.random.default_rng(cols), 6, cols, experts=2)
    shape = (2, 6, cols)
    ref = measure_tensor(mats, shape, fmts, kernels=False)
    got = measure_tensor(mats, shape, fmts, kernels=True, device="cpu")
    for r, g in zip(ref, got):
        assert (g.requested, g.stored, g.nbytes) == (r.requested, r.stored, r.nbytes)
        assert g.weight_err == pytest.approx(r.weight_err, rel=1e-6)
        assert g.act_err == pytest.approx(r.act_err, rel=1e-5)
        assert g.weighted_err is None and r.weighted_err is None


def test_kernel_path_with_imatrix_equals_libggml():
    """With an imatrix the kernel path runs libggml's imatrix searches (quantize_row_*_impl; Q8_0/TQ2_0
    ignore it), IQ4_XS included (dq.kernels.ref_iq4): the whole table equals the CPU path's."""
    mats = _mats(np.random.default_rng(1), 8, 256, imatrix=True)
    fmts = [F.Q8_0, F.TQ2_0, F.Q2_K, F.Q3_K, F.Q4_K, F.Q5_K, F.Q6_K, F.Q5_1, F.Q4_0, F.IQ4_XS]
    ref = measure_tensor(mats, (8, 256), fmts, kernels=False)
    got = measure_tensor(mats, (8, 256), fmts, kernels=True, device="cpu")
    for r, g in zip(ref, got):
        assert g.weight_err == pytest.approx(r.weight_err, rel=1e-6)
        assert g.weighted_err == pytest.approx(r.weighted_err, rel=1e-6)
        assert g.act_err == pytest.approx(r.act_err, rel=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_path_equals_libggml_without_imatrix():
    assert measure_path("cuda", announce=False) == "kernels"
    fmts = list(measure.kernel_formats()) + [F.IQ4_XS]
    mats = _mats(np.random.default_rng(7), 16, 768, experts=2)
    ref = measure_tensor(mats, (2, 16, 768), fmts, kernels=False)
    got = measure_tensor(mats, (2, 16, 768), fmts, device="cuda")
    for r, g in zip(ref, got):
        assert g.stored == r.stored
        assert g.weight_err == pytest.approx(r.weight_err, rel=1e-5), g.stored
        assert g.act_err == pytest.approx(r.act_err, rel=1e-5), g.stored


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_kernel_path_with_imatrix_equals_libggml():
    fmts = list(measure.kernel_formats()) + [F.IQ4_XS]
    mats = _mats(np.random.default_rng(9), 16, 768, imatrix=True)
    ref = measure_tensor(mats, (16, 768), fmts, kernels=False)
    got = measure_tensor(mats, (16, 768), fmts, device="cuda")
    for r, g in zip(ref, got):
        assert g.stored == r.stored
        assert g.weighted_err == pytest.approx(r.weighted_err, rel=1e-5), g.stored
        assert g.act_err == pytest.approx(r.act_err, rel=1e-5), g.stored
