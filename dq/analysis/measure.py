"""Damage of each candidate GGML type on one tensor, measured with llama.cpp's own quantizers.

Pure functions: a weight matrix (or a stack of expert matrices), its importance weights and a sample of
its calibration inputs in; one :class:`~dq.analysis.artifact.TypeError_` per candidate out.

- ``weight_err``   = ||W - Q(W)||^2 / ||W||^2
- ``weighted_err`` = sum_j m_j ||W[:, j] - Q(W)[:, j]||^2 / sum_j m_j ||W[:, j]||^2, m = imatrix weights
- ``act_err``      = ||X (W - Q(W))^T||^2 / ||X W^T||^2 on calibration inputs X
- ``kld``          = 1/2 sum_n sum_i ((W - Q(W))_i . G_n,i)^2, the second-order prediction of the mean KL
  divergence of the model with only this tensor quantized, where G_n is the weight gradient of probe n
  (:mod:`dq.analysis.gradients`); rows ``i`` are summed independently (quantization errors of different
  rows are independent), and a row subset is scaled up by rows / measured rows.

Q(W) is the round trip ``dequantize(quantize(W, stored, imatrix))`` through libggml, with the imatrix
when one exists, as ``dq quantize``/llama-quantize would store the tensor. ``stored`` is llama.cpp's
block-size fallback of the requested type (``effective_format``); requested types that land on the
same stored type are quantized once. GGML quantizes rows independently, so measuring a seeded subset
of rows (``max_elements``) estimates the errors without bias; bytes are always exact for the full shape.

Two paths (:func:`measure_path` picks one per run and logs it):

- ``libggml`` (CPU, the default): every type through libggml, with the imatrix, as above.
- ``kernels`` (``dq analyze --device cuda`` with Triton): stored types in
  :data:`~dq.kernels.ref_quant.FAKE_QUANT_FORMATS` (Q8_0, Q4_0, Q4_1, Q5_0, Q5_1, TQ1_0, TQ2_0, Q2_K..Q6_K;
  IQ4_NL and IQ4_XS as torch ops on the device) are measured on the GPU by one fused kernel pass per tensor
  and type (IQ3_XXS, IQ3_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_S and IQ1_M by the byte-exact torch ports of their lattice
  searches, :mod:`dq.kernels.ref_iqgrid` and :mod:`dq.kernels.ref_iq1`): ``weight_err``/``weighted_err``
  sums, and Q(W) for ``act_err`` (a float64 matmul on the device). The kernels port ggml's quantizers
  bit-exactly, the imatrix-aware ``quantize_row_*_impl`` searches included (used whenever importance
  weights are present, as libggml does), so the GPU table equals the CPU table up to the forward pass
  running on another device (``docs/results/analyze_gpu_vs_cpu.md``). MXFP4 and the float types always
  use libggml.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from dq.analysis.artifact import TypeError_
from dq.errors import AnalysisError, UnknownFormatError
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat, effective_format, parse_format, tensor_nbytes

__all__ = [
    "DEFAULT_CANDIDATES", "parse_candidates", "MatrixInput", "measure_tensor", "measure_sums", "finish_measure",
    "PartialMeasure", "round_trip", "measure_path", "kernel_formats", "MeasurePath", "row_subsets",
]

log = logging.getLogger(__name__)

MeasurePath = Literal["kernels", "libggml"]

# IQ2_S and IQ2_XS fill the gap between IQ2_XXS (2.06 bits) and Q2_K (2.63): hand recipes that beat llama.cpp's
# mixes on Qwen2.5-Coder-1.5B put ffn_down at IQ2_S (shared/models.md). IQ3_S costs what Q3_K costs (3.44 bits)
# and is llama.cpp's lower-error 3.44-bit type with an imatrix; the planner takes whichever measures less damage.
DEFAULT_CANDIDATES: tuple[QuantFormat, ...] = tuple(QuantFormat(n) for n in (
    "Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M",
    "IQ1_S", "TQ1_0",
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
        grads: probe weight gradients ``[probes, measured rows, cols]`` on the rows this matrix is measured on
            (:func:`row_subsets`), or None (no ``kld``).
    """

    weight: np.ndarray
    importance: np.ndarray | None = None
    x: np.ndarray | None = None
    grads: np.ndarray | None = None


def round_trip(w: np.ndarray, fmt: QuantFormat, importance: np.ndarray | None, n_threads: int | None = None) -> np.ndarray:
    """``dequantize(quantize(w))`` with libggml; types that need an imatrix get uniform weights if none."""
    if fmt is QuantFormat.F32:
        return w.astype(np.float32, copy=True)
    im = importance
    if im is None and FORMATS[fmt].needs_imatrix:
        im = np.ones(w.shape[1], dtype=np.float32)
    blob = libggml.quantize(w, fmt, None if FORMATS[fmt].is_float else im, n_threads=n_threads)
    return libggml.dequantize(blob, fmt, w.shape)


def kernel_formats() -> tuple[QuantFormat, ...]:
    """Stored types the GPU path measures with :func:`dq.kernels.quant_error` (the others use libggml).

    The kernels port both of ggml's quantizers for these types, the reference one and the imatrix-aware
    ``quantize_row_*_impl`` (used whenever importance weights are given, as libggml does), so
    ``--device cuda`` measures exactly what llama.cpp writes. The lattice types IQ3_XXS, IQ3_S, IQ2_S,
    IQ2_XS, IQ2_XXS, IQ1_S and IQ1_M run as torch ops on the device (:mod:`dq.kernels.ref_iqgrid`, :mod:`dq.kernels.ref_iq1`;
    byte-exact); MXFP4 stays on libggml.
    """
    from dq.kernels.api import QUANT_ERROR_FORMATS

    return QUANT_ERROR_FORMATS


def measure_path(device: str = "cpu", *, announce: bool = True) -> MeasurePath:
    """The quantizers that measure errors for ``--device``: ``kernels`` on a CUDA device with Triton, else ``libggml``.

    Args:
        device: the analysis device (``cpu``, ``cuda``, ``cuda:N``).
        announce: log the choice and its reason (one INFO line; ``dq analyze`` does this once per run).

    Returns:
        ``"kernels"`` or ``"libggml"``.

    Example:
        >>> measure_path("cpu", announce=False)
        'libggml'
    """
    import torch

    from dq.kernels.api import triton_available

    dev = torch.device(device)
    path: MeasurePath = "libggml"
    if dev.type != "cuda":
        reason = f"--device {device}"
    elif not torch.cuda.is_available():
        reason = "torch sees no CUDA device"
    elif not triton_available():
        reason = "Triton is not installed (pip install 'dq[triton]')"
    else:
        path, reason = "kernels", ""
    if announce:
        if path == "libggml":
            log.info("measuring errors on the CPU path: libggml's quantizers for every type (%s)", reason)
        else:
            log.info(
                "measuring errors on %s with the Triton kernels for %s (for the types whose quantizer an imatrix "
                "changes, only when there is none); libggml on the CPU for the other types", device,
                ",".join(f.value for f in kernel_formats()),
            )
    return path


def _row_subset(rows: int, cols: int, max_elements: int | None, rng: np.random.Generator) -> np.ndarray | None:
    if max_elements is None or rows * cols <= max_elements:
        return None
    k = max(1, max_elements // cols)
    return np.sort(rng.choice(rows, size=k, replace=False))


def row_subsets(n_mats: int, rows: int, cols: int, max_elements: int | None, seed: int) -> list[np.ndarray | None]:
    """The seeded rows :func:`measure_tensor` measures in each of ``n_mats`` ``[rows, cols]`` matrices
    (None: all rows). The damage gradients are taken on exactly these rows, before the measurement.

    Example:
        >>> [None if r is None else len(r) for r in row_subsets(2, 64, 256, 16 * 256, seed=0)]
        [8, 8]
    """
    rng = np.random.default_rng(seed)
    per_mat = None if max_elements is None else max(1, max_elements // max(1, n_mats))
    return [_row_subset(rows, cols, per_mat, rng) for _ in range(n_mats)]


def measure_tensor(
    mats: Sequence[MatrixInput],
    shape: Sequence[int],
    candidates: Sequence[QuantFormat],
    *,
    max_elements: int | None = None,
    seed: int = 0,
    n_threads: int | None = None,
    device: str = "cpu",
    kernels: bool | None = None,
    subsets: Sequence[np.ndarray | None] | None = None,
    rows_scale: float | None = None,
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
        device: ``cuda`` measures the stored types the kernels cover on the GPU (see the module doc);
            ``cpu`` uses libggml for every type.
        kernels: force the kernel path on ``device`` (True; on a CPU device it runs the kernels' torch
            reference, for tests) or the libggml path (False); None decides by :func:`measure_path`.
        subsets: the rows measured per matrix (default :func:`row_subsets` of ``max_elements`` and ``seed``);
            gradients in ``mats`` must be on these rows.
        rows_scale: what the gradient projection sum is multiplied by to stand for the whole tensor (default:
            all rows of ``shape`` / measured rows; 1 when the measured rows are the only ones with gradient).

    Returns:
        One ``TypeError_`` per candidate, in order. ``act_err`` is None when no matrix has inputs;
        ``weighted_err`` is None when none has importance weights.

    Example:
        >>> w = np.random.default_rng(0).standard_normal((4, 256)).astype(np.float32)
        >>> e, = measure_tensor([MatrixInput(w)], w.shape, [QuantFormat.Q8_0])
        >>> e.stored, e.nbytes
        (<QuantFormat.Q8_0: 'Q8_0'>, 272)
    """
    partial = measure_sums(mats, shape, candidates, max_elements=max_elements, seed=seed, n_threads=n_threads,
                           device=device, kernels=kernels, subsets=subsets)
    return finish_measure(partial, shape, candidates, rows_scale=rows_scale)


@dataclass
class PartialMeasure:
    """The additive part of a measurement: per stored type, error numerators and denominators summed over
    some of a tensor's matrices (experts). Parts of one tensor measured apart (by different processes) add
    with ``+``; :func:`finish_measure` turns the total into errors."""

    sums: dict[QuantFormat, tuple[float, ...]]
    measured_rows: int = 0
    has_im: bool = False
    has_x: bool = False
    has_g: bool = False

    def __add__(self, other: PartialMeasure) -> PartialMeasure:
        keys = list(self.sums) + [k for k in other.sums if k not in self.sums]
        zero = (0.0,) * 7
        return PartialMeasure(
            {k: tuple(a + b for a, b in zip(self.sums.get(k, zero), other.sums.get(k, zero))) for k in keys},
            self.measured_rows + other.measured_rows, self.has_im or other.has_im, self.has_x or other.has_x,
            self.has_g or other.has_g)


def measure_sums(
    mats: Sequence[MatrixInput],
    shape: Sequence[int],
    candidates: Sequence[QuantFormat],
    *,
    max_elements: int | None = None,
    seed: int = 0,
    n_threads: int | None = None,
    device: str = "cpu",
    kernels: bool | None = None,
    subsets: Sequence[np.ndarray | None] | None = None,
) -> PartialMeasure:
    """The sums behind :func:`measure_tensor` over ``mats`` (arguments as there)."""
    if subsets is None:
        rows0, cols0 = mats[0].weight.shape if mats else (0, 0)
        same = all(m.weight.shape == (rows0, cols0) for m in mats)
        subsets = (row_subsets(len(mats), rows0, cols0, max_elements, seed) if same else
                   [row_subsets(1, *m.weight.shape, max_elements, seed + i)[0] for i, m in enumerate(mats)])
    prepared = []
    for m, rows in zip(mats, subsets):
        w = np.ascontiguousarray(m.weight if rows is None else m.weight[rows], dtype=np.float32)
        x = None if m.x is None or len(m.x) == 0 else m.x.astype(np.float32)
        if m.grads is not None and m.grads.shape[1:] != w.shape:
            raise ValueError(f"gradients of shape {m.grads.shape[1:]} for a measured matrix of shape {w.shape}")
        prepared.append((w, m.importance, x, m.grads))

    use_kernels = measure_path(device, announce=False) == "kernels" if kernels is None else kernels
    on_device = _DeviceMats(prepared, device) if use_kernels and prepared else None
    cpu_y: list[np.ndarray | None] | None = None
    by_stored: dict[QuantFormat, tuple[float, ...]] = {}
    for fmt in candidates:
        stored = effective_format(fmt, shape) if not FORMATS[fmt].is_float else fmt
        if stored in by_stored:
            continue
        if on_device is not None and stored in kernel_formats():
            by_stored[stored] = on_device.sums(stored)
        else:
            if cpu_y is None:
                cpu_y = [None if x is None else x @ w.T for w, _, x, _ in prepared]
            by_stored[stored] = _libggml_sums(prepared, cpu_y, stored, n_threads)
    return PartialMeasure(by_stored, sum(p[0].shape[0] for p in prepared), any(p[1] is not None for p in prepared),
                          any(p[2] is not None for p in prepared), any(p[3] is not None for p in prepared))


def finish_measure(partial: PartialMeasure, shape: Sequence[int], candidates: Sequence[QuantFormat], *,
                   rows_scale: float | None = None) -> tuple[TypeError_, ...]:
    """One ``TypeError_`` per candidate from the summed parts of a tensor (``rows_scale`` as in
    :func:`measure_tensor`)."""
    all_rows = math.prod(shape[:-1]) if len(shape) > 1 else 1
    kld_scale = all_rows / max(1, partial.measured_rows) if rows_scale is None else rows_scale
    out = []
    for fmt in candidates:
        stored = effective_format(fmt, shape) if not FORMATS[fmt].is_float else fmt
        wn, wd, imn, imd, an, ad, kn = partial.sums[stored]
        out.append(TypeError_(
            fmt, stored, tensor_nbytes(stored, shape), wn / wd if wd > 0 else 0.0,
            (imn / imd if imd > 0 else 0.0) if partial.has_im else None,
            (an / ad if ad > 0 else 0.0) if partial.has_x else None,
            0.5 * kn * kld_scale if partial.has_g else None,
        ))
    return tuple(out)


# weight num/den, imatrix num/den, activation num/den, sum of squared gradient projections
_Sums = tuple[float, float, float, float, float, float, float]


def _grad_projection(d: np.ndarray, g: np.ndarray) -> float:
    """sum over probes n and rows i of (d_i . g_n,i)^2, in float64."""
    s = np.einsum("rc,nrc->nr", d.astype(np.float64), g.astype(np.float64), optimize=True)
    return float((s * s).sum())


def _libggml_sums(prepared: list, ys: list, stored: QuantFormat, n_threads: int | None) -> _Sums:
    wn = wd = imn = imd = an = ad = kn = 0.0
    for (w, im, x, g), y in zip(prepared, ys):
        q = round_trip(w, stored, im, n_threads)
        d = q - w
        if g is not None:
            kn += _grad_projection(d, g)
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
    return wn, wd, imn, imd, an, ad, kn


class _DeviceMats:
    """One tensor's matrices on the kernel device, moved once and measured for every kernel type.

    Weight and imatrix sums come from the fused :func:`dq.kernels.quant_error` (Triton on CUDA, the torch
    reference elsewhere); the activation error and the gradient projection need Q(W) itself, which the same
    pass writes when asked (``return_dequantized``), followed by float64 products on the device.
    """

    def __init__(self, prepared: list, device: str) -> None:
        import torch

        self._torch = torch
        self.mats = []
        for w, im, x, g in prepared:
            wt = torch.from_numpy(w).to(device)
            imt = None if im is None else torch.from_numpy(np.ascontiguousarray(im, dtype=np.float32)).to(device)
            xt = None if x is None else torch.from_numpy(x).to(device=device, dtype=torch.float64)
            gt = None if g is None else torch.from_numpy(np.ascontiguousarray(g)).to(device=device, dtype=torch.float64)
            ysq = None if xt is None else float(((xt @ wt.T.to(torch.float64)) ** 2).sum())
            self.mats.append((wt, imt, xt, gt, ysq))

    def sums(self, stored: QuantFormat) -> _Sums:
        from dq.kernels.api import quant_error

        torch = self._torch
        acc = torch.zeros(6, dtype=torch.float64, device=self.mats[0][0].device) if self.mats else None
        ad = 0.0
        for wt, imt, xt, gt, ysq in self.mats:
            need_q = xt is not None or gt is not None
            s = quant_error(wt, stored, imt, imatrix_quantizer=imt is not None, return_dequantized=need_q)
            parts = [s["sse"], s["sumsq"]] + ([s["wsse"], s["wsumsq"]] if imt is not None else [s["sse"][:0]] * 2)
            row = [p.to(torch.float64).sum() for p in parts]
            zero = torch.zeros((), dtype=torch.float64, device=wt.device)
            d = s["deq"].to(torch.float64) - wt.to(torch.float64) if need_q else None
            if xt is not None:
                row.append(((xt @ d.T) ** 2).sum())
                ad += ysq
            else:
                row.append(zero)
            row.append(((gt * d).sum(-1) ** 2).sum() if gt is not None else zero)
            acc += torch.stack(row)
        if acc is None:
            return 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0
        wn, wd, imn, imd, an, kn = acc.tolist()  # one device sync per tensor and type
        return wn, wd, imn, imd, an, ad, kn
