"""The streaming loader: every parameter of every supported architecture equals what transformers' own
``from_pretrained`` builds, and loading a block holds one checkpoint tensor at a time besides the block.
"""

from __future__ import annotations

import weakref

import pytest
import torch

from dq.testing_archs import ARCHITECTURES, BPE_ONLY, tiny_arch


def _reference_model(model_dir):
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            return auto.from_pretrained(model_dir, dtype=torch.float32)
        except ValueError:
            continue
    raise AssertionError(f"transformers cannot load {model_dir}")


@pytest.fixture(scope="module")
def arch_dir(request, tmp_path_factory):
    built = {}  # both tests use the same tiny models: build each once

    def build(arch):
        if arch not in built:
            bpe = request.getfixturevalue("smollm2_dir") if arch in BPE_ONLY else None
            built[arch] = tiny_arch(arch, tmp_path_factory.mktemp(arch), bpe_tokenizer_dir=bpe)
        return built[arch]
    return build


@pytest.mark.parametrize("arch", sorted(ARCHITECTURES))
def test_every_parameter_equals_transformers_from_pretrained(arch, arch_dir):
    from dq.analysis.loader import ModelSkeleton

    model_dir = arch_dir(arch)
    ref = dict(_reference_model(model_dir).named_parameters(remove_duplicate=False))
    sk = ModelSkeleton.open(model_dir)
    names = [n for n, _ in sk.model.named_parameters()]
    assert set(names) == set(ref)
    for i in range(sk.n_layers):
        loaded = sk.load(sk.layer_prefix(i))
        for n in loaded:
            got = sk.module_param(n)
            assert got.dtype == torch.float32, n
            torch.testing.assert_close(got, ref[n].detach(), rtol=0, atol=0, msg=n)
        sk.free(sk.layer_prefix(i))
        assert all(sk.module_param(n).is_meta for n in loaded)
    for n in names:
        if not n.startswith(sk.layers_path + "."):  # embeddings, final norm, head, vision tower
            torch.testing.assert_close(sk.tensor(n), ref[n].detach(), rtol=0, atol=0, msg=n)


@pytest.mark.parametrize("arch", ["qwen3_moe", "deepseek_v3", "llama"])
def test_a_block_loads_one_checkpoint_tensor_at_a_time(arch, arch_dir, monkeypatch):
    """Merged experts are filled expert by expert and plain linears row chunk by row chunk: at no time does
    more than one checkpoint-dtype piece exist (the old loader read the whole block first, then transformers
    stacked the experts into another copy before converting it to float32)."""
    from dq.analysis import loader

    live = {"now": 0, "peak": 0, "largest": 0, "total": 0}
    read = loader._SafetensorsFile.read

    def tracked(self, key, r0=None, r1=None):
        t = read(self, key, r0, r1)
        n = t.numel() * t.element_size()
        live["now"] += n
        live["peak"] = max(live["peak"], live["now"])
        live["largest"] = max(live["largest"], n)
        live["total"] += n
        weakref.finalize(t, lambda: live.__setitem__("now", live["now"] - n))
        return t

    sk = loader.ModelSkeleton.open(arch_dir(arch))
    monkeypatch.setattr(loader._SafetensorsFile, "read", tracked)
    layer = sk.n_layers - 1  # DeepSeek's first layer is dense; its last is MoE
    names = sk.load(sk.layer_prefix(layer))
    merged = [n for n in names if n in sk._converter]
    if arch != "llama":
        assert merged, "the tiny MoE should have transformers-merged expert tensors"
        n_exp = sk.module_param(merged[0]).shape[0]
        assert live["largest"] * n_exp <= live["total"]
    assert live["peak"] == live["largest"] < live["total"] / 4, live
