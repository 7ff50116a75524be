"""Split GGUF output: gguf-py's own split writer gives the same shards byte for byte; llama.cpp loads a
split model with the same logits as the single file; an interrupted split leaves no shard behind."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter

import dq
from dq.export.gguf_quantize import quantize_gguf
from dq.quant.assign import assign_preset, assign_types, read_source_tensors
from dq.quant.gguf_split import parse_split_size, plan_shards, shard_paths
from dq.quant.layout import predict_size


def _source(path):
    """A small unquantized GGUF written by gguf-py."""
    rng = np.random.default_rng(0)
    w = GGUFWriter(path, "llama")
    w.add_uint32("llama.block_count", 3)
    w.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    tensors = {f"blk.{i}.t.weight": rng.standard_normal((64, 32), dtype=np.float32) for i in range(5)}
    for name, t in tensors.items():
        w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


def test_shards_equal_gguf_py_split_writer(tmp_path):
    tensors = _source(tmp_path / "src.gguf")
    max_bytes = 3 * 64 * 32 * 4 - 1  # two tensors per shard, then one
    a = assign_types(read_source_tensors(tmp_path / "src.gguf"))
    (tmp_path / "dq").mkdir()
    out = quantize_gguf(tmp_path / "src.gguf", tmp_path / "dq" / "m.gguf", a, split_max_bytes=max_bytes)
    assert [p.name for p in out.files] == [f"m-0000{i}-of-00003.gguf" for i in (1, 2, 3)]
    assert out.size == sum(p.stat().st_size for p in out.files) == predict_size(tmp_path / "src.gguf", a,
                                                                                 split_max_bytes=max_bytes)
    (tmp_path / "ref").mkdir()
    g = GGUFWriter(tmp_path / "ref" / "m.gguf", "llama", split_max_size=max_bytes)
    g.add_uint32("llama.block_count", 3)
    g.add_array("tokenizer.ggml.tokens", ["<s>", "a", "b"])
    g.add_uint32("general.quantization_version", 2)
    g.add_uint32("general.file_type", 0)
    g.add_string("dq.version", dq.__version__)
    for name, t in tensors.items():
        g.add_tensor(name, t)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    for ours in out.files:
        assert ours.read_bytes() == (tmp_path / "ref" / ours.name).read_bytes(), ours.name
    assert GGUFReader(out.files[1]).fields["split.no"].contents() == 1


def test_llama_cpp_loads_a_split_model_with_the_same_logits(tiny_bf16_gguf, tmp_path):
    import llama_cpp

    a = assign_preset(tiny_bf16_gguf, "Q8_0")
    one = quantize_gguf(tiny_bf16_gguf, tmp_path / "one.gguf", a)
    split = quantize_gguf(tiny_bf16_gguf, tmp_path / "split.gguf", a, split_max_bytes=300_000)
    assert len(split.files) >= 3
    logits = []
    for path in (one.path, split.path):
        llm = llama_cpp.Llama(str(path), n_ctx=64, logits_all=True, verbose=False)
        llm.eval([1, 10, 20, 30, 40])
        logits.append(np.array(llm.scores[:5]))
        llm.close()
    np.testing.assert_array_equal(logits[0], logits[1])


def test_interrupted_split_leaves_no_shard(tiny_bf16_gguf, tmp_path):
    a = assign_preset(tiny_bf16_gguf, "Q8_0")
    seen = []

    def stop_in_third_shard(choice, n):
        seen.append(choice.name)
        if len(seen) == len(a.choices) - 1:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(tiny_bf16_gguf, tmp_path / "m.gguf", a, split_max_bytes=300_000, progress=stop_in_third_shard)
    assert list(tmp_path.iterdir()) == []


def test_shard_rule_and_sizes():
    assert plan_shards([5, 5, 5], 10) == [[0, 1], [2]]
    assert plan_shards([20, 1], 10) == [[0], [1]]  # a tensor over the limit gets its own shard
    assert plan_shards([1, 2, 3], 0) == [[0, 1, 2]]
    assert parse_split_size("50G") == 50 * 1000**3 and parse_split_size("4000M") == 4 * 1000**3
    assert shard_paths("x/m.gguf", 2)[1].name == "m-00002-of-00002.gguf"
