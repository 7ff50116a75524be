"""Where dq keeps materialised models, the llama.cpp converter and other derived files.

``DQ_CACHE`` overrides the default ``~/.cache/dq``. Nothing in the cache is committed: it is rebuilt
from the packages that ship it.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

__all__ = ["cache_dir", "files_key"]

_MODEL_SUFFIXES = {".json", ".safetensors", ".bin", ".model", ".gguf"}


def cache_dir() -> Path:
    """The cache root: ``$DQ_CACHE`` or ``~/.cache/dq`` (created on first use)."""
    root = Path(os.environ.get("DQ_CACHE") or Path.home() / ".cache" / "dq").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def files_key(path: Path) -> str:
    """A short key for files derived from a model file or directory: its absolute path and the names, sizes
    and mtimes of its model files, so an edited or replaced checkpoint gets a fresh key."""
    path = Path(path)
    h = hashlib.sha256(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _MODEL_SUFFIXES)
    for f in files:
        st = f.stat()
        h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]
