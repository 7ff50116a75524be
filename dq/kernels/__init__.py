"""GPU kernels (Triton) for fast analysis, each with a torch reference used on CPUs and in CI.

- :func:`quant_error`: fused fake-quantization (ggml's reference quantizers) and per-row error sums.
- :func:`dequantize`: GGUF blocks of every type to float32/bfloat16.
- :func:`act_stats`: per-channel sum of x^2 and max |x| of activations (imatrix, super weights).

Triton is imported lazily inside the kernel modules, so ``import dq.kernels`` works without it.
Kernels never choose formats; they receive a ``dq.quant.QuantFormat`` or ``FormatSpec``.
"""

from dq.kernels.api import act_stats, dequantize, quant_error, resolve_backend, triton_available

__all__ = ["act_stats", "dequantize", "quant_error", "resolve_backend", "triton_available"]
