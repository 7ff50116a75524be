"""Hugging Face directory -> BF16/F16 GGUF with llama.cpp's own ``convert_hf_to_gguf.py``.

The converter runs in a subprocess with its sibling ``gguf-py`` first on ``PYTHONPATH`` (the PyPI
``gguf`` lacks pieces it needs), writing to a temporary file that is renamed into place only on
success.

Example:
    >>> convert_hf_to_gguf("~/.cache/dq/models/smollm2-135m", "smollm2-bf16.gguf")  # doctest: +SKIP
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
from pathlib import Path

from dq.atomic import atomic_path
from dq.convert.llama_cpp import LLAMA_CPP_PYTHON_VERSION, converter_dir
from dq.errors import ModelNotFoundError, NotAModelError, UnsupportedArchitectureError

__all__ = ["convert_hf_to_gguf", "read_hf_config", "OUTTYPES"]

log = logging.getLogger(__name__)

OUTTYPES = ("bf16", "f16", "f32")


def read_hf_config(model_dir: str | Path) -> dict:
    """Read and validate ``config.json`` of a Hugging Face model directory.

    Raises:
        ModelNotFoundError: the path does not exist.
        NotAModelError: it is not a directory with a ``config.json`` naming ``architectures``.
    """
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist; pass a Hugging Face model directory")
    if not path.is_dir() or not (path / "config.json").is_file():
        raise NotAModelError(
            f"{str(path)!r} is not a Hugging Face model directory (no config.json); pass the directory that "
            f"holds config.json and the *.safetensors weights, or a .gguf file"
        )
    try:
        config = json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as exc:
        raise NotAModelError(f"{path / 'config.json'} is not valid JSON ({exc}); re-download the model") from exc
    if not config.get("architectures"):
        raise NotAModelError(
            f"{path / 'config.json'} names no `architectures`; add e.g. \"architectures\": [\"LlamaForCausalLM\"]"
        )
    if not any(path.glob("*.safetensors")) and not any(path.glob("*.bin")):
        raise NotAModelError(f"{str(path)!r} has a config.json but no *.safetensors or *.bin weights")
    return config


def convert_hf_to_gguf(
    model_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "bf16",
    extra_args: tuple[str, ...] = (),
) -> Path:
    """Convert a Hugging Face model directory to a GGUF file with llama.cpp's converter.

    Args:
        model_dir: directory with ``config.json``, weights and tokenizer.
        out_path: the GGUF to write (atomically).
        outtype: ``bf16``, ``f16`` or ``f32``.
        extra_args: passed to ``convert_hf_to_gguf.py`` (e.g. ``("--mmproj",)``).

    Returns:
        ``out_path`` as a Path.

    Raises:
        UnsupportedArchitectureError: llama.cpp's converter does not know the architecture.
        NotAModelError / ModelNotFoundError: bad ``model_dir``.
        RuntimeError: the converter failed for another reason (its log tail is in the message).
    """
    if outtype not in OUTTYPES:
        raise ValueError(f"outtype {outtype!r} is not one of {OUTTYPES}")
    config = read_hf_config(model_dir)
    arch = config["architectures"][0]
    conv = converter_dir()
    out_path = Path(out_path)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), str(conv), env.get("PYTHONPATH", "")])
    env.setdefault("NO_LOCAL_GGUF", "")
    with atomic_path(out_path) as tmp:
        cmd = [sys.executable, str(conv / "convert_hf_to_gguf.py"), str(Path(model_dir).expanduser()),
               "--outtype", outtype, "--outfile", str(tmp), *extra_args]
        log.info("converting %s (%s) to %s GGUF with llama.cpp's convert_hf_to_gguf.py", model_dir, arch, outtype)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0 or not tmp.exists():
            tail = "\n".join(proc.stderr.strip().splitlines()[-15:])
            if re.search(r"is not supported|not supported!", proc.stderr):
                raise UnsupportedArchitectureError(
                    f"llama.cpp's converter (llama-cpp-python {LLAMA_CPP_PYTHON_VERSION}) does not support the "
                    f"architecture {arch!r} of {model_dir}; use a model whose architecture llama.cpp supports "
                    f"(convert_hf_to_gguf.py --print-supported-models lists them) or a newer pinned llama.cpp"
                )
            raise RuntimeError(f"convert_hf_to_gguf.py failed on {model_dir}:\n{tail}")
    return out_path

