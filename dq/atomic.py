"""Atomic file output: write to a temporary sibling, fsync, rename; never leave a half-written file.

Renaming over the target (rather than truncating it in place) also keeps an mmapped source intact,
the lesson of safetensors ``24b0b28``.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

from dq.errors import OutputNotWritableError

__all__ = ["atomic_path", "check_writable"]


def check_writable(path: str | Path) -> Path:
    """Raise a clear error now, before long work, if ``path`` cannot be created."""
    path = Path(path).expanduser()
    parent = path.parent if str(path.parent) else Path(".")
    if path.is_dir():
        raise OutputNotWritableError(f"output path {str(path)!r} is a directory; give a file name, e.g. {path}/model.gguf")
    if not parent.exists():
        raise OutputNotWritableError(f"output directory {str(parent)!r} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise OutputNotWritableError(f"output directory {str(parent)!r} is not writable; choose another -o path")
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success rename it over ``path``, on any error delete it.

    Example:
        >>> with atomic_path("out.gguf") as tmp:   # doctest: +SKIP
        ...     tmp.write_bytes(b"GGUF...")
    """
    path = check_writable(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the file the permissions open() would
    try:
        yield tmp
        if tmp.exists():
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
