"""Triton device functions that round exactly as ggml-quants.c does, shared by the quantizer kernels.

Compiled kernels round with single PTX instructions (cvt.rzi / cvt.rni / round); Triton's interpreter
(TRITON_INTERPRET=1, read by triton.jit when this module is imported) has no libdevice, so there the
same results are built from exact casts. Both equal ggml's rounding on every value the callers keep.
"""

from __future__ import annotations

import os

import triton
import triton.language as tl
from triton.language.extra import libdevice

__all__ = ["HW", "trunc", "rne", "roundf", "fp16", "div", "safe"]

HW = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") != "1")


@triton.jit
def trunc(x):
    # exact truncation toward zero (cvt.rzi); the interpreter has no libdevice, so it is built from casts
    if HW:
        return libdevice.trunc(x)
    x = tl.minimum(tl.maximum(x, -8388608.0), 8388608.0)
    return x.to(tl.int32).to(tl.float32)


@triton.jit
def rne(x):
    # ggml-quants.c nearest_int: round half to even (the 1.5*2^23 trick). Every caller clamps the result
    # to a small range, where rint (cvt.rni) and the exact-cast emulation agree with nearest_int.
    if HW:
        return libdevice.rint(x)
    x = tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)
    r = x.to(tl.int32).to(tl.float32)
    af = tl.abs(x - r)
    odd = (r.to(tl.int32) & 1) != 0
    up = (af > 0.5) | ((af == 0.5) & odd)
    return tl.where(up, r + tl.where(x < 0, -1.0, 1.0), r)


@triton.jit
def roundf(x):
    # C roundf / lroundf: half away from zero
    if HW:
        return libdevice.round(x)
    x = tl.minimum(tl.maximum(x, -4194304.0), 4194304.0)
    r = x.to(tl.int32).to(tl.float32)
    return tl.where(tl.abs(x - r) >= 0.5, r + tl.where(x < 0, -1.0, 1.0), r)


@triton.jit
def fp16(x):
    return x.to(tl.float16).to(tl.float32)


@triton.jit
def div(a, b):
    return tl.math.div_rn(a, b)


@triton.jit
def safe(d):
    return tl.where(d != 0, d, 1.0)
