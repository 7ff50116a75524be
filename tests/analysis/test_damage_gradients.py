"""The streamed damage model equals its whole-model version, on a dense and an upcycled MoE model.

The truth here is independent of dq's streaming code: the whole model is loaded with transformers,
the same probes are drawn at the scored logits, one ``backward()`` per probe sequence gives every weight
gradient from autograd, and the predicted KLD of each tensor and type is computed from those and from
libggml's round trip. `dq analyze` must give the same numbers from its block-by-block backward sweep
(per-expert gradients from routed tokens, chunked LM head, embedding rows, tied head included).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dq.analysis.analyze import AnalyzeOptions, analyze
from dq.analysis.gradients import fisher_rows
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat, effective_format
from dq.quant.imatrix import read_imatrix

OPTS = dict(n_tokens=768, seq_len=128, grad_tokens=384, act_tokens=64, ablation_tokens=0, super_weights=False,
            max_elements=1 << 15,  # row subsets in every tensor, the head included
            plots=False, candidates=("Q8_0", "Q4_K", "Q2_K", "IQ2_XXS"))


def _whole_model_grads(model_dir, opts: AnalyzeOptions):
    """Per probe, every parameter's gradient of ``v . logits`` by plain autograd on the whole model."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dq.analysis.gradients import head_chunk_rows, probe_signs, scored_positions
    from dq.calibration import sample_calibration

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = sample_calibration(tok, opts.n_tokens // opts.seq_len, opts.seq_len, seed=opts.seed).ids
    n_probe = opts.grad_tokens // opts.seq_len
    sc = scored_positions(opts.seq_len)
    per_seq = sc.stop - sc.start
    with torch.no_grad():
        z_all = torch.cat([model(ids[j : j + 1]).logits[0, sc].float() for j in range(n_probe)])
    vocab, d = model.get_output_embeddings().weight.shape
    chunk = head_chunk_rows(d, z_all.shape[0])
    r = torch.cat([probe_signs(n_probe, per_seq, min(chunk, vocab - r0), opts.seed, k)
                   for k, r0 in enumerate(range(0, vocab, chunk))], dim=1)
    p = torch.softmax(z_all, -1)
    v = (p.sqrt() * r - p * (p.sqrt() * r).sum(-1, keepdim=True)) / np.sqrt(n_probe * per_seq)
    grads = []
    for j in range(n_probe):
        model.zero_grad(set_to_none=True)
        z = model(ids[j : j + 1]).logits[0, sc].float()
        (z * v[j * per_seq : (j + 1) * per_seq]).sum().backward()
        grads.append({n: q.grad.detach().clone() for n, q in model.named_parameters() if q.grad is not None})
    return model, grads, (p * (1 - p)).sum(0).double().numpy()


def _predicted(w: np.ndarray, gs: list[np.ndarray], fmt: QuantFormat, im: np.ndarray | None,
               row_weight: np.ndarray | float = 1.0) -> float:
    stored = effective_format(fmt, w.shape)
    if im is None and FORMATS[stored].needs_imatrix:
        im = np.ones(w.shape[1], np.float32)
    d = libggml.dequantize(libggml.quantize(w, stored, im), stored, w.shape) - w
    return 0.5 * sum(float((row_weight * ((d * g).sum(1)) ** 2).sum()) for g in gs)


def _check(model_dir, out, expert_slices=None, device="cpu"):
    from dq.analysis.measure import row_subsets

    opts = AnalyzeOptions(**OPTS, device=device)
    a = analyze(model_dir, out, opts)
    im = read_imatrix(out / "imatrix.gguf")
    model, grads, mass = _whole_model_grads(model_dir, opts)
    params = dict(model.named_parameters())
    assert not model.config.tie_word_embeddings
    checked = 0
    for t in a.tensors:
        if not t.errors:
            continue
        if t.name in ("token_embd.weight", "output.weight"):
            # the head is measured on rows drawn by the Fisher mass of the whole model's softmax, each weighted
            # by 1/inclusion; the embedding on every row it has, since only the rows of tokens that occur carry
            # gradient (the model here is untied)
            key = "lm_head.weight" if t.name == "output.weight" else "model.embed_tokens.weight"
            w = params[key].detach().numpy()
            rows, pi = None, np.ones(1)
            if key == "lm_head.weight":
                rows, pi = fisher_rows(mass, opts.max_elements // w.shape[1], opts.seed)
                assert rows is not None and len(rows) < w.shape[0]
            sel = slice(None) if rows is None else rows
            weights = im.weights_for(t.name)
            for e in t.errors:
                want = _predicted(w[sel], [g[key].numpy()[sel] for g in grads], e.requested,
                                  None if weights is None else weights[0], 1.0 / pi)
                assert e.kld == pytest.approx(want, rel=2e-3, abs=1e-12), (t.name, e.requested)
            checked += 1
            continue
        if t.hf_name not in params:
            continue
        w_all = params[t.hf_name].detach()
        mats = expert_slices(t, w_all) if t.name.endswith("_exps.weight") else [w_all]
        g_mats = [expert_slices(t, g[t.hf_name]) if t.name.endswith("_exps.weight") else [g[t.hf_name]] for g in grads]
        weights = im.weights_for(t.name)
        subsets = row_subsets(len(mats), *mats[0].shape, opts.max_elements, opts.seed)
        for e in t.errors:
            want = 0.0
            for k, (w, rows) in enumerate(zip(mats, subsets)):
                sel = slice(None) if rows is None else torch.from_numpy(rows)
                imw = None if weights is None else weights[k if weights.shape[0] > 1 else 0]
                scale = 1.0 if rows is None else w.shape[0] / len(rows)
                want += scale * _predicted(w[sel].numpy(), [gm[k][sel].numpy() for gm in g_mats], e.requested, imw)
            assert e.kld == pytest.approx(want, rel=2e-3, abs=1e-12), (t.name, e.requested)
        checked += 1
    return a, checked


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device"))])
def test_streamed_damage_equals_whole_model(device, tiny_llama_dir, tmp_path):
    """On the GPU (--device cuda: backward sweep on the device, Triton kernels for the errors) the streamed
    numbers equal the same whole-model CPU reference."""
    a, checked = _check(tiny_llama_dir, tmp_path / "an", device=device)
    assert checked == 2 * 7 + 2  # every block tensor, the head and the embedding
    kld = {t.name: t.error_for(QuantFormat.Q2_K).kld for t in a.tensors if t.errors}
    assert all(v > 0 for v in kld.values())


def _expert_slices(transposed: bool, concatenated: bool):
    from dq.analysis.collect import down_weight, split_gate_up

    class _Layout:  # the layout flags split_gate_up/down_weight read from an experts module
        is_transposed = transposed
        is_concatenated = concatenated

    def slices(t, fused):
        key = "down_proj" if "down" in t.name else "gate_up_proj"
        p = {key: fused}
        if "down" in t.name:
            return [down_weight(_Layout, p, e) for e in range(fused.shape[0])]
        return [split_gate_up(_Layout, p, e)[0 if "gate" in t.name else 1] for e in range(fused.shape[0])]

    return slices


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["mixtral", "gpt_oss"])
def test_streamed_damage_of_merged_experts(kind, tiny_llama_dir, smollm2_dir, tmp_path):
    """Per-expert damage from the tokens routed to each expert: Mixtral's halves layout, and gpt-oss's
    transposed, interleaved gate/up with biases and its own clamped gating."""
    from dq.testing_archs import tiny_arch
    from dq.testing_moe import upcycle_moe

    if kind == "mixtral":
        model_dir = upcycle_moe(tiny_llama_dir, tmp_path / "mixtral", kind="mixtral", n_experts=4, top_k=2)
        slices = _expert_slices(False, True)
    else:
        model_dir = tiny_arch("gpt_oss", tmp_path / "gpt_oss", bpe_tokenizer_dir=smollm2_dir)
        slices = _expert_slices(True, False)
    a, checked = _check(model_dir, tmp_path / "an", expert_slices=slices)
    experts = [t for t in a.tensors if t.name.endswith("_exps.weight")]
    assert len(experts) == 6 and checked >= 2 * 3 + 2
    # the merged tensors of one layer get their own measured damage, not a shared layer value
    k = [t.error_for(QuantFormat.Q2_K).kld for t in experts if t.layer == 0]
    assert len(set(np.round(k, 12))) == 3 and min(k) > 0
