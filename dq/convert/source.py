"""The unquantized GGUF a quantization starts from: converted once per model and cached.

A Hugging Face directory is converted to BF16 by llama.cpp's converter into
``$DQ_CACHE/gguf/<name>-<fingerprint>/model-bf16.gguf``; the fingerprint covers the directory's path
and the size and mtime of its config and weight files, so an edited model is converted again. A
``.gguf`` path is used as it is, after checking it is a readable, unquantized GGUF.
"""

from __future__ import annotations

import logging
from pathlib import Path

from dq.cache import cache_dir, files_key
from dq.convert.convert import convert_hf_to_gguf, read_hf_config
from dq.errors import CorruptFileError, ModelNotFoundError, NotAModelError

__all__ = ["source_gguf", "mmproj_gguf", "converted_dir", "is_multimodal", "check_gguf"]

log = logging.getLogger(__name__)


def check_gguf(path: Path) -> Path:
    """Raise a clear error unless ``path`` is a readable GGUF file."""
    from gguf import GGUFReader

    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic != b"GGUF":
        raise NotAModelError(f"{path} is not a GGUF file (magic {magic!r}); pass a .gguf or a model directory")
    try:
        GGUFReader(path)
    except Exception as exc:
        raise CorruptFileError(f"{path} is a truncated or corrupt GGUF ({exc}); re-create or re-download it") from exc
    return path


def converted_dir(model: Path, *, cache: Path | None = None) -> Path:
    """The cache folder of a Hugging Face directory's converted GGUFs (keyed by its files' contents)."""
    model = Path(model).expanduser()
    return (cache or cache_dir()) / "gguf" / f"{model.name}-{files_key(model)}"


def source_gguf(model: Path, *, cache: Path | None = None) -> Path:
    """The BF16 GGUF for ``model`` (a HF directory or a .gguf file), converting once if needed."""
    model = Path(model).expanduser()
    if not model.exists():
        raise ModelNotFoundError(f"model path {str(model)!r} does not exist")
    if model.is_file():
        return check_gguf(model)
    read_hf_config(model)  # raises NotAModelError with the fix
    out = converted_dir(model, cache=cache) / "model-bf16.gguf"
    if out.is_file():
        log.info("reusing converted %s", out)
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_hf_to_gguf(model, out, outtype="bf16")


def is_multimodal(model: Path) -> bool:
    """A Hugging Face directory whose config has a vision tower (``vision_config``)."""
    model = Path(model)
    return model.is_dir() and bool(read_hf_config(model).get("vision_config"))


def mmproj_gguf(model: Path, *, cache: Path | None = None) -> Path | None:
    """The BF16 multimodal projector GGUF (vision tower + projector, llama.cpp's ``--mmproj`` output) of a
    vision-language model directory, converted once beside :func:`source_gguf`'s; None for a text model."""
    model = Path(model).expanduser()
    if not is_multimodal(model):
        return None
    out = converted_dir(model, cache=cache) / "mmproj-bf16.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    return convert_hf_to_gguf(model, out, outtype="bf16", extra_args=("--mmproj",))
