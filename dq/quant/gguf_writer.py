"""A minimal GGUF v3 writer: a state machine over one pass, atomic, with the layout known up front.

Because the whole header is built in memory before any tensor data, the exact size of the file is
known before anything is written; ``dq quantize --dry-run`` reports that number, and the written file
matches it to the byte. Key/value pairs read by gguf-py's ``GGUFReader`` are copied as raw bytes, so
metadata survives untouched.

States: ``NEW`` (add KVs and tensor infos) -> ``open()`` -> ``DATA`` (``write_tensor`` in declared
order) -> ``close()`` -> ``CLOSED``. Any out-of-order call raises.

Example:
    >>> w = GGUFFileWriter()
    >>> w.add_string("general.architecture", "llama")
    >>> w.add_tensor_info("t", (2, 32), QuantFormat.Q8_0)
    >>> w.total_size()
    224
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGUFValueType

from dq.atomic import atomic_path
from dq.quant.formats import FORMATS, QuantFormat, tensor_nbytes

__all__ = ["GGUFFileWriter", "TensorInfo", "GGUF_MAGIC", "GGUF_VERSION", "DEFAULT_ALIGNMENT", "padded_size"]

GGUF_MAGIC = b"GGUF"
GGUF_VERSION = 3
DEFAULT_ALIGNMENT = 32  # GGUF_DEFAULT_ALIGNMENT in gguf.h


class _State(enum.Enum):
    NEW = "new"
    DATA = "data"
    CLOSED = "closed"


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as declared in the header. ``shape`` is numpy order (row length last)."""

    name: str
    shape: tuple[int, ...]
    fmt: QuantFormat
    nbytes: int
    offset: int


def padded_size(n: int, align: int = DEFAULT_ALIGNMENT) -> int:
    """``n`` rounded up to the alignment: the bytes a header or tensor payload takes in the file."""
    return (n + align - 1) // align * align


def _str(s: str) -> bytes:
    b = s.encode("utf-8")
    return struct.pack("<Q", len(b)) + b


class GGUFFileWriter:
    """Builds a GGUF header in memory, then streams tensor payloads to an atomic temp file."""

    def __init__(self, alignment: int = DEFAULT_ALIGNMENT) -> None:
        self.alignment = alignment
        self._kv: dict[str, bytes] = {}
        self._tensors: list[TensorInfo] = []
        self._data_size = 0
        self._state = _State.NEW
        self._next = 0
        self._fh = None
        self._ctx = None

    # ---- header ---------------------------------------------------------------------------------
    def _require(self, state: _State, what: str) -> None:
        if self._state is not state:
            raise RuntimeError(f"GGUFFileWriter.{what} called in state {self._state.value!r}, needs {state.value!r}")

    def add_raw_kv(self, key: str, raw: bytes) -> None:
        """Add a KV pair given as its complete serialised bytes (key length, key, type, value)."""
        self._require(_State.NEW, "add_raw_kv")
        self._kv[key] = bytes(raw)

    def _add(self, key: str, vtype: GGUFValueType, payload: bytes) -> None:
        self._require(_State.NEW, "add_kv")
        self._kv[key] = _str(key) + struct.pack("<I", vtype) + payload

    def add_string(self, key: str, value: str) -> None:
        self._add(key, GGUFValueType.STRING, _str(value))

    def add_uint32(self, key: str, value: int) -> None:
        self._add(key, GGUFValueType.UINT32, struct.pack("<I", value))

    def add_int32(self, key: str, value: int) -> None:
        self._add(key, GGUFValueType.INT32, struct.pack("<i", value))

    def add_string_array(self, key: str, values: Sequence[str]) -> None:
        body = struct.pack("<IQ", GGUFValueType.STRING, len(values)) + b"".join(_str(v) for v in values)
        self._add(key, GGUFValueType.ARRAY, body)

    def kv_pairs(self) -> dict[str, bytes]:
        """Every KV pair as serialised, in order (what a shard writer copies)."""
        return dict(self._kv)

    def remove_kv(self, key: str) -> None:
        self._require(_State.NEW, "remove_kv")
        self._kv.pop(key, None)

    def add_tensor_info(self, name: str, shape: Sequence[int], fmt: QuantFormat) -> TensorInfo:
        """Declare the next tensor; payloads must later come in this order."""
        self._require(_State.NEW, "add_tensor_info")
        if any(t.name == name for t in self._tensors):
            raise ValueError(f"duplicate tensor name {name!r}")
        shape = tuple(int(d) for d in shape)
        info = TensorInfo(name, shape, fmt, tensor_nbytes(fmt, shape), self._data_size)
        self._tensors.append(info)
        self._data_size += padded_size(info.nbytes, self.alignment)
        return info

    @property
    def tensors(self) -> list[TensorInfo]:
        return list(self._tensors)

    def header_bytes(self) -> bytes:
        """Magic, version, counts, KVs, tensor infos, padded to the alignment."""
        parts = [GGUF_MAGIC, struct.pack("<IQQ", GGUF_VERSION, len(self._tensors), len(self._kv))]
        parts.extend(self._kv.values())
        for t in self._tensors:
            dims = tuple(reversed(t.shape))  # ggml order: ne0 (row length) first
            parts.append(_str(t.name) + struct.pack("<I", len(dims)) + struct.pack(f"<{len(dims)}Q", *dims))
            parts.append(struct.pack("<IQ", FORMATS[t.fmt].ggml_id, t.offset))
        header = b"".join(parts)
        return header + b"\0" * (padded_size(len(header), self.alignment) - len(header))

    def total_size(self) -> int:
        """Exact size in bytes of the file this writer will produce."""
        return len(self.header_bytes()) + self._data_size

    # ---- data -----------------------------------------------------------------------------------
    def open(self, path: str | Path) -> None:
        """Start writing to a temp file beside ``path``; it becomes ``path`` only on ``close()``."""
        self._require(_State.NEW, "open")
        self._ctx = atomic_path(path)
        tmp = self._ctx.__enter__()
        self._fh = open(tmp, "wb")
        self._fh.write(self.header_bytes())
        self._state = _State.DATA

    def write_tensor(self, name: str, payload: bytes | np.ndarray) -> None:
        """Write the next declared tensor's payload (raw GGML bytes)."""
        self._require(_State.DATA, "write_tensor")
        if self._next >= len(self._tensors):
            raise RuntimeError(f"write_tensor({name!r}): all {len(self._tensors)} declared tensors are written")
        info = self._tensors[self._next]
        if name != info.name:
            raise RuntimeError(f"write_tensor({name!r}) out of order: expected {info.name!r}")
        data = np.ascontiguousarray(payload).reshape(-1).view(np.uint8) if isinstance(payload, np.ndarray) else payload
        if len(data) != info.nbytes:  # an array is written from its own buffer, without a copy
            raise ValueError(f"tensor {name!r} payload has {len(data)} bytes, declared {info.nbytes} ({info.fmt})")
        self._fh.write(data)
        self._fh.write(b"\0" * (padded_size(info.nbytes, self.alignment) - info.nbytes))
        self._next += 1

    def close(self) -> None:
        """Finish the file and move it into place; raises if tensors are missing."""
        self._require(_State.DATA, "close")
        if self._next != len(self._tensors):
            missing = self._tensors[self._next].name
            self.abort()
            raise RuntimeError(f"close() before all tensors were written (next: {missing!r}); nothing was written")
        self._fh.close()
        self._ctx.__exit__(None, None, None)
        self._state = _State.CLOSED

    def abort(self) -> None:
        """Discard a partly written file (called on any error while writing)."""
        if self._state is _State.DATA:
            self._fh.close()
            err = RuntimeError("GGUF write aborted")
            try:
                self._ctx.__exit__(RuntimeError, err, None)
            except RuntimeError:
                pass
        self._state = _State.CLOSED
