"""Tensor quantizers for the GGUF writer: libggml on the CPU, or dq's kernels on a torch device.

:func:`dq.export.gguf_quantize.quantize_gguf` hands each tensor's source payload (BF16/F16/F32 from the
converter, or a quantized type being requantized) and its target type to one of these and writes the bytes
it returns. Both give llama.cpp's bytes:

- :class:`LibggmlQuantizer` calls ``ggml_quantize_chunk`` itself (:func:`dq.quant.libggml.requantize`) on
  one thread pool for the whole file;
- :class:`KernelQuantizer` moves the payload to a device (``cuda``; ``cpu`` runs the same code, as CI
  does), converts it to float32 there and packs the blocks with :func:`dq.kernels.ref_pack.quantize_bytes`,
  the torch ports of ggml-quants.c whose bytes ``tests/kernels/test_ref_pack.py`` checks against libggml for
  every type. Rows go through in chunks of at most ``chunk_weights`` weights, so device memory stays
  bounded whatever the tensor's size. A type without a port (MXFP4) goes to libggml.

MoE expert tensors (3-D) are quantized expert by expert with that expert's imatrix slice, as llama.cpp does.

Example:
    >>> q = KernelQuantizer("cuda")                                        # doctest: +SKIP
    >>> blob = q(choice, raw_bf16_bytes, imatrix_rows)                     # doctest: +SKIP
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

import numpy as np

from dq.quant import libggml
from dq.quant.assign import TensorChoice
from dq.quant.formats import FORMATS, QuantFormat, row_nbytes

if TYPE_CHECKING:
    import torch

__all__ = ["LibggmlQuantizer", "KernelQuantizer"]

log = logging.getLogger(__name__)


def _expert_slices(choice: TensorChoice, raw: np.ndarray, weights: np.ndarray | None):
    """``(payload, its shape, imatrix row or None)`` per expert of a merged 3-D tensor; one slice, the whole
    tensor's, for any other (2-D, or a vision conv's 4-D/5-D)."""
    merged = len(choice.shape) == 3
    experts, shape = (choice.shape[0], choice.shape[1:]) if merged else (1, choice.shape)
    per = raw.nbytes // experts
    for i in range(experts):
        im = None
        if weights is not None and not FORMATS[choice.stored].is_float:
            im = weights[i if weights.shape[0] > 1 else 0]
        yield raw[i * per:(i + 1) * per], shape, im


class LibggmlQuantizer:
    """llama.cpp's own quantizers on this machine's CPUs, ``n_threads`` workers shared by every tensor."""

    def __init__(self, n_threads: int, pool: ThreadPoolExecutor) -> None:
        self.n_threads, self.pool = n_threads, pool

    def __call__(self, choice: TensorChoice, raw: np.ndarray, weights: np.ndarray | None) -> bytes | np.ndarray:
        if choice.stored is choice.source:
            return raw
        parts = [libggml.requantize_array(part, choice.source, shape, choice.stored, im,
                                          n_threads=self.n_threads, pool=self.pool)
                 for part, shape, im in _expert_slices(choice, raw, weights)]
        return parts[0] if len(parts) == 1 else b"".join(parts)


class KernelQuantizer:
    """dq's torch/Triton quantizers on ``device``; types they do not cover fall back to ``fallback``.

    Args:
        device: a torch device (``cuda``, ``cuda:1``; ``cpu`` runs the torch ports on the CPU).
        fallback: the libggml quantizer for types without a port.
        chunk_weights: at most this many weights are converted and quantized at once.
    """

    def __init__(self, device: str, fallback: LibggmlQuantizer, chunk_weights: int = 1 << 25) -> None:
        import torch

        from dq.kernels.ref_pack import PACK_FORMATS

        self.device = torch.device(device)
        if self.device.type == "cuda" and not torch.cuda.is_available():
            from dq.errors import DQError

            raise DQError(f"--device {device} was asked for but torch sees no CUDA device; use --device cpu")
        self.fallback, self.chunk_weights = fallback, chunk_weights
        self.formats = frozenset(PACK_FORMATS)
        self._warned: set[QuantFormat] = set()

    def __call__(self, choice: TensorChoice, raw: np.ndarray, weights: np.ndarray | None) -> bytes | np.ndarray:
        if choice.stored is choice.source:
            return raw
        if choice.stored not in self.formats:
            if choice.stored not in self._warned:
                log.info("%s has no device quantizer: quantized by libggml on the CPU", choice.stored)
                self._warned.add(choice.stored)
            return self.fallback(choice, raw, weights)
        n_per_row = choice.shape[-1]
        out_row = row_nbytes(choice.stored, n_per_row)
        in_row = row_nbytes(choice.source, n_per_row)
        out = np.empty(raw.nbytes // in_row * out_row, dtype=np.uint8)
        pos = 0
        for part, _, im in _expert_slices(choice, raw, weights):
            imt = None if im is None else self._to_device(np.ascontiguousarray(im, dtype=np.float32))
            rows = part.nbytes // in_row
            step = max(1, self.chunk_weights // n_per_row)
            for r0 in range(0, rows, step):
                r1 = min(rows, r0 + step)
                w = self._floats(part[r0 * in_row:r1 * in_row], choice.source, (r1 - r0, n_per_row))
                blob = self._quantize(w, choice.stored, imt)
                out[pos:pos + blob.nbytes] = blob
                pos += blob.nbytes
        if pos != out.nbytes:
            raise RuntimeError(f"{choice.name}: the device quantizer wrote {pos:,} of {out.nbytes:,} bytes (a bug in dq)")
        return out

    def _to_device(self, a: np.ndarray) -> torch.Tensor:
        import torch

        t = torch.from_numpy(np.array(a, copy=True))  # memmaps are read-only; torch wants a writable buffer
        if self.device.type == "cuda":
            return t.pin_memory().to(self.device, non_blocking=True)
        return t

    def _floats(self, payload: np.ndarray, fmt: QuantFormat, shape: tuple[int, int]) -> torch.Tensor:
        """The payload's values as float32 on the device, exactly as libggml's to_float gives them."""
        import torch

        t = self._to_device(payload.reshape(-1))
        if fmt is QuantFormat.BF16:  # bf16 -> f32 is the 16 bits shifted up (ggml_bf16_to_fp32)
            return (t.view(torch.int16).to(torch.int32) << 16).view(torch.float32).reshape(shape)
        if fmt is QuantFormat.F16:
            return t.view(torch.float16).to(torch.float32).reshape(shape)
        if fmt is QuantFormat.F32:
            return t.view(torch.float32).reshape(shape)
        from dq.kernels.api import dequantize

        return dequantize(t, fmt, shape)

    def _quantize(self, w: torch.Tensor, fmt: QuantFormat, imatrix: torch.Tensor | None) -> np.ndarray:
        from dq.kernels.ref_pack import quantize_bytes

        return quantize_bytes(w, fmt, imatrix).cpu().numpy()
