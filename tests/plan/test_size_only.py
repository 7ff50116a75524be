"""Size-only plans: the converter's tensor list from a config alone equals a real conversion's, and the
floor plan's bytes are those dq's writer lays out for the same types."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.slow


def test_tensor_list_from_config_equals_the_real_conversion(smollm2_dir, tmp_path):
    from dq.convert.convert import convert_hf_to_gguf
    from dq.convert.shapes import tensors_from_config
    from dq.plan.policy import Policy
    from dq.plan.sizes import floor_plan
    from dq.quant.assign import assign_types, read_source_tensors
    from dq.quant.layout import header_size, predict_size
    from dq.testing_archs import tiny_arch

    model = tiny_arch("deepseek_v3", tmp_path / "ds", bpe_tokenizer_dir=smollm2_dir)
    real = read_source_tensors(convert_hf_to_gguf(model, tmp_path / "ds.gguf"))
    cfg = json.loads((model / "config.json").read_text())
    from_config = tensors_from_config(cfg, model, cache=tmp_path / "cache")
    assert [(t.name, t.shape, t.fmt) for t in from_config] == [(t.name, t.shape, t.fmt) for t in real]
    assert any(t.name.endswith("attn_k_b.weight") for t in real)  # the MLA split went through the converter

    fp = floor_plan(from_config, Policy.named("unsloth-iq1_s"))
    assert fp.types["blk.1.ffn_gate_exps.weight"].value == "IQ1_S"
    assert fp.types["blk.1.ffn_down_exps.weight"].value == "IQ2_XXS"  # the first MoE layer's down
    assert fp.types["blk.0.ffn_down.weight"].value == "Q4_K" and fp.types["output.weight"].value == "Q6_K"
    a = assign_types(real, explicit={n: t for n, t in fp.types.items() if t is not None})
    src = tmp_path / "ds.gguf"
    assert fp.tensor_bytes == predict_size(src, a) - header_size(src)
