"""Errors of ``dq upload``: one class per failure mode, each message naming the fix."""

from __future__ import annotations

from dq.errors import DQError

__all__ = ["InvalidRepoIdError", "NotAQuantError", "HubAuthError", "HubOfflineError", "HubUploadError"]


class InvalidRepoIdError(DQError, ValueError):
    """``--repo`` is not a valid ``namespace/name`` Hugging Face repository id."""


class NotAQuantError(DQError, ValueError):
    """The path to upload is not a dq quant (no quantized GGUF, no quantized safetensors directory)."""


class HubAuthError(DQError, PermissionError):
    """No Hugging Face token was found, or the Hub refused it."""


class HubOfflineError(DQError, ConnectionError):
    """The Hub cannot be reached (offline mode, or no connection to the endpoint)."""


class HubUploadError(DQError, RuntimeError):
    """The Hub answered an upload call with an error."""
