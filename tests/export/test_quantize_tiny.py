"""Per-tensor GGUF quantization on a tiny real Llama, held to llama.cpp's own quantizer byte for byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

from dq.cli import main
from dq.export.gguf_quantize import quantize_gguf
from dq.quant.assign import assign_preset, assign_types, read_source_tensors
from dq.quant.formats import QuantFormat
from dq.quant.imatrix import read_imatrix, write_imatrix
from dq.quant.layout import predict_size
from dq.quant.llama_quantize import PRESETS, llama_quantize
from tests.imatrix_oracle import torch_imatrix


def _tensors(path):
    return {t.name: (t.tensor_type.name, bytes(np.asarray(t.data).view(np.uint8).reshape(-1)))
            for t in GGUFReader(path).tensors}


@pytest.fixture(scope="module")
def tiny_imatrix(tiny_llama_dir, tmp_path_factory):
    from dq.data import calibration_text

    im = torch_imatrix(tiny_llama_dir, calibration_text()[:4000], n_tokens=256)
    return write_imatrix(tmp_path_factory.mktemp("im") / "tiny.imatrix.gguf", im)


@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K", "IQ2_XXS"])
def test_preset_bytes_equal_llama_cpp(preset, tiny_bf16_gguf, tiny_imatrix, tmp_path):
    imatrix = read_imatrix(tiny_imatrix)
    assignment = assign_preset(tiny_bf16_gguf, preset)
    ours = quantize_gguf(tiny_bf16_gguf, tmp_path / "dq.gguf", assignment, imatrix=imatrix,
                         preset_ftype=PRESETS[preset])
    llama_quantize(tiny_bf16_gguf, tmp_path / "ref.gguf", preset, imatrix=imatrix.flat_weights())
    a, b = _tensors(ours.path), _tensors(tmp_path / "ref.gguf")
    assert a.keys() == b.keys()
    for name in a:
        assert a[name][0] == b[name][0], name
        assert a[name][1] == b[name][1], f"{name} bytes differ from llama.cpp's"
    assert not assignment.fallbacks  # widths are multiples of 256


@pytest.mark.parametrize("preset", ["Q4_K_M", "IQ2_XXS"])
def test_kernel_quantizer_writes_llama_cpps_file(preset, tiny_bf16_gguf, tiny_imatrix, tmp_path, monkeypatch):
    """`dq quantize --device cuda`'s path (dq's torch ports packing the blocks), run here on the CPU: the same
    file as llama.cpp's, byte for byte, and libggml quantizes nothing."""
    from dq.quant import libggml

    imatrix = read_imatrix(tiny_imatrix)
    assignment = assign_preset(tiny_bf16_gguf, preset)
    llama_quantize(tiny_bf16_gguf, tmp_path / "ref.gguf", preset, imatrix=imatrix.flat_weights())
    ours_cpu = quantize_gguf(tiny_bf16_gguf, tmp_path / "cpu.gguf", assignment, imatrix=imatrix,
                             preset_ftype=PRESETS[preset])

    def no_libggml(*a, **k):
        raise AssertionError("the kernel path fell back to libggml")

    monkeypatch.setattr(libggml, "requantize_array", no_libggml)
    ours = quantize_gguf(tiny_bf16_gguf, tmp_path / "dev.gguf", assignment, imatrix=imatrix,
                         preset_ftype=PRESETS[preset], device="cpu", kernels=True)
    assert _tensors(ours.path) == _tensors(tmp_path / "ref.gguf")
    assert ours.path.read_bytes() == ours_cpu.path.read_bytes()


@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("preset", ["Q4_K_M", "Q2_K", "IQ2_XXS", "IQ1_S"])
def test_cuda_quantizer_writes_llama_cpps_file(preset, tiny_bf16_gguf, tiny_imatrix, tmp_path):
    """`dq quantize --device cuda`: the GPU writes llama.cpp's file (run by bench/gpu_suite.sh)."""
    imatrix = read_imatrix(tiny_imatrix)
    assignment = assign_preset(tiny_bf16_gguf, preset)
    llama_quantize(tiny_bf16_gguf, tmp_path / "ref.gguf", preset, imatrix=imatrix.flat_weights())
    ours = quantize_gguf(tiny_bf16_gguf, tmp_path / "gpu.gguf", assignment, imatrix=imatrix,
                         preset_ftype=PRESETS[preset], device="cuda")
    assert _tensors(ours.path) == _tensors(tmp_path / "ref.gguf")


def test_kernel_quantizer_works_in_row_chunks(tiny_bf16_gguf, tiny_imatrix, tmp_path):
    """A tensor larger than the device chunk goes through in pieces: the bytes do not change."""
    from dq.export.tensor_quantizers import KernelQuantizer, LibggmlQuantizer

    imatrix = read_imatrix(tiny_imatrix)
    choice = next(c for c in assign_preset(tiny_bf16_gguf, "Q2_K").choices if c.name == "blk.0.ffn_down.weight")
    from dq.quant.formats import tensor_nbytes
    from dq.quant.gguf_header import read_gguf_header

    header = read_gguf_header(tiny_bf16_gguf)
    raw = header.tensor_bytes(next(t for t in header.tensors if t.name == choice.name),
                              tensor_nbytes(choice.source, choice.shape))
    weights = imatrix.weights_for(choice.name)
    whole = KernelQuantizer("cpu", LibggmlQuantizer(1, None))(choice, raw, weights)
    pieces = KernelQuantizer("cpu", LibggmlQuantizer(1, None), chunk_weights=3 * choice.shape[-1] + 5)(
        choice, raw, weights)
    assert bytes(pieces) == bytes(whole) == libggml_bytes(raw, choice, weights)


def libggml_bytes(raw, choice, weights):
    from dq.quant import libggml

    return libggml.requantize(raw, choice.source, choice.shape, choice.stored, weights[0])


def test_imatrix_file_round_trip(tiny_imatrix):
    im = read_imatrix(tiny_imatrix)
    assert im.chunk_size == 256 and im.datasets == ("test",)
    e = im.entries["blk.0.ffn_down.weight"]
    assert e.sums.shape == (1, 512) and e.counts.tolist() == [256.0]
    np.testing.assert_allclose(e.weights(), e.sums / 256.0)


def test_explicit_plan_types_are_exactly_what_is_written(tiny_bf16_gguf, tiny_imatrix, tmp_path):
    sources = read_source_tensors(tiny_bf16_gguf)
    explicit = {s.name: QuantFormat.IQ1_S for s in sources if "ffn" in s.name and len(s.shape) == 2}
    explicit["token_embd.weight"] = QuantFormat.Q8_0
    explicit["output.weight"] = QuantFormat.Q6_K
    explicit["blk.1.attn_v.weight"] = QuantFormat.TQ1_0
    a = assign_types(sources, explicit=explicit)
    out = quantize_gguf(tiny_bf16_gguf, tmp_path / "mix.gguf", a, imatrix=read_imatrix(tiny_imatrix))
    written = {t.name: t.tensor_type.name for t in GGUFReader(out.path).tensors}
    for name, fmt in explicit.items():
        assert written[name] == fmt.value
    assert out.size == predict_size(tiny_bf16_gguf, a, imatrix=read_imatrix(tiny_imatrix))


def test_interrupted_write_leaves_nothing(tiny_bf16_gguf, tmp_path):
    a = assign_preset(tiny_bf16_gguf, "Q8_0")

    def stop(choice, n):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        quantize_gguf(tiny_bf16_gguf, tmp_path / "m.gguf", a, progress=stop)
    assert list(tmp_path.iterdir()) == []


def test_llama_quantize_killed_midway_leaves_no_file_under_the_name(tiny_bf16_gguf, tmp_path):
    # the process dies (os._exit, as a kill would) once llama.cpp reports its second layer's first tensor: the
    # output was opened and the first layer's tensors written; the final name must not exist then
    import subprocess
    import sys

    dst = tmp_path / "m-Q8_0.gguf"
    script = f"""
import os
import llama_cpp
make = llama_cpp.llama_log_callback
def dying(fn):
    def wrapped(level, text, user_data):
        fn(level, text, user_data)
        if b"blk.1." in text:
            os._exit(3)
    return make(wrapped)
llama_cpp.llama_log_callback = dying
from dq.quant.llama_quantize import llama_quantize
llama_quantize({str(tiny_bf16_gguf)!r}, {str(dst)!r}, "Q8_0")
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 3, proc.stderr[-2000:]
    assert not dst.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")]  # the unfinished file, never renamed


def test_a_failed_background_write_stops_the_file_and_leaves_nothing(tiny_bf16_gguf, tmp_path, monkeypatch):
    """Tensors are written on a writer thread while the next one quantizes; its error must surface."""
    from dq.quant.gguf_writer import GGUFFileWriter

    real, calls = GGUFFileWriter.write_tensor, []

    def flaky(self, name, payload):
        calls.append(name)
        if len(calls) == 3:
            raise OSError(28, "No space left on device")
        real(self, name, payload)

    monkeypatch.setattr(GGUFFileWriter, "write_tensor", flaky)
    with pytest.raises(OSError, match="No space left"):
        quantize_gguf(tiny_bf16_gguf, tmp_path / "m.gguf", assign_preset(tiny_bf16_gguf, "Q4_K_M"))
    assert list(tmp_path.iterdir()) == []
    assert len(calls) <= 4  # the failure is noticed at the next tensor, not at the end of the file


def test_cli_dry_run_size_equals_written_size(tiny_llama_dir, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--type", "Q4_K_M", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert not out.exists()
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--type", "Q4_K_M",
                 "--tensor-type", "attn_v=Q8_0"]) == 0
    capsys.readouterr()
    assert main(["quantize", str(tiny_llama_dir), "-o", str(out), "--type", "Q4_K_M",
                 "--tensor-type", "attn_v=Q8_0", "--dry-run", "--json"]) == 0
    plan2 = json.loads(capsys.readouterr().out)
    assert plan2["size_bytes"] == out.stat().st_size
    assert plan["size_bytes"] != plan2["size_bytes"]
    written = {t.name: t.tensor_type.name for t in GGUFReader(out).tensors}
    assert {written[f"blk.{i}.attn_v.weight"] for i in range(2)} == {"Q8_0"}
    assert {t["name"]: t["type"] for t in plan2["tensors"]} == written


def test_tensor_cache_gives_llama_cpp_bytes_and_skips_requantizing(tiny_bf16_gguf, tiny_imatrix, tmp_path,
                                                                    monkeypatch):
    from dq.export.tensor_cache import TensorCache
    from dq.quant import libggml

    imatrix = read_imatrix(tiny_imatrix)
    assignment = assign_preset(tiny_bf16_gguf, "IQ2_XXS")
    cache = TensorCache(tmp_path / "cache")
    first = quantize_gguf(tiny_bf16_gguf, tmp_path / "a.gguf", assignment, imatrix=imatrix,
                          preset_ftype=PRESETS["IQ2_XXS"], tensor_cache=cache)
    llama_quantize(tiny_bf16_gguf, tmp_path / "ref.gguf", "IQ2_XXS", imatrix=imatrix.flat_weights())
    assert _tensors(first.path) == _tensors(tmp_path / "ref.gguf")

    def no_quantizing(*a, **k):
        raise AssertionError("a cached tensor was quantized again")

    monkeypatch.setattr(libggml, "requantize_array", no_quantizing)
    again = quantize_gguf(tiny_bf16_gguf, tmp_path / "b.gguf", assignment, imatrix=imatrix,
                          preset_ftype=PRESETS["IQ2_XXS"], tensor_cache=TensorCache(tmp_path / "cache"))
    assert again.path.read_bytes() == first.path.read_bytes()
    # another imatrix is another key: those tensors are quantized afresh
    other = read_imatrix(tiny_imatrix)
    for e in other.entries.values():
        e.sums[...] = e.sums * 2.0 + 1.0
    with pytest.raises(AssertionError, match="quantized again"):
        quantize_gguf(tiny_bf16_gguf, tmp_path / "c.gguf", assignment, imatrix=other, tensor_cache=cache)
