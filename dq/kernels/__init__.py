"""GPU kernels (Triton) for fast analysis, each with a torch reference used on CPUs and in CI.

Triton is imported lazily inside the kernel modules, so ``import dq.kernels`` works without it.
Kernels never choose formats; they receive a ``dq.quant.FormatSpec``."""
