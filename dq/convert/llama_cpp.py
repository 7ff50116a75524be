"""Locate llama.cpp's Python converter (``convert_hf_to_gguf.py`` and its sibling ``gguf-py``).

The converter is in no wheel. dq takes it from the llama-cpp-python **sdist of the exact pinned
version** (so converter and runtime agree on every GGUF key), extracting only the converter files into
``$DQ_CACHE/llama.cpp/<version>/``. ``DQ_LLAMA_CPP_DIR`` may point to a llama.cpp checkout instead, and
``DQ_LLAMA_CPP_SDIST`` to an already-downloaded sdist (for offline machines).
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

from dq.cache import cache_dir
from dq.errors import ConverterUnavailableError

__all__ = ["LLAMA_CPP_PYTHON_VERSION", "converter_dir", "sdist_path"]

log = logging.getLogger(__name__)

LLAMA_CPP_PYTHON_VERSION = "0.3.36"
_SDIST_NAME = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}.tar.gz"
_MEMBERS = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "LICENSE")


def _is_converter_dir(path: Path) -> bool:
    return (path / "convert_hf_to_gguf.py").is_file() and (path / "gguf-py" / "gguf").is_dir()


def _lacks_conversion_package(path: Path) -> bool:
    """The script imports its sibling ``conversion/`` package (as the pinned version does) but the folder is absent."""
    script = (path / "convert_hf_to_gguf.py").read_text(encoding="utf-8", errors="replace")
    return "from conversion import" in script and not (path / "conversion").is_dir()


def _how_to_fix() -> str:
    return (
        f"dq needs llama.cpp's convert_hf_to_gguf.py from the llama-cpp-python {LLAMA_CPP_PYTHON_VERSION} sdist. "
        f"On a machine with PyPI access run `pip download --no-deps --no-binary :all: "
        f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION} -d DIR` and set DQ_LLAMA_CPP_SDIST=DIR/{_SDIST_NAME}, "
        f"or set DQ_LLAMA_CPP_DIR to a llama.cpp checkout that has convert_hf_to_gguf.py, conversion/ and gguf-py/"
    )


def sdist_path(cache: Path | None = None) -> Path:
    """The pinned sdist, downloaded once with pip into ``$DQ_CACHE/sdist`` (or ``DQ_LLAMA_CPP_SDIST``)."""
    override = os.environ.get("DQ_LLAMA_CPP_SDIST")
    if override:
        path = Path(override)
        if not path.is_file():
            raise ConverterUnavailableError(f"DQ_LLAMA_CPP_SDIST={override} does not exist. " + _how_to_fix())
        return path
    dest = (cache or cache_dir()) / "sdist"
    path = dest / _SDIST_NAME
    if path.is_file():
        return path
    dest.mkdir(parents=True, exist_ok=True)
    log.info("downloading the llama-cpp-python %s sdist (llama.cpp's converter) into %s", LLAMA_CPP_PYTHON_VERSION, dest)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           f"llama-cpp-python=={LLAMA_CPP_PYTHON_VERSION}", "-d", str(dest), "--quiet"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0 or not path.is_file():
        raise ConverterUnavailableError(
            f"could not download the llama-cpp-python sdist ({proc.stderr.strip()[-300:]}). " + _how_to_fix()
        )
    return path


def converter_dir(cache: Path | None = None) -> Path:
    """Directory holding ``convert_hf_to_gguf.py`` and ``gguf-py/``, extracted from the sdist once.

    Raises:
        ConverterUnavailableError: neither ``DQ_LLAMA_CPP_DIR`` nor the sdist can be had; the message says
            exactly what to run.
    """
    override = os.environ.get("DQ_LLAMA_CPP_DIR")
    if override:
        path = Path(override)
        if not _is_converter_dir(path):
            raise ConverterUnavailableError(
                f"DQ_LLAMA_CPP_DIR={override} has no convert_hf_to_gguf.py and gguf-py/. " + _how_to_fix()
            )
        if _lacks_conversion_package(path):
            raise ConverterUnavailableError(
                f"DQ_LLAMA_CPP_DIR={override}: its convert_hf_to_gguf.py imports the sibling conversion/ package, "
                f"which is missing there; copy llama.cpp's conversion/ folder beside the script. " + _how_to_fix()
            )
        return path
    root = (cache or cache_dir()) / "llama.cpp" / LLAMA_CPP_PYTHON_VERSION
    if _is_converter_dir(root):
        return root
    archive = sdist_path(cache)
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".extract-", dir=root.parent))
    try:
        prefix = f"llama_cpp_python-{LLAMA_CPP_PYTHON_VERSION}/vendor/llama.cpp/"
        with tarfile.open(archive) as tar:
            members = []
            for m in tar.getmembers():
                if m.name.startswith(prefix) and m.name[len(prefix):].startswith(_MEMBERS) and (m.isfile() or m.isdir()):
                    m.name = m.name[len(prefix):]
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not _is_converter_dir(tmp):
            raise ConverterUnavailableError(f"{archive} does not contain llama.cpp's converter. " + _how_to_fix())
        if root.exists():
            shutil.rmtree(root)
        tmp.rename(root)
    except tarfile.TarError as exc:
        raise ConverterUnavailableError(f"{archive} is not a readable sdist ({exc}). " + _how_to_fix()) from exc
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return root
