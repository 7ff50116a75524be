"""dq's port of llama.cpp's preset rules against llama.cpp's own dry run, preset by preset.

The truth is ``llama_model_quantize`` with ``dry_run`` (what llama-quantize decides), run on the same GGUF
with and without an importance matrix. SmolLM2 (30 dense layers, tied embeddings, 3 query heads per KV
head, 576 columns: every K-quant falls back) exercises the layer counters; a 16-layer Mixtral with 8
experts exercises the expert rules and the counters of merged expert tensors. Every architecture of
``dq.testing_archs`` is checked the same way in ``tests/test_architectures.py``.
"""

from __future__ import annotations

import pytest

from dq.quant.gguf_header import read_gguf_header
from dq.quant.preset_rules import VERIFIED_ARCHITECTURES, preset_types
from tests.preset_oracle import assert_presets_match_dry_run

pytestmark = pytest.mark.slow


def test_smollm2_every_preset(smollm2_bf16_gguf):
    assert_presets_match_dry_run(smollm2_bf16_gguf)


def test_mixtral_16_layers_8_experts(tmp_path):
    from dq.convert.convert import convert_hf_to_gguf
    from dq.testing_archs import tiny_arch

    model = tiny_arch("mixtral", tmp_path / "m", config={"num_hidden_layers": 16, "num_local_experts": 8})
    gguf = convert_hf_to_gguf(model, tmp_path / "m.gguf")
    header = read_gguf_header(gguf)
    assert header.first("llama.expert_count") == 8 and header.first("llama.block_count") == 16
    assert_presets_match_dry_run(gguf)


def test_the_rules_that_differ_are_exercised(smollm2_bf16_gguf):
    """The cases above would pass vacuously if no rule moved a type: spot-check a few llama.cpp choices."""
    h = read_gguf_header(smollm2_bf16_gguf)
    q4km = preset_types(h, "Q4_K_M").types
    # attn_v: Q6_K on use_more_bits layers (the first 30/8 = 3, every third after, the last 4), else Q4_K;
    # SmolLM2's 576 columns fall back from Q6_K to Q8_0 and from Q4_K to Q5_0
    assert [q4km[f"blk.{i}.attn_v.weight"].value for i in (0, 2, 3, 4, 5, 29)] == \
        ["Q8_0", "Q8_0", "Q5_0", "Q5_0", "Q8_0", "Q8_0"]
    iq3 = {b: preset_types(h, "IQ3_XXS", has_imatrix=b).types["blk.7.attn_v.weight"].value for b in (False, True)}
    assert iq3 == {False: "IQ4_NL", True: "IQ4_NL"}  # IQ3_S / IQ3_XXS, both 256-block: fall back to IQ4_NL
    req = preset_types(h, "IQ3_XXS", has_imatrix=False).requested["blk.7.attn_v.weight"].value
    req_im = preset_types(h, "IQ3_XXS", has_imatrix=True).requested["blk.7.attn_v.weight"].value
    assert (req, req_im) == ("IQ3_S", "IQ3_XXS")


def test_other_architectures_and_70b_shapes_ask_llama_cpp(tmp_path, smollm2_bf16_gguf, monkeypatch):
    import gguf

    for arch, layers in (("llama", 80), ("qwen2", 80), ("falcon", 32)):
        path = tmp_path / f"{arch}.gguf"
        w = gguf.GGUFWriter(str(path), arch)
        w.add_block_count(layers)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        assert preset_types(read_gguf_header(path), "Q4_K_M") is None, arch
    assert "falcon" not in VERIFIED_ARCHITECTURES

    # the fallback: with the port switched off, assign_preset asks the dry run, imatrix flag included
    import dq.quant.preset_rules as rules
    from dq.quant.assign import assign_preset

    want = {b: {c.name: c.stored for c in assign_preset(smollm2_bf16_gguf, "IQ3_XXS", has_imatrix=b).choices}
            for b in (False, True)}
    monkeypatch.setattr(rules, "VERIFIED_ARCHITECTURES", frozenset())
    for b in (False, True):
        got = {c.name: c.stored for c in assign_preset(smollm2_bf16_gguf, "IQ3_XXS", has_imatrix=b).choices}
        assert got == want[b]
    assert want[False] != want[True]  # the imatrix changes IQ3_XXS's attn_v/ffn_down choices
