"""Damage of each candidate GGML type on one tensor, measured with llama.cpp's own quantizers.

Pure functions: a weight matrix (or a stack of expert matrices), its importance weights and a sample of
its calibration inputs in; one :class:`~dq.analysis.artifact.TypeError_` per candidate out.

- ``weight_err``   = ||W - Q(W)||^2 / ||W||^2
- ``weighted_err`` = sum_j m_j ||W[:, j] - Q(W)[:, j]||^2 / sum_j m_j ||W[:, j]||^2, m = imatrix weights
- ``act_err``      = ||X (W - Q(W))^T||^2 / ||X W^T||^2 on calibration inputs X

Q(W) is the round trip ``dequantize(quantize(W, stored, imatrix))`` through libggml, with the imatrix
when one exists, as ``dq quantize``/llama-quantize would store the tensor. ``stored`` is llama.cpp's
block-size fallback of the requested type (``effective_format``); requested types that land on the
same stored type are quantized once. GGML quantizes rows independently, so measuring a seeded subset
of rows (``max_elements``) estimates the errors without bias; bytes are always exact for the full shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from dq.analysis.artifact import TypeError_
from dq.errors import AnalysisError, UnknownFormatError
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat, effective_format, parse_format, tensor_nbytes

__all__ = ["DEFAULT_CANDIDATES", "parse_candidates", "MatrixInput", "measure_tensor", "round_trip"]

DEFAULT_CANDIDATES: tuple[QuantFormat, ...] = tuple(QuantFormat(n) for n in (
    "Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K", "IQ3_XXS", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S", "TQ1_0",
))


def parse_candidates(names: Sequence[str | QuantFormat] | str | None) -> tuple[QuantFormat, ...]:
    """Candidate types from names (a list or a comma-separated string); None -> the default list.

    Raises:
        AnalysisError: a name is not a GGML type dq knows, or the list is empty.
    """
    if names is None:
        return DEFAULT_CANDIDATES
    if isinstance(names, str):
        names = [n for n in names.split(",") if n.strip()]
    out: list[QuantFormat] = []
    for n in names:
        try:
            fmt = parse_format(n)
        except UnknownFormatError:
            valid = ", ".join(f.value for f in FORMATS)
            raise AnalysisError(f"unknown candidate type {n!r}; choose from: {valid}") from None
        if fmt not in out:
            out.append(fmt)
    if not out:
        raise AnalysisError("the candidate type list is empty; pass e.g. --candidates Q4_K,Q2_K or leave it out")
    return tuple(out)


@dataclass(frozen=True)
class MatrixInput:
    """One 2-D weight matrix ``[rows, cols]`` with what its measurement needs.

    Attributes:
        weight: float32 ``[rows, cols]``.
        importance: imatrix weights ``[cols]`` (mean squared input), or None.
        x: calibration inputs ``[tokens, cols]``, or None (no activation error).
    """

    weight: np.ndarray
    importance: np.ndarray | None = None
    x: np.ndarray | None = None


def round_trip(w: np.ndarray, fmt: QuantFormat, importance: np.ndarray | None, n_threads: int | None = None) -> np.ndarray:
    """``dequantize(quantize(w))`` with libggml; types that need an imatrix get uniform weights if none."""
    if fmt is QuantFormat.F32:
        return w.astype(np.float32, copy=True)
    im = importance
    if im is None and FORMATS[fmt].needs_imatrix:
        im = np.ones(w.shape[1], dtype=np.float32)
    blob = libggml.quantize(w, fmt, None if FORMATS[fmt].is_float else im, n_threads=n_threads)
    return libggml.dequantize(blob, fmt, w.shape)


def _row_subset(rows: int, cols: int, max_elements: int | None, rng: np.random.Generator) -> np.ndarray | None:
    if max_elements is None or rows * cols <= max_elements:
        return None
    k = max(1, max_elements // cols)
    return np.sort(rng.choice(rows, size=k, replace=False))


def measure_tensor(
    mats: Sequence[MatrixInput],
    shape: Sequence[int],
    candidates: Sequence[QuantFormat],
    *,
    max_elements: int | None = None,
    seed: int = 0,
    n_threads: int | None = None,
) -> tuple[TypeError_, ...]:
    """Errors and exact bytes of one GGUF tensor for every candidate type.

    Args:
        mats: the tensor's matrices: one for a plain weight, one per expert for ``*_exps`` tensors.
            Numerators and denominators are summed over matrices (the error of the whole tensor).
        shape: the GGUF tensor's numpy shape (``[experts, rows, cols]`` for merged experts), for bytes.
        candidates: requested types.
        max_elements: measure at most this many weights (a seeded subset of rows over all matrices).
        seed: row-subset seed.
        n_threads: libggml threads.

    Returns:
        One ``TypeError_`` per candidate, in order. ``act_err`` is None when no matrix has inputs;
        ``weighted_err`` is None when none has importance weights.

    Example:
        >>> w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
        >>> e, = measure_tensor([MatrixInput(w)], w.shape, [QuantFormat.Q8_0])
        >>> e.stored, e.nbytes
        (<QuantFormat.Q8_0: 'Q8_0'>, 272)
    """
    rng = np.random.default_rng(seed)
    per_mat = None if max_elements is None else max(1, max_elements // max(1, len(mats)))
    subsets = [_row_subset(m.weight.shape[0], m.weight.shape[1], per_mat, rng) for m in mats]
    prepared = []
    for m, rows in zip(mats, subsets):
        w = np.ascontiguousarray(m.weight if rows is None else m.weight[rows], dtype=np.float32)
        y = None if m.x is None or len(m.x) == 0 else m.x.astype(np.float32) @ w.T
        prepared.append((w, m.importance, None if y is None else m.x.astype(np.float32), y))

    has_im = any(p[1] is not None for p in prepared)
    has_x = any(p[3] is not None for p in prepared)
    by_stored: dict[QuantFormat, tuple[float, float | None, float | None]] = {}
    out = []
    for fmt in candidates:
        stored = effective_format(fmt, shape) if not FORMATS[fmt].is_float else fmt
        if stored not in by_stored:
            wn = wd = imn = imd = an = ad = 0.0
            for w, im, x, y in prepared:
                q = round_trip(w, stored, im, n_threads)
                d = q - w
                d2 = d.astype(np.float64) ** 2
                w2 = w.astype(np.float64) ** 2
                wn += float(d2.sum())
                wd += float(w2.sum())
                if im is not None:
                    imn += float(d2.sum(0) @ im)
                    imd += float(w2.sum(0) @ im)
                if y is not None:
                    e = x @ d.T
                    an += float((e.astype(np.float64) ** 2).sum())
                    ad += float((y.astype(np.float64) ** 2).sum())
            by_stored[stored] = (
                wn / wd if wd > 0 else 0.0,
                (imn / imd if imd > 0 else 0.0) if has_im else None,
                (an / ad if ad > 0 else 0.0) if has_x else None,
            )
        werr, wierr, aerr = by_stored[stored]
        out.append(TypeError_(fmt, stored, tensor_nbytes(stored, shape), werr, wierr, aerr))
    return tuple(out)
