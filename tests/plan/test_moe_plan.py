"""An upcycled MoE under a 1.8-bpw budget: routed experts at 1.58-bit, the rest higher, loads in llama.cpp.

The MoE is sparse-upcycled (dq.testing_moe) from the tiny 256-aligned Llama so that 256-block types
apply to every expert row (SmolLM2's 576-wide rows would force IQ4_NL fallbacks: see bench/moe_plan.py).
"""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from dq.quant.formats import FORMATS, parse_format

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def moe(tiny_llama_dir, tmp_path_factory):
    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.testing_moe import upcycle_moe

    root = tmp_path_factory.mktemp("moe")
    model = upcycle_moe(tiny_llama_dir, root / "mixtral", kind="mixtral", n_experts=16, top_k=2)
    # the default ladder less the four slowest IQ quantizers (IQ4_XS, IQ3_XXS, IQ2_S, IQ2_XS): the 1.58-bit
    # types the routed experts need and every policy floor stay measured
    cands = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0")
    analyze(model, root / "analysis", AnalyzeOptions(n_tokens=512, seq_len=256, ablation_tokens=256, plots=False,
                                                     response_tokens=256,
                                                     candidates=cands))
    return model, root / "analysis"


def test_moe_at_1_8_bpw(moe, tmp_path):
    from dq.export.gguf_quantize import quantize_gguf
    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan
    from dq.quant.assign import assign_types, read_source_tensors

    model, adir = moe
    inputs = load_plan_inputs(adir)
    sources = read_source_tensors(inputs.source_gguf)
    budget = budget_bytes(None, 1.8, sum(int(np.prod(s.shape)) for s in sources))
    plan = make_plan(inputs, budget)
    assert plan.total_bytes <= budget
    bits = {n: FORMATS[t.type].bits_per_weight for n, t in plan.tensors.items()}
    routed = [b for n, b in bits.items() if "_exps" in n]
    assert routed and sum(b < 2.0 for b in routed) >= len(routed) // 2  # 1.58-bit class (IQ1_S/IQ1_M/TQ1_0)
    for layer in (0, 1):
        low = min(bits[f"blk.{layer}.ffn_{p}_exps.weight"] for p in ("gate", "up", "down"))
        for n in ("attn_q", "attn_k", "attn_v", "attn_output"):
            assert bits[f"blk.{layer}.{n}.weight"] > low
    assert plan.tensors["blk.0.ffn_gate_inp.weight"].type.value == "F32"  # router kept
    out = quantize_gguf(inputs.source_gguf, tmp_path / "moe.gguf",
                        assign_types(sources, explicit=plan.explicit_types()), imatrix=inputs.imatrix,
                        imatrix_name=inputs.imatrix_path.name)
    assert out.size == plan.total_bytes
    written = {t.name: t.tensor_type.name for t in GGUFReader(out.path).tensors}
    assert {parse_format(v) for k, v in written.items() if "_exps" in k} & {parse_format("IQ1_S"), parse_format("IQ1_M"), parse_format("TQ1_0")}

    import llama_cpp

    llm = llama_cpp.Llama(str(out.path), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(llm.tokenize(b"Once upon a time there was a little girl"))
    assert np.isfinite(np.array(llm.scores[:8])).all()
    llm.close()
