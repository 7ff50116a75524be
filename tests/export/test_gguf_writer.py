"""The GGUF writer: golden bytes, read-back with gguf-py, exact sizes, state machine, atomicity."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from dq.errors import OutputNotWritableError
from dq.quant import libggml
from dq.quant.formats import QuantFormat
from dq.quant.gguf_writer import GGUFFileWriter


def _writer() -> tuple[GGUFFileWriter, bytes]:
    w = GGUFFileWriter()
    w.add_string("general.architecture", "llama")
    w.add_uint32("llama.block_count", 1)
    w.add_int32("llama.rope.dimension_count", -3)
    w.add_string_array("tokenizer.ggml.tokens", ["<s>", "a", "\u00e9t\u00e9"])
    w.add_tensor_info("t.weight", (2, 32), QuantFormat.Q8_0)
    w.add_tensor_info("n.weight", (3,), QuantFormat.F32)
    w.add_tensor_info("k.weight", (1, 256), QuantFormat.Q4_K)
    payload = libggml.quantize(np.arange(64, dtype=np.float32).reshape(2, 32) / 8, QuantFormat.Q8_0)
    return w, payload


_K_VALUES = np.sin(np.arange(256, dtype=np.float32))[None, :]


def _write_all(w: GGUFFileWriter, path, payload: bytes) -> None:
    w.open(path)
    w.write_tensor("t.weight", payload)
    w.write_tensor("n.weight", np.array([1, 2, 3], np.float32))
    w.write_tensor("k.weight", libggml.quantize(_K_VALUES, QuantFormat.Q4_K))
    w.close()


def _gguf_py_file(path, payload: bytes) -> bytes:
    """The same file written by gguf-py's own GGUFWriter: the independent truth for dq's bytes."""
    import gguf

    g = gguf.GGUFWriter(path, "llama")
    g.add_uint32("llama.block_count", 1)
    g.add_int32("llama.rope.dimension_count", -3)
    g.add_array("tokenizer.ggml.tokens", ["<s>", "a", "\u00e9t\u00e9"])
    g.add_tensor("t.weight", np.frombuffer(payload, np.uint8).reshape(2, 34), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
    g.add_tensor("n.weight", np.array([1, 2, 3], np.float32))
    k = np.frombuffer(libggml.quantize(_K_VALUES, QuantFormat.Q4_K), np.uint8).reshape(1, -1)
    g.add_tensor("k.weight", k, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
    g.write_header_to_file()
    g.write_kv_data_to_file()
    g.write_tensors_to_file()
    g.close()
    return path.read_bytes()


def test_bytes_equal_gguf_py_writer(tmp_path):
    w, payload = _writer()
    expected = w.total_size()
    header = w.header_bytes()
    _write_all(w, tmp_path / "m.gguf", payload)
    data = (tmp_path / "m.gguf").read_bytes()
    assert data == _gguf_py_file(tmp_path / "ref.gguf", payload)
    assert len(data) == expected and data.startswith(header) and len(header) % 32 == 0


def test_written_file_reads_back(tmp_path):
    w, payload = _writer()
    _write_all(w, tmp_path / "m.gguf", payload)
    r = GGUFReader(tmp_path / "m.gguf")
    assert [t.name for t in r.tensors] == ["t.weight", "n.weight", "k.weight"]
    assert r.fields["llama.block_count"].contents() == 1
    assert r.fields["llama.rope.dimension_count"].contents() == -3
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a", "\u00e9t\u00e9"]
    assert bytes(np.asarray(r.tensors[0].data).view(np.uint8).reshape(-1)) == payload
    np.testing.assert_array_equal(r.tensors[1].data, [1, 2, 3])


def test_out_of_order_calls_raise(tmp_path):
    w, payload = _writer()
    with pytest.raises(RuntimeError, match="needs 'data'"):
        w.write_tensor("t.weight", payload)
    w.open(tmp_path / "m.gguf")
    with pytest.raises(RuntimeError, match="needs 'new'"):
        w.add_uint32("x", 1)
    with pytest.raises(RuntimeError, match="out of order"):
        w.write_tensor("n.weight", np.zeros(3, np.float32))
    with pytest.raises(ValueError, match="declared"):
        w.write_tensor("t.weight", payload[:-1])
    with pytest.raises(RuntimeError, match="before all tensors"):
        w.close()
    assert list(tmp_path.iterdir()) == []  # nothing half-written left behind


def test_output_errors(tmp_path):
    w, _ = _writer()
    with pytest.raises(OutputNotWritableError, match="does not exist"):
        w.open(tmp_path / "missing" / "m.gguf")
    with pytest.raises(OutputNotWritableError, match="is a directory"):
        w.open(tmp_path)
