"""Errors of ``dq eval``: one class per failure mode a user can cause, each message naming the fix.

They extend :class:`dq.errors.DQError`, so the CLI turns them into exit code 2 and one line on stderr.
Missing packages reuse :class:`dq.errors.DataPackageMissingError`; missing paths
:class:`dq.errors.ModelNotFoundError`.
"""

from __future__ import annotations

from dq.errors import DQError

__all__ = ["TokenizerMismatchError", "EvalConfigError", "ThresholdsError", "ReportError"]


class TokenizerMismatchError(DQError, ValueError):
    """Base and quantized model do not share a vocabulary or tokenize the evaluation text differently."""


class EvalConfigError(DQError, ValueError):
    """Bad evaluation settings: unknown task, context too short, too little text for the chunks asked."""


class ThresholdsError(DQError, ValueError):
    """A thresholds YAML that does not parse into known models, presets, metrics and bounds."""


class ReportError(DQError, ValueError):
    """A JSON report that is not a ``dq eval`` report (or one of an unsupported version)."""
