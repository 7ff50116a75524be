"""dq's fast GGUF header reader against gguf-py's GGUFReader (the independent truth) on real files."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGUFReader

from dq.errors import CorruptFileError
from dq.quant.gguf_header import read_gguf_header


def _check(path):
    ours, ref = read_gguf_header(path), GGUFReader(path)
    assert [t.name for t in ours.tensors] == [t.name for t in ref.tensors]
    for a, b in zip(ours.tensors, ref.tensors):
        assert a.shape == tuple(int(d) for d in reversed(b.shape.tolist())), a.name
        assert a.ggml_type == int(b.tensor_type)
        assert ours.data_offset + a.offset == int(b.data_offset)
        got = ours.tensor_bytes(a, int(b.n_bytes))
        assert bytes(got) == bytes(np.asarray(b.data).reshape(-1).view(np.uint8)), a.name
    fields = {k: f for k, f in ref.fields.items() if not k.startswith("GGUF.")}
    assert list(ours.kv) == list(fields)
    for k, f in fields.items():
        assert ours.kv[k] == b"".join(np.asarray(p).tobytes() for p in f.parts), k
    assert ours.value("general.architecture") == fields["general.architecture"].contents()


def test_header_equals_gguf_py_on_the_tiny_model(tiny_bf16_gguf):
    _check(tiny_bf16_gguf)


@pytest.mark.slow
def test_header_equals_gguf_py_on_smollm2(smollm2_bf16_gguf):
    _check(smollm2_bf16_gguf)  # a 49,152-token vocabulary with merges: the string-array path


def test_corrupt_and_foreign_files_are_refused(tiny_bf16_gguf, tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"NOPE" + bytes(100))
    with pytest.raises(CorruptFileError, match="not a GGUF"):
        read_gguf_header(tmp_path / "x.gguf")
    (tmp_path / "cut.gguf").write_bytes(tiny_bf16_gguf.read_bytes()[:300])
    with pytest.raises(CorruptFileError, match="truncated"):
        read_gguf_header(tmp_path / "cut.gguf")
