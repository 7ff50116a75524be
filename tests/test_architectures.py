"""Every architecture users quantize, end to end: convert -> analyze -> plan -> quantize -> llama.cpp.

Each is a tiny random model from transformers' own config class (:mod:`dq.testing_archs`). The written
GGUF is loaded by llama.cpp, and its logits must match transformers' logits of the same model with every
weight replaced by its quantized-dequantized value (libggml's round trip at the type the file holds, with
the imatrix slice dq used), and be far closer to those than to the unquantized model's: so the file holds
what dq planned, in the layout llama.cpp expects (q/k permutations, merged experts, MLA's split kv_b,
gpt-oss's interleaved gate/up), and llama.cpp runs it.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dq.testing_archs import ARCHITECTURES, BPE_ONLY
from tests.preset_oracle import assert_presets_match_dry_run

pytestmark = pytest.mark.slow

TOKENS = [1, 17, 33, 60, 91, 120, 151, 190, 230, 260, 301, 333, 370, 400, 441, 480]
OPTS = dict(n_tokens=512, seq_len=128, grad_tokens=256, act_tokens=64, ablation_tokens=128, plots=False,
            response_tokens=128,
            candidates=("Q8_0", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_S"))


def _hf_model(model_dir):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForImageTextToText

    vlm = getattr(AutoConfig.from_pretrained(model_dir), "vision_config", None) is not None
    auto = AutoModelForImageTextToText if vlm else AutoModelForCausalLM
    return auto.from_pretrained(model_dir, dtype=torch.float32).eval()


def _round_trip(w: np.ndarray, fmt, im: np.ndarray | None) -> np.ndarray:
    from dq.quant import libggml
    from dq.quant.formats import FORMATS

    if FORMATS[fmt].is_float:
        return w
    if im is None and FORMATS[fmt].needs_imatrix:
        im = np.ones(w.shape[-1], np.float32)
    return libggml.dequantize(libggml.quantize(w, fmt, im), fmt, w.shape)


def _quantized_hf_model(model_dir, gguf_path, analysis, imatrix):
    """The HF model with each weight replaced by its round trip at the type ``gguf_path`` stores it in."""
    from dq.analysis.collect import expert_params, split_gate_up
    from dq.analysis.splits import split_of
    from dq.quant.formats import parse_format
    from dq.quant.gguf_header import read_gguf_header

    model = _hf_model(model_dir)
    stored = {t.name: parse_format(t.ggml_type) for t in read_gguf_header(gguf_path).tensors}
    params = dict(model.named_parameters())
    mods = dict(model.named_modules())

    def weights(name, k=0):
        w = imatrix.weights_for(name)
        return None if w is None else w[k if w.shape[0] > 1 else 0]

    done = set()
    for t in analysis.tensors:
        if not t.errors or t.hf_name in done and not t.name.endswith("_exps.weight"):
            continue
        if t.role.value in ("vision", "projector"):
            continue  # the mmproj file's: no part of the text logits
        p = params.get(t.hf_name)
        if p is None:
            continue
        with torch.no_grad():
            if t.name.endswith("_exps.weight"):
                mod_path, _, pname = t.hf_name.rpartition(".")
                mod = mods[mod_path]
                ep = {k: v.detach().clone() for k, v in expert_params(mod).items()}
                for e in range(p.shape[0]):
                    if "down" in t.name:
                        w = ep["down_proj"][e]
                        tr = bool(getattr(mod, "is_transposed", False))
                        m = (w.T if tr else w).numpy()
                        q = torch.from_numpy(_round_trip(m, stored[t.name], weights(t.name, e)))
                        p[e].copy_(q.T if tr else q)
                    else:
                        gate, up = split_gate_up(mod, ep, e)
                        which = gate if "gate" in t.name else up
                        q = torch.from_numpy(_round_trip(which.contiguous().numpy(), stored[t.name], weights(t.name, e)))
                        # write back through the same view split_gate_up reads
                        view_g, view_u = split_gate_up(mod, {k: v for k, v in expert_params(mod).items()}, e)
                        (view_g if "gate" in t.name else view_u).copy_(q)
                continue
            parts = split_of(analysis.architecture, t.name.replace("attn_k_b", "attn_kv_b").replace("attn_v_b", "attn_kv_b"),
                             model.config)
            if parts is not None:  # MLA's kv_b: quantized as the two GGUF tensors, reassembled
                w = p.detach().numpy()
                k_b, v_b = (np.stack([_round_trip(m, stored[part.name], None) for m in part.take(w)]) for part in parts)
                h, lora, nope = k_b.shape
                p.copy_(torch.from_numpy(np.concatenate([k_b.transpose(0, 2, 1), v_b], axis=1).reshape(-1, lora)))
                done.add(t.hf_name)
                continue
            q = _round_trip(p.detach().numpy(), stored[t.name], weights(t.name))
            p.copy_(torch.from_numpy(q))
            done.add(t.hf_name)
    return model


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_architecture_end_to_end(arch, smollm2_dir, tmp_path):
    import llama_cpp

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.export.plan_files import write_plan_files
    from dq.plan.planner import load_plan_inputs, make_plan
    from dq.testing_archs import tiny_arch

    model_dir = tiny_arch(arch, tmp_path / arch, bpe_tokenizer_dir=smollm2_dir if arch in BPE_ONLY else None)
    analysis = analyze(model_dir, tmp_path / "analysis", AnalyzeOptions(**OPTS))
    inputs = load_plan_inputs(tmp_path / "analysis")
    assert_presets_match_dry_run(inputs.source_gguf)  # llama.cpp's preset rules, as dq ports them, on this arch
    q8 = sum(math.ceil(math.prod(s.shape) * 8.5 / 8) for s in inputs.sources if len(s.shape) >= 2
             and s.name not in inputs.mmproj_names)
    try:
        make_plan(inputs, 1)
    except Exception as exc:  # the budget error states the smallest achievable file
        smallest = int(str(exc).split("policy: ")[1].split(" bytes")[0].replace(",", ""))
    plan = make_plan(inputs, smallest + (q8 - smallest) // 20)  # a low budget: 5% of the way to Q8_0
    files = write_plan_files(plan, inputs.source_gguf, inputs.mmproj_gguf, tmp_path / "q.gguf",
                             imatrix=inputs.imatrix, imatrix_name=inputs.imatrix_path.name)
    out = files[0]
    assert sum(f.size for f in files) == plan.total_bytes
    if arch == "qwen2_vl":  # text GGUF + mmproj GGUF, the vision tower at the policy's vision types
        from gguf import GGUFReader

        mm = {t.name: t.tensor_type.name for t in GGUFReader(files[1].path).tensors}
        assert set(plan.mmproj) == set(mm) and "v.blk.0.attn_q.weight" in mm
        assert all(mm[n] == plan.tensors[n].type.value for n in mm)
        assert {mm[n] for n in mm if n.endswith("attn_q.weight")} <= {"BF16", "Q8_0"}
    low = [n for n, t in plan.tensors.items() if t.type.value in ("IQ1_S", "IQ2_XXS", "Q2_K")]
    assert low, "the budget should push some tensors to 2 bits or below"

    llm = llama_cpp.Llama(str(out.path), n_ctx=64, logits_all=True, verbose=False, n_threads=2)
    llm.eval(TOKENS)
    got = np.array(llm.scores[: len(TOKENS)], dtype=np.float64)
    llm.close()
    ids = torch.tensor([TOKENS])
    with torch.no_grad():
        want = _quantized_hf_model(model_dir, out.path, analysis, inputs.imatrix)(ids).logits[0].double().numpy()
        base = _hf_model(model_dir)(ids).logits[0].double().numpy()
    err, quant_effect = np.abs(got - want).mean(), np.abs(base - want).mean()
    print(f"{arch}: |llama.cpp - torch(Q(W))| {err:.4g}, |torch(W) - torch(Q(W))| {quant_effect:.4g}")
    assert err < 0.2 * quant_effect, (err, quant_effect)
