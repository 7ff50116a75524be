"""The torch GGUF backend (`dq eval --device cuda`): a GGUF's tensors dequantized by dq's kernels into the
base's transformers model. Truths: the HF model itself (a BF16 GGUF holds its weights rounded to bf16, so the
logits must be identical, which checks every name and llama's q/k permutation) and llama.cpp's own KLD of a
quantized file. Here on the CPU (the same code path; the GPU run is bench/eval_gpu.py)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dq.errors import UnsupportedArchitectureError
from dq.evals.backends import HFLogits, open_logits_model, resolve_model_ref
from dq.evals.errors import EvalConfigError
from dq.evals.gguf_torch import GGUFTorchLogits

TOKENS = [1, 17, 33, 60, 91, 120, 151, 190, 230, 260, 301, 333]


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_bf16_gguf_gives_the_hf_models_logits(device, tiny_llama_dir, tiny_bf16_gguf):
    """Tiny Llama with grouped-query attention (4 heads, 2 KV heads): q and k are permuted differently.
    On the CPU the logits are identical; on the GPU (other matmul kernels) within float32 rounding."""
    g = GGUFTorchLogits(resolve_model_ref(tiny_bf16_gguf), tiny_llama_dir, device=device)
    h = HFLogits(resolve_model_ref(tiny_llama_dir))
    for p in h.model.parameters():
        p.data = p.data.bfloat16().float()
    a, b = g.logits(TOKENS), h.logits(TOKENS)
    if device == "cpu":
        np.testing.assert_array_equal(a, b)
    else:
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)
    g.close()


def test_without_undoing_the_permutation_the_logits_are_wrong(tiny_llama_dir, tiny_bf16_gguf, monkeypatch):
    import dq.evals.gguf_torch as gt

    h = HFLogits(resolve_model_ref(tiny_llama_dir)).logits(TOKENS)
    monkeypatch.setitem(gt.TORCH_EVAL_FAMILIES, "llama", (False, False))
    g = GGUFTorchLogits(resolve_model_ref(tiny_bf16_gguf), tiny_llama_dir, device="cpu").logits(TOKENS)
    assert np.abs(g - h).max() > 1e-2  # measured 0.062 (the correct path: exactly 0)


def test_unsupported_family_and_missing_base(tiny_llama_dir, tiny_bf16_gguf, monkeypatch):
    import dq.evals.gguf_torch as gt

    with pytest.raises(EvalConfigError, match="--base"):
        open_logits_model(tiny_bf16_gguf, device="cuda")
    monkeypatch.setattr(gt, "TORCH_EVAL_FAMILIES", {"qwen2": (False, False)})
    with pytest.raises(UnsupportedArchitectureError, match="drop --device"):
        GGUFTorchLogits(resolve_model_ref(tiny_bf16_gguf), tiny_llama_dir, device="cpu")


@pytest.mark.slow
@pytest.mark.parametrize("preset", ["Q2_K", "IQ1_S"])
def test_kld_agrees_with_llama_cpp(preset, smollm2_dir, smollm2_quant, fast_kld_cfg):
    """The same SmolLM2 file, KLD against the same base pass, by llama.cpp and by the torch backend.
    llama.cpp rounds activations to 8 bits in its quantized dot products (Q8_K / Q8_0), which the torch
    path does not; tolerance: mean KLD within 5% relative, same-top within 2 points.
    Measured (2 x 512 tokens, 510 scored): Q2_K 0.3567 vs llama.cpp 0.3638 (-2.0%), same-top 74.5% vs 73.5%;
    IQ1_S 1.0858 vs 1.0907 (-0.4%), 56.3% vs 56.1%."""
    from dataclasses import replace

    from dq.evals.kld import run_kld

    q = smollm2_quant(preset)
    ref = run_kld(q, smollm2_dir, fast_kld_cfg)
    ours = run_kld(q, smollm2_dir, replace(fast_kld_cfg, gguf_backend="torch"))
    print(preset, "llama.cpp", ref.kld_mean, ref.same_top, "torch", ours.kld_mean, ours.same_top)
    assert ours.n_tokens == ref.n_tokens
    assert abs(ours.kld_mean / ref.kld_mean - 1) < 0.05, (ours.kld_mean, ref.kld_mean)
    assert abs(ours.same_top - ref.same_top) <= 0.02
