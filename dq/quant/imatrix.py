"""Importance matrices in llama.cpp's GGUF imatrix format (``llama-imatrix`` output since b5600).

Per weight tensor the file holds ``<name>.in_sum2`` (F32, numpy shape ``[n_mat, ne0]``: sum of squared
input activations per input column, per expert) and ``<name>.counts`` (F32, shape ``[n_mat, 1]``: tokens
seen per expert), plus ``general.type = imatrix``, ``imatrix.datasets``, ``imatrix.chunk_count`` and
``imatrix.chunk_size``. The quantizer's importance weights are ``in_sum2 / count`` (1 where a count is
zero), exactly as ``tools/quantize/quantize.cpp`` ``load_imatrix`` computes them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from dq.errors import CorruptFileError, ModelNotFoundError
from dq.quant.formats import QuantFormat
from dq.quant.gguf_keys import GENERAL_TYPE, IMATRIX_CHUNK_COUNT, IMATRIX_CHUNK_SIZE, IMATRIX_DATASETS

__all__ = ["ImatrixEntry", "Imatrix", "read_imatrix", "write_imatrix"]

_SUM = ".in_sum2"
_COUNT = ".counts"


@dataclass(frozen=True)
class ImatrixEntry:
    """Sums of squared activations ``[n_mat, ne0]`` and token counts ``[n_mat]`` of one weight tensor."""

    sums: np.ndarray
    counts: np.ndarray

    def __post_init__(self) -> None:
        if self.sums.ndim != 2 or self.counts.shape != (self.sums.shape[0],):
            raise ValueError(f"imatrix entry shapes do not fit: sums {self.sums.shape}, counts {self.counts.shape}")

    def weights(self) -> np.ndarray:
        """Importance weights ``[n_mat, ne0]`` as llama.cpp's quantizer sees them."""
        out = np.ones_like(self.sums, dtype=np.float32)
        nz = self.counts > 0
        out[nz] = self.sums[nz] / self.counts[nz, None]
        return out


@dataclass(frozen=True)
class Imatrix:
    """An importance matrix: GGUF tensor name -> entry, with the datasets and chunking it came from."""

    entries: Mapping[str, ImatrixEntry]
    datasets: Sequence[str] = field(default_factory=tuple)
    chunk_count: int = 0
    chunk_size: int = 0

    def weights_for(self, name: str) -> np.ndarray | None:
        """``[n_mat, ne0]`` importance weights for a tensor, or None if the imatrix has no entry."""
        entry = self.entries.get(name)
        return None if entry is None else entry.weights()

    def flat_weights(self) -> dict[str, np.ndarray]:
        """name -> flattened weights, the form ``llama_model_quantize`` takes."""
        return {name: e.weights().reshape(-1) for name, e in self.entries.items()}


def write_imatrix(path: str | Path, imatrix: Imatrix) -> Path:
    """Write ``imatrix`` atomically in llama.cpp's GGUF imatrix format (tensors in sorted name order)."""
    from dq.quant.gguf_writer import GGUFFileWriter

    w = GGUFFileWriter()
    w.add_string(GENERAL_TYPE, "imatrix")
    w.add_string_array(IMATRIX_DATASETS, list(imatrix.datasets))
    w.add_uint32(IMATRIX_CHUNK_COUNT, int(imatrix.chunk_count))
    w.add_uint32(IMATRIX_CHUNK_SIZE, int(imatrix.chunk_size))
    names = sorted(imatrix.entries)
    for name in names:
        e = imatrix.entries[name]
        w.add_tensor_info(name + _SUM, e.sums.shape, QuantFormat.F32)
        w.add_tensor_info(name + _COUNT, (e.counts.shape[0], 1), QuantFormat.F32)
    w.open(path)
    try:
        for name in names:
            e = imatrix.entries[name]
            w.write_tensor(name + _SUM, np.ascontiguousarray(e.sums, dtype=np.float32))
            w.write_tensor(name + _COUNT, np.ascontiguousarray(e.counts, dtype=np.float32))
        w.close()
    except BaseException:
        w.abort()
        raise
    return Path(path)


def read_imatrix(path: str | Path) -> Imatrix:
    """Read a GGUF imatrix (as written by ``llama-imatrix`` or :func:`write_imatrix`).

    Raises:
        ModelNotFoundError: the file does not exist.
        CorruptFileError: it is not a GGUF imatrix; the message says how to make one.
    """
    from gguf import GGUFReader

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"imatrix file {str(path)!r} does not exist; create one with `dq analyze MODEL`")
    try:
        reader = GGUFReader(path)
    except Exception as exc:  # gguf-py raises ValueError/struct.error/... on garbage
        raise CorruptFileError(
            f"{path} is not a GGUF imatrix ({exc}); legacy .dat imatrices are not supported, "
            f"re-create it with `dq analyze` or a current llama-imatrix"
        ) from exc
    sums: dict[str, np.ndarray] = {}
    counts: dict[str, np.ndarray] = {}
    for t in reader.tensors:
        data = np.array(t.data, dtype=np.float32)
        if t.name.endswith(_SUM):
            sums[t.name[: -len(_SUM)]] = data.reshape(-1, int(t.shape[0]))
        elif t.name.endswith(_COUNT):
            counts[t.name[: -len(_COUNT)]] = data.reshape(-1)
    if not sums or set(sums) != set(counts):
        raise CorruptFileError(f"{path} has no matching .in_sum2/.counts tensors; it is not a GGUF imatrix")

    def field_value(key: str):
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    datasets = field_value(IMATRIX_DATASETS) or []
    entries = {n: ImatrixEntry(sums[n], counts[n]) for n in sorted(sums)}
    return Imatrix(
        entries,
        datasets=tuple(datasets),
        chunk_count=int(field_value(IMATRIX_CHUNK_COUNT) or 0),
        chunk_size=int(field_value(IMATRIX_CHUNK_SIZE) or 0),
    )
