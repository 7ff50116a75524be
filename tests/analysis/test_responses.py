"""Role responses: the streamed measurement equals a whole-model computation, and the planner's factors.

The truth is plain transformers: the whole model loaded at once, every tensor of a role replaced by
libggml's round trip at the anchor type (with the analysis's imatrix), and the mean KL divergence from the
unmodified model's next-token distributions over the scored positions of the same PROBE windows.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from dq.analysis.analyze import AnalyzeOptions, analyze
from dq.analysis.responses import RoleResponse
from dq.plan.damage import DamageModel, response_factors
from dq.quant import libggml
from dq.quant.formats import QuantFormat, effective_format
from dq.quant.imatrix import read_imatrix

OPTS = AnalyzeOptions(n_tokens=512, seq_len=128, grad_tokens=256, act_tokens=64, ablation_tokens=0,
                      super_weights=False, plots=False, response_tokens=256,
                      candidates=("Q4_K", "Q3_K", "IQ2_XXS"))


@pytest.fixture(scope="module")
def analysed(tiny_llama_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("responses")
    return analyze(tiny_llama_dir, out, OPTS), out


def _whole_model_kld(model_dir, names: set[str], fmt: QuantFormat, imatrix) -> float:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dq.analysis.gradients import scored_positions
    from dq.analysis.names import NameMapper
    from dq.calibration import Purpose, sample_calibration

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = sample_calibration(tok, OPTS.response_tokens // OPTS.seq_len, OPTS.seq_len, purpose=Purpose.PROBE,
                             seed=OPTS.seed).ids
    sc = scored_positions(OPTS.seq_len)
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits[:, sc].double(), -1)
        mapper = NameMapper(model.config.model_type, model.config.num_hidden_layers, "model", "lm_head")
        for n, p in model.named_parameters():
            if mapper.gguf_name(n) in names:
                w = p.detach().numpy()
                im = imatrix.weights_for(mapper.gguf_name(n))
                stored = effective_format(fmt, w.shape)
                blob = libggml.quantize(w, stored, None if im is None else im[0])
                p.copy_(torch.from_numpy(libggml.dequantize(blob, stored, w.shape)))
        quant = torch.log_softmax(model(ids).logits[:, sc].double(), -1)
    return float((base.exp() * (base - quant)).sum(-1).mean())


def test_every_block_role_and_the_head_are_measured_at_each_anchor(analysed):
    a, _ = analysed
    got = {(r["role"], r["type"]) for r in a.extra["responses"]}
    roles = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down", "output"}
    assert got == {(r, t) for r in roles for t in ("IQ2_XXS", "Q3_K")}  # IQ1_S is not a candidate here
    for r in a.extra["responses"]:
        assert r["kld"] > 0 and r["tokens"] == 2 * 63
        assert len(r["tensors"]) == (1 if r["role"] == "output" else 2)  # two layers
    by = {(r["role"], r["type"]): r["kld"] for r in a.extra["responses"]}
    assert all(by[(r, "IQ2_XXS")] > by[(r, "Q3_K")] for r in roles)  # fewer bits, more damage


@pytest.mark.parametrize("role,fmt", [("ffn_down", "IQ2_XXS"), ("attn_q", "Q3_K"), ("output", "IQ2_XXS")])
def test_streamed_response_equals_whole_model_kld(analysed, tiny_llama_dir, role, fmt):
    a, out = analysed
    r = next(RoleResponse.from_dict(d) for d in a.extra["responses"] if d["role"] == role and d["type"] == fmt)
    want = _whole_model_kld(tiny_llama_dir, set(r.tensors), QuantFormat(fmt), read_imatrix(out / "imatrix.gguf"))
    assert r.kld == pytest.approx(want, rel=2e-3)


def test_planner_prices_each_role_at_its_measured_factor(analysed):
    a, _ = analysed
    raw = DamageModel.from_analysis(dataclasses.replace(a, extra={**a.extra, "responses": []}))
    dm = DamageModel.from_analysis(a)
    responses = [RoleResponse.from_dict(d) for d in a.extra["responses"]]
    factors = response_factors(responses, raw.kld)
    for r in responses:  # at an anchor: the role's summed price is what was measured
        assert sum(dm.kld[n][r.type] for n in r.tensors) == pytest.approx(r.kld, rel=1e-9)
        assert factors[r.role][r.type] == pytest.approx(r.kld / sum(raw.kld[n][r.type] for n in r.tensors))
    # Q4_K (4.5 bits) lies beyond the anchors (IQ2_XXS 2.06, Q3_K 3.44): priced at Q3_K's factor
    n = "blk.1.ffn_up.weight"
    assert dm.kld[n][QuantFormat.Q4_K] == pytest.approx(raw.kld[n][QuantFormat.Q4_K] * factors["ffn_up"][QuantFormat.Q3_K])
    assert dm.info["response_factors"]["ffn_up"]["Q3_K"] == pytest.approx(factors["ffn_up"][QuantFormat.Q3_K], abs=1e-4)


def test_factor_between_anchors_is_log_linear_in_bits():
    from dq.plan.damage import factor_at

    anchors = {QuantFormat.IQ2_XXS: 2.0, QuantFormat.Q3_K: 0.5}
    b0, b1, b = 2.0625, 3.4375, 2.625  # IQ2_XXS, Q3_K, Q2_K bits per weight
    want = np.exp(np.log(2.0) + (b - b0) / (b1 - b0) * (np.log(0.5) - np.log(2.0)))
    assert factor_at(anchors, QuantFormat.Q2_K) == pytest.approx(want)
    assert factor_at(anchors, QuantFormat.IQ1_S) == pytest.approx(2.0)
    assert factor_at(anchors, QuantFormat.Q8_0) == pytest.approx(0.5)
