"""The GGUF writer: golden bytes, read-back with gguf-py, exact sizes, state machine, atomicity."""

from __future__ import annotations

import hashlib
import struct

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
    w.add_string_array("tokenizer.ggml.tokens", ["<s>", "a"])
    w.add_tensor_info("t.weight", (2, 32), QuantFormat.Q8_0)
    w.add_tensor_info("n.weight", (3,), QuantFormat.F32)
    payload = libggml.quantize(np.arange(64, dtype=np.float32).reshape(2, 32) / 8, QuantFormat.Q8_0)
    return w, payload


def test_header_golden_bytes():
    w, _ = _writer()
    header = w.header_bytes()
    # magic, version 3, 2 tensors, 3 KVs; then the first KV: key length 20, key, type STRING (8)
    assert header[:24] == b"GGUF" + struct.pack("<IQQ", 3, 2, 3)
    assert header[24:32 + 20 + 4] == struct.pack("<Q", 20) + b"general.architecture" + struct.pack("<I", 8)
    assert len(header) % 32 == 0
    assert hashlib.sha256(header).hexdigest() == "5cacc2099e66f98a29012734090cd814827f0d7c0f4f10002f809acab88f687f"


def test_written_file_reads_back_and_matches_predicted_size(tmp_path):
    w, payload = _writer()
    expected = w.total_size()
    w.open(tmp_path / "m.gguf")
    w.write_tensor("t.weight", payload)
    w.write_tensor("n.weight", np.array([1, 2, 3], np.float32))
    w.close()
    data = (tmp_path / "m.gguf").read_bytes()
    assert len(data) == expected
    assert hashlib.sha256(data).hexdigest() == "e8c1d31e020e30af1ae722e78ad6ea8ee4753da44988ec7573396d3fdaa43552"
    r = GGUFReader(tmp_path / "m.gguf")
    assert [t.name for t in r.tensors] == ["t.weight", "n.weight"]
    assert r.fields["llama.block_count"].contents() == 1
    assert r.fields["tokenizer.ggml.tokens"].contents() == ["<s>", "a"]
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
