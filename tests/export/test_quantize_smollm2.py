"""SmolLM2-135M end to end: HF -> BF16 GGUF (llama.cpp's converter) -> quantized GGUFs -> llama.cpp logits."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from dq.export.gguf_quantize import quantize_gguf
from dq.quant.assign import assign_preset, parse_tensor_type
from dq.quant.imatrix import Imatrix
from dq.quant.layout import predict_size
from tests.imatrix_oracle import torch_imatrix

pytestmark = pytest.mark.slow

TEXT = ("The capital of France is Paris. It is known for the Eiffel Tower, its museums and its food. "
        "Many tourists visit the city every year, and the river Seine flows through its centre.")


def _log_softmax(x):
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _kld(p_logits, q_logits):
    p, q = _log_softmax(p_logits.astype(np.float64)), _log_softmax(q_logits.astype(np.float64))
    return (np.exp(p) * (p - q)).sum(-1)


@pytest.fixture(scope="module")
def token_ids(smollm2_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_dir)(TEXT).input_ids


@pytest.fixture(scope="module")
def hf_logits(smollm2_dir, token_ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    with torch.no_grad():
        return model(torch.tensor([token_ids])).logits[0].numpy()


def _llama_logits(path, token_ids):
    import llama_cpp

    llm = llama_cpp.Llama(str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    assert llm.tokenize(TEXT.encode(), add_bos=False) == token_ids  # same tokenizer after conversion
    llm.eval(token_ids)
    out = np.array(llm.scores[: len(token_ids)], dtype=np.float32)
    llm.close()
    return out


@pytest.fixture(scope="module")
def bf16_logits(smollm2_bf16_gguf, token_ids):
    return _llama_logits(smollm2_bf16_gguf, token_ids)


def test_bf16_gguf_logits_match_transformers(hf_logits, bf16_logits):
    # llama.cpp's CPU BF16 matmul rounds activations to bf16; transformers here computes in fp32.
    # Tolerance: mean KLD < 1e-3, max |logit diff| < 0.5 (logits reach ~30), identical argmax.
    # Measured on this machine: mean KLD 1.0e-4, max |diff| 0.27.
    kld = _kld(hf_logits, bf16_logits)
    assert kld.mean() < 1e-3
    assert np.abs(hf_logits - bf16_logits).max() < 0.5
    assert (hf_logits.argmax(-1) == bf16_logits.argmax(-1)).all()


def test_q4_k_m_loads_and_types_read_back(smollm2_bf16_gguf, bf16_logits, token_ids, tmp_path):
    a = assign_preset(smollm2_bf16_gguf, "Q4_K_M")
    out = quantize_gguf(smollm2_bf16_gguf, tmp_path / "q4km.gguf", a)
    assert out.size == predict_size(smollm2_bf16_gguf, a) == out.path.stat().st_size
    written = {t.name: t.tensor_type.name for t in GGUFReader(out.path).tensors}
    assert written == {c.name: c.stored.value for c in a.choices}
    # SmolLM2's 576-wide rows cannot hold 256-blocks: the fallbacks are recorded, not silent
    assert {(c.requested.value, c.stored.value) for c in a.fallbacks} >= {("Q4_K", "Q5_0"), ("Q6_K", "Q8_0")}
    kld = _kld(bf16_logits, _llama_logits(out.path, token_ids))
    assert kld.mean() < 0.15  # measured 0.075 on this 40-token text (a 135M model at ~5.3 bits)


@pytest.fixture(scope="module")
def smollm2_imatrix(smollm2_dir) -> Imatrix:
    from dq.data import calibration_text

    return torch_imatrix(smollm2_dir, calibration_text()[:6000], n_tokens=512)


def test_mixed_recipe_with_imatrix(smollm2_bf16_gguf, smollm2_imatrix, bf16_logits, token_ids, tmp_path):
    # attention Q8_0, FFN IQ2_XXS with an imatrix computed in torch; SmolLM2 ties its output to
    # token_embd, so the "output" rule applies to token_embd.
    overrides = [parse_tensor_type(s) for s in ("attn_=Q8_0", "ffn_=IQ2_XXS", "^token_embd\\.weight=Q6_K")]
    a = assign_preset(smollm2_bf16_gguf, "IQ2_XXS", overrides)
    out = quantize_gguf(smollm2_bf16_gguf, tmp_path / "mix.gguf", a, imatrix=smollm2_imatrix)
    written = {t.name: t.tensor_type.name for t in GGUFReader(out.path).tensors}
    assert written == {c.name: c.stored.value for c in a.choices}
    assert written["blk.0.attn_q.weight"] == "Q8_0"
    assert written["blk.0.ffn_down.weight"] == "IQ2_XXS"  # 1536-wide rows: the real IQ2_XXS
    assert written["blk.0.ffn_up.weight"] == "IQ4_NL"  # 576-wide: llama.cpp's fallback, reported
    assert written["token_embd.weight"] == "Q8_0"  # 576-wide: Q6_K falls back to Q8_0
    assert {c.name for c in a.fallbacks} >= {"blk.0.ffn_up.weight", "token_embd.weight"}
    logits = _llama_logits(out.path, token_ids)
    assert np.isfinite(logits).all()
    assert (logits.argmax(-1) == bf16_logits.argmax(-1)).mean() > 0.5
