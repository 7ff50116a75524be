"""Analyze on MoE models (Mixtral, Qwen2-MoE with shared expert) and a LLaVA-style VLM.

Mixtral is upcycled from the tiny Llama (`dq.testing_moe`); Qwen2-MoE is built from its config class with
SmolLM2's BPE tokenizer (`dq.testing_archs`), since llama.cpp's converter reads Qwen2-MoE vocabularies only
as GPT-2 BPE with a pre-tokenizer it knows.
"""

from __future__ import annotations

import numpy as np
import pytest

from dq.analysis.analyze import AnalyzeOptions, analyze
from dq.analysis.roles import TensorRole
from dq.quant.imatrix import read_imatrix

from .conftest import FAST

OPTS = AnalyzeOptions(candidates=("Q4_K", "IQ2_XXS"), **FAST)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe"])
def test_moe_per_expert_imatrix_and_errors(kind, request, tmp_path):
    if kind == "mixtral":
        from dq.testing_moe import upcycle_moe

        model = upcycle_moe(request.getfixturevalue("tiny_llama_dir"), tmp_path / kind, kind=kind, n_experts=4,
                            top_k=2)
    else:
        from dq.testing_archs import tiny_arch

        model = tiny_arch(kind, tmp_path / kind, bpe_tokenizer_dir=request.getfixturevalue("smollm2_dir"))
    a = analyze(model, tmp_path / "out", OPTS)
    by = a.by_name()
    im = read_imatrix(tmp_path / "out" / "imatrix.gguf")
    for layer in range(2):
        gate, up, down = (by[f"blk.{layer}.ffn_{k}_exps.weight"] for k in ("gate", "up", "down"))
        assert gate.role is TensorRole.EXPERT_GATE and down.role is TensorRole.EXPERT_DOWN
        assert gate.shape == (4, 512, 256) and down.shape == (4, 256, 512)
        assert all(e.act_err is not None for e in down.errors)
        counts = im.entries[f"blk.{layer}.ffn_gate_exps.weight"].counts
        assert counts.shape == (4,) and counts.sum() == 2 * a.n_tokens  # top-2: each token counted twice
        np.testing.assert_array_equal(counts, im.entries[f"blk.{layer}.ffn_down_exps.weight"].counts)
        np.testing.assert_array_equal(im.entries[f"blk.{layer}.ffn_gate_exps.weight"].sums,
                                      im.entries[f"blk.{layer}.ffn_up_exps.weight"].sums)
        assert f"blk.{layer}.ffn_gate_inp.weight" in by
        if kind == "qwen2_moe":
            assert by[f"blk.{layer}.ffn_down_shexp.weight"].role is TensorRole.SHARED_DOWN
            assert im.entries[f"blk.{layer}.ffn_down_shexp.weight"].counts.tolist() == [a.n_tokens]


def test_vlm_text_streamed_vision_measured(tiny_llama_dir, tmp_path):
    from dq.testing_vlm import tiny_llava

    model = tiny_llava(tiny_llama_dir, tmp_path / "llava", vision_hidden=256)
    a = analyze(model, tmp_path / "out", OPTS)
    roles = {t.role for t in a.tensors}
    assert TensorRole.VISION in roles and TensorRole.PROJECTOR in roles
    q = a.by_name()["v.blk.0.attn_q.weight"]
    assert q.errors and q.errors[0].act_err is None and q.errors[0].weight_err > 0
    assert a.by_name()["blk.1.ffn_down.weight"].errors[0].act_err is not None
    assert a.architecture == "llama"
