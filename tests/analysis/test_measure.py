"""Activation/weight error against a direct computation on a tiny layer; bytes and fallback; candidates."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dq.analysis.measure import DEFAULT_CANDIDATES, MatrixInput, measure_tensor, parse_candidates
from dq.errors import AnalysisError
from dq.quant import libggml
from dq.quant.formats import QuantFormat as F


def test_act_error_equals_direct_computation_on_tiny_linear():
    torch.manual_seed(0)
    lin = torch.nn.Linear(256, 8, bias=False)
    x = torch.randn(32, 256) * torch.linspace(0.1, 3.0, 256)  # uneven columns, as real activations
    w = lin.weight.detach().numpy().copy()
    im = (x.numpy().astype(np.float64) ** 2).mean(0).astype(np.float32)
    (e,) = measure_tensor([MatrixInput(w, im, x.numpy())], w.shape, [F.Q2_K])
    q = libggml.dequantize(libggml.quantize(w, F.Q2_K, im), F.Q2_K, w.shape)
    with torch.no_grad():
        y = lin(x)
        lin.weight.copy_(torch.from_numpy(q))
        yq = lin(x)
    direct = float(((y - yq) ** 2).sum() / (y**2).sum())
    assert e.act_err == pytest.approx(direct, rel=1e-4)
    assert e.weight_err == pytest.approx(float(((q - w) ** 2).sum() / (w**2).sum()), rel=1e-5)
    wd = float((((q - w) ** 2).sum(0) * im).sum() / (((w**2).sum(0)) * im).sum())
    assert e.weighted_err == pytest.approx(wd, rel=1e-5)
    assert e.nbytes == 8 * 84 and e.stored is F.Q2_K


def test_fallback_recorded_and_bytes_exact():
    w = np.random.default_rng(0).standard_normal((4, 576)).astype(np.float32)
    errs = measure_tensor([MatrixInput(w)], w.shape, [F.Q4_K, F.IQ2_XXS, F.Q8_0])
    assert [(e.requested, e.stored) for e in errs] == [(F.Q4_K, F.Q5_0), (F.IQ2_XXS, F.IQ4_NL), (F.Q8_0, F.Q8_0)]
    assert [e.nbytes for e in errs] == [4 * 18 * 22, 4 * 18 * 18, 4 * 18 * 34]
    assert all(e.act_err is None and e.weighted_err is None for e in errs)


def test_row_subset_keeps_exact_bytes():
    w = np.random.default_rng(1).standard_normal((64, 256)).astype(np.float32)
    (full,) = measure_tensor([MatrixInput(w)], w.shape, [F.Q4_K])
    (sub,) = measure_tensor([MatrixInput(w)], w.shape, [F.Q4_K], max_elements=16 * 256)
    assert sub.nbytes == full.nbytes == 64 * 144
    assert sub.weight_err == pytest.approx(full.weight_err, rel=0.3)


def test_candidates_parse_and_reject_unknown():
    assert parse_candidates(None) == DEFAULT_CANDIDATES
    assert parse_candidates("q4_k, Q2_K") == (F.Q4_K, F.Q2_K)
    with pytest.raises(AnalysisError, match="Q4_K_XL.*choose from"):
        parse_candidates(["Q4_K_XL"])


def test_partial_measures_of_expert_shares_add_up_to_the_whole_tensor():
    """Processes measure shares of a merged-experts tensor apart; their sums add to the one-call measurement."""
    from dq.analysis.measure import finish_measure, measure_sums

    rng = np.random.default_rng(3)
    mats = [MatrixInput(rng.standard_normal((8, 256)).astype(np.float32), rng.random(256).astype(np.float32) + 0.1,
                        rng.standard_normal((5, 256)).astype(np.float32),
                        rng.standard_normal((2, 8, 256)).astype(np.float32)) for _ in range(4)]
    shape, cands = (4, 8, 256), (F.Q4_K, F.IQ2_XXS)
    whole = measure_tensor(mats, shape, cands, subsets=[None] * 4)
    a = measure_sums(mats[:1], shape, cands, subsets=[None])
    b = measure_sums(mats[1:], shape, cands, subsets=[None] * 3)
    parts = finish_measure(a + b, shape, cands)
    for w, p in zip(whole, parts):
        assert (w.stored, w.nbytes) == (p.stored, p.nbytes)
        for f in ("weight_err", "weighted_err", "act_err", "kld"):
            assert getattr(p, f) == pytest.approx(getattr(w, f), rel=1e-12)
