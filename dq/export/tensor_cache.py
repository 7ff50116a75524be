"""Quantized tensor bytes kept on disk, so writing many plans of one model quantizes each tensor once per type.

A benchmark of 40 plans, or ``dq quantize`` at several budgets, mostly re-quantizes the same (tensor, type)
pairs. The key is everything the bytes depend on: the source tensor's own bytes (its SHA-256, computed
once per source file and tensor and remembered by the file's size and mtime), the stored type, the imatrix
slice used (its SHA-256), and the pinned libggml. Entries are written atomically; a corrupt or truncated
entry (wrong length) is ignored and rewritten.

Example:
    >>> cache = TensorCache(cache_dir() / "tensors")                                  # doctest: +SKIP
    >>> quantize_gguf(src, dst, assignment, imatrix=im, tensor_cache=cache)         # doctest: +SKIP
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from dq.atomic import atomic_path
from dq.quant.formats import QuantFormat

__all__ = ["TensorCache"]

_LIBGGML = "llama-cpp-python==0.3.36"


class TensorCache:
    """A directory of quantized tensor payloads (see the module docstring)."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self._source_digests: dict[tuple[str, str], str] = {}

    def _digests_file(self, src: Path) -> Path:
        st = src.stat()
        tag = hashlib.sha256(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}".encode()).hexdigest()[:24]
        return self.root / f"source-{tag}.json"

    def source_digest(self, src: Path, name: str, raw: np.ndarray) -> str:
        """SHA-256 of one source tensor's bytes, remembered per source file (size and mtime) and name."""
        key = (str(src), name)
        if key not in self._source_digests:
            path = self._digests_file(src)
            known = json.loads(path.read_text()) if path.is_file() else {}
            if name not in known:
                known[name] = hashlib.sha256(raw.tobytes()).hexdigest()
                with atomic_path(path) as tmp:
                    tmp.write_text(json.dumps(known))
            self._source_digests.update({(str(src), n): d for n, d in known.items()})
        return self._source_digests[key]

    def _entry(self, digest: str, stored: QuantFormat, weights: np.ndarray | None) -> Path:
        im = "none" if weights is None else hashlib.sha256(np.ascontiguousarray(weights, np.float32).tobytes()).hexdigest()
        key = hashlib.sha256(f"{_LIBGGML}|{digest}|{stored.value}|{im}".encode()).hexdigest()
        return self.root / key[:2] / f"{key}.bin"

    def get(self, digest: str, stored: QuantFormat, weights: np.ndarray | None, nbytes: int) -> bytes | None:
        path = self._entry(digest, stored, weights)
        if path.is_file() and path.stat().st_size == nbytes:
            return path.read_bytes()
        return None

    def put(self, digest: str, stored: QuantFormat, weights: np.ndarray | None, payload: bytes) -> None:
        path = self._entry(digest, stored, weights)
        path.parent.mkdir(exist_ok=True)
        with atomic_path(path) as tmp:
            tmp.write_bytes(payload)
