"""The streamed imatrix equals a hand computation with the whole HF model, and llama.cpp accepts it."""

from __future__ import annotations

import numpy as np
import torch

from dq.analysis.roles import TensorRole
from dq.quant.formats import QuantFormat as F
from dq.quant.imatrix import read_imatrix


def _hand_sums(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    sums: dict[str, torch.Tensor] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            def hook(m, inp, out, name=name):
                x = inp[0].reshape(-1, inp[0].shape[-1]).double()
                sums[name] = sums.get(name, 0) + (x**2).sum(0)
            hooks.append(mod.register_forward_hook(hook))
    with torch.no_grad():
        for s in range(ids.shape[0]):
            model(input_ids=ids[s : s + 1])
    return sums


def test_imatrix_equals_hand_computation(tiny_analysis, tiny_llama_dir):
    from transformers import AutoTokenizer

    from dq.calibration import sample_calibration

    analysis, out, opts = tiny_analysis
    im = read_imatrix(out / "imatrix.gguf")
    ids = sample_calibration(AutoTokenizer.from_pretrained(tiny_llama_dir), opts.n_tokens // opts.seq_len,
                             opts.seq_len, seed=opts.seed).ids
    hand = _hand_sums(tiny_llama_dir, ids)
    pairs = {
        "blk.0.attn_q.weight": "model.layers.0.self_attn.q_proj", "blk.1.attn_v.weight": "model.layers.1.self_attn.v_proj",
        "blk.0.attn_output.weight": "model.layers.0.self_attn.o_proj", "blk.1.ffn_down.weight": "model.layers.1.mlp.down_proj",
        "blk.1.ffn_up.weight": "model.layers.1.mlp.up_proj", "output.weight": "lm_head",
    }
    for gguf_name, hf in pairs.items():
        e = im.entries[gguf_name]
        assert e.counts.tolist() == [ids.numel()]
        np.testing.assert_allclose(e.sums[0], hand[hf].numpy(), rtol=2e-4, atol=1e-6)
    # every linear of every block has an entry, keyed by the GGUF name
    linear = {t.name for t in analysis.tensors if t.errors and t.role is not TensorRole.EMBEDDING}
    assert linear <= set(im.entries)


def test_llama_cpp_and_dq_quantize_accept_the_imatrix(tiny_analysis, tiny_bf16_gguf, tmp_path):
    from dq.export.gguf_quantize import quantize_gguf
    from dq.quant.assign import assign_types, read_source_tensors
    from dq.quant.llama_quantize import llama_quantize

    _, out, _ = tiny_analysis
    im = read_imatrix(out / "imatrix.gguf")
    res = llama_quantize(tiny_bf16_gguf, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=im.flat_weights())
    assert F.IQ2_XXS in set(res.types.values())
    sources = read_source_tensors(tiny_bf16_gguf)
    explicit = {s.name: F.IQ2_XXS for s in sources if len(s.shape) == 2 and s.name in im.entries}
    assert explicit
    q = quantize_gguf(tiny_bf16_gguf, tmp_path / "dq.gguf", assign_types(sources, explicit=explicit), imatrix=im)
    assert q.size > 0


def test_analysis_roundtrips_and_has_every_tensor(tiny_analysis, tiny_bf16_gguf):
    from dq.analysis.artifact import Analysis
    from dq.quant.assign import read_source_tensors

    analysis, out, _ = tiny_analysis
    again = Analysis.load(out)
    assert again == Analysis.from_dict(analysis.to_dict())
    gguf_names = {s.name for s in read_source_tensors(tiny_bf16_gguf)}
    assert {t.name for t in analysis.tensors} == gguf_names
    t = analysis.by_name()["blk.0.ffn_down.weight"]
    assert [e.requested for e in t.errors] == [F.Q4_K, F.IQ2_XXS]
    assert all(e.act_err is not None and e.weighted_err is not None for e in t.errors)
    assert (out / "errors.csv").is_file() and (out / "super_weights.csv").is_file()
