"""Where dq keeps materialised models, the llama.cpp converter and other derived files.

``DQ_CACHE`` overrides the default ``~/.cache/dq``. Nothing in the cache is committed: it is rebuilt
from the packages that ship it.
"""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cache_dir"]


def cache_dir() -> Path:
    """The cache root: ``$DQ_CACHE`` or ``~/.cache/dq`` (created on first use)."""
    root = Path(os.environ.get("DQ_CACHE") or Path.home() / ".cache" / "dq").expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root
