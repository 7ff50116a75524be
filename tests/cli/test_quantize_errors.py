"""Bad input to `dq quantize`: each gets a clear message that names the fix, exit code 2, no output file."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dq.cli import main
from dq.convert.convert import convert_hf_to_gguf
from dq.errors import ConverterUnavailableError, UnsupportedArchitectureError


def _run(capsys, *argv) -> tuple[int, str]:
    code = main(["quantize", *argv])
    return code, capsys.readouterr().err


def test_missing_path(capsys, tmp_path):
    code, err = _run(capsys, str(tmp_path / "nope"), "-o", str(tmp_path / "o.gguf"))
    assert code == 2 and "does not exist" in err and "Hugging Face model directory" in err


def test_directory_that_is_not_a_model(capsys, tmp_path):
    (tmp_path / "notes.txt").write_text("hi")
    code, err = _run(capsys, str(tmp_path), "-o", str(tmp_path / "o.gguf"))
    assert code == 2 and "no config.json" in err


def test_unknown_architecture(tmp_path):
    model = tmp_path / "model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps({"architectures": ["NotARealModelForCausalLM"]}))
    import numpy as np
    from safetensors.numpy import save_file

    save_file({"w": np.zeros((2, 2), np.float32)}, str(model / "model.safetensors"))
    with pytest.raises(UnsupportedArchitectureError, match="NotARealModelForCausalLM"):
        convert_hf_to_gguf(model, tmp_path / "o.gguf")
    assert not (tmp_path / "o.gguf").exists()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]


def test_unknown_type_name(capsys, tiny_llama_dir, tmp_path):
    code, err = _run(capsys, str(tiny_llama_dir), "-o", str(tmp_path / "o.gguf"), "--type", "Q4_KM")
    assert code == 2 and "unknown llama.cpp preset 'Q4_KM'" in err and "Q4_K_M" in err
    code, err = _run(capsys, str(tiny_llama_dir), "-o", str(tmp_path / "o.gguf"), "--tensor-type", "attn=Q9_K")
    assert code == 2 and "unknown GGML type 'Q9_K'" in err
    assert not (tmp_path / "o.gguf").exists()


@pytest.mark.parametrize("preset,override", [("IQ1_S", None), ("Q4_K_M", "ffn_down=IQ2_XXS")])
def test_imatrix_types_without_imatrix(capsys, tiny_llama_dir, tmp_path, preset, override):
    argv = [str(tiny_llama_dir), "-o", str(tmp_path / "o.gguf"), "--type", preset]
    if override:
        argv += ["--tensor-type", override]
    code, err = _run(capsys, *argv)
    assert code == 2 and "needs an importance matrix" in err and "--imatrix" in err
    assert list(tmp_path.iterdir()) == []


def test_regex_matching_nothing_warns(capsys, caplog, tiny_llama_dir, tmp_path):
    code, _ = _run(capsys, str(tiny_llama_dir), "--dry-run", "--tensor-type", "no_such_tensor=Q8_0")
    assert code == 0 and "'no_such_tensor' matched no tensor" in caplog.text


def test_output_not_writable(capsys, tiny_llama_dir, tmp_path):
    code, err = _run(capsys, str(tiny_llama_dir), "-o", str(tmp_path / "missing-dir" / "o.gguf"))
    assert code == 2 and "does not exist" in err and "mkdir" in err
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o500)
    try:
        import os

        if os.access(ro, os.W_OK):  # root ignores permission bits: use a directory the kernel owns
            target = Path("/proc/1")
        else:
            target = ro
        if os.access(target, os.W_OK):
            pytest.skip("no read-only directory available on this machine")
        code, err = _run(capsys, str(tiny_llama_dir), "-o", str(target / "o.gguf"))
        assert code == 2 and "not writable" in err
    finally:
        ro.chmod(0o700)


def test_output_is_a_directory(capsys, tiny_llama_dir, tmp_path):
    code, err = _run(capsys, str(tiny_llama_dir), "-o", str(tmp_path))
    assert code == 2 and "is a directory" in err


def test_corrupt_gguf_input(capsys, tmp_path):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 20)
    code, err = _run(capsys, str(bad), "-o", str(tmp_path / "o.gguf"))
    assert code == 2 and "corrupt" in err


def test_converter_unavailable_says_what_to_do(monkeypatch, tmp_path, tiny_llama_dir):
    monkeypatch.setenv("DQ_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(ConverterUnavailableError, match="pip download --no-deps --no-binary :all: llama-cpp-python==0.3.36"):
        convert_hf_to_gguf(tiny_llama_dir, tmp_path / "o.gguf")


def test_converter_dir_without_its_conversion_package_is_named(monkeypatch, tmp_path, tiny_llama_dir):
    """A DQ_LLAMA_CPP_DIR copied without conversion/ fails before the converter runs, naming the folder."""
    (tmp_path / "gguf-py" / "gguf").mkdir(parents=True)
    (tmp_path / "convert_hf_to_gguf.py").write_text("from conversion import (\n    ModelBase,\n)\n")
    monkeypatch.setenv("DQ_LLAMA_CPP_DIR", str(tmp_path))
    with pytest.raises(ConverterUnavailableError, match="conversion/ package, which is missing"):
        convert_hf_to_gguf(tiny_llama_dir, tmp_path / "o.gguf")
