"""Optional extras in the test suite: skipped on a developer's machine without them, fatal under CI.

``.ci/run`` installs every extra (``.[dev,eval,train,gpu]``) and sets ``CI=true``; an extra that then
fails to import is a broken install, and skipping its tests would let CI pass without running them.
"""

from __future__ import annotations

import importlib
import os

import pytest


def require(module: str):
    """``pytest.importorskip(module)``, except that under ``CI=true`` a failed import fails the run."""
    if os.environ.get("CI", "").lower() == "true":
        try:
            return importlib.import_module(module)
        except ImportError as exc:
            pytest.fail(f"CI: the required extra {module!r} does not import ({exc}); fix the install in .ci/run",
                        pytrace=False)
    return pytest.importorskip(module)
