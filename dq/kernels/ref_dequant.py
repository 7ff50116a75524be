"""Torch reference dequantization of GGUF blocks, for every type in :data:`dq.quant.FORMATS`.

A port of gguf-py's numpy ``dequantize_blocks`` (``gguf/quants.py``) to torch, so it runs on the GPU
as well; the IQ grids are taken from gguf-py's tables. Products are formed in ggml's order
(``dequantize_row_*`` in ggml-quants.c: ``d * scale`` first, then times the quant), so the output is
bit-exact with libggml's ``to_float``.

Example:
    >>> import numpy as np, torch
    >>> from dq.quant import QuantFormat, libggml
    >>> w = np.random.default_rng(0).standard_normal((2, 256), dtype=np.float32)
    >>> raw = torch.frombuffer(bytearray(libggml.quantize(w, QuantFormat.Q4_K)), dtype=torch.uint8)
    >>> dequantize(raw, QuantFormat.Q4_K, (2, 256)).shape
    torch.Size([2, 256])
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import torch

from dq.quant.formats import FORMATS, QuantFormat, row_nbytes

__all__ = ["dequantize", "dequantize_blocks", "iq_grid", "KSIGNS", "KVALUES_IQ4NL", "KVALUES_MXFP4"]

QK_K = 256
KVALUES_IQ4NL = (-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113)
KVALUES_MXFP4 = (0, 1, 2, 3, 4, 6, 8, 12, 0, -1, -2, -3, -4, -6, -8, -12)


def _ksigns() -> tuple[int, ...]:
    # ksigns_iq2xs in ggml-common.h: 7 sign bits, the 8th makes the parity even
    return tuple(i | ((bin(i).count("1") & 1) << 7) for i in range(128))


KSIGNS = _ksigns()


@functools.cache
def _grid_np(fmt: QuantFormat):
    import gguf.quants as gq

    cls = {
        QuantFormat.IQ2_XXS: gq.IQ2_XXS, QuantFormat.IQ2_XS: gq.IQ2_XS, QuantFormat.IQ2_S: gq.IQ2_S,
        QuantFormat.IQ3_XXS: gq.IQ3_XXS, QuantFormat.IQ3_S: gq.IQ3_S,
        QuantFormat.IQ1_S: gq.IQ1_S, QuantFormat.IQ1_M: gq.IQ1_S,
    }[fmt]
    cls.init_grid()
    return cls.grid.reshape(cls.grid_shape).copy()


def iq_grid(fmt: QuantFormat, device: torch.device | str = "cpu") -> torch.Tensor:
    """The codebook of an IQ type as a float32 ``[entries, 4 or 8]`` tensor (iq2xxs_grid etc. in ggml)."""
    return torch.from_numpy(_grid_np(fmt)).to(device)


def _f16(b: torch.Tensor) -> torch.Tensor:
    """Little-endian fp16 fields (``[n, 2k]`` uint8) -> float32 ``[n, k]``."""
    return b.contiguous().view(torch.float16).to(torch.float32)


def _u16(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.int16).to(torch.int32) & 0xFFFF


def _u32(b: torch.Tensor) -> torch.Tensor:
    return b.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF


def _bits(x: torch.Tensor, shifts: Sequence[int], mask: int, axis_shape: tuple[int, ...]) -> torch.Tensor:
    """``(x[..., None, :] >> shifts[:, None]) & mask`` laid out as gguf-py does, as int32."""
    s = torch.tensor(shifts, dtype=torch.int32, device=x.device).reshape(axis_shape)
    return (x.to(torch.int32).unsqueeze(-2) >> s) & mask


def _lookup(table: Sequence[int], idx: torch.Tensor) -> torch.Tensor:
    t = torch.tensor(table, dtype=torch.float32, device=idx.device)
    return t[idx.long()]


def _q4_0(b):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    q = _bits(qs, [0, 4], 0xF, (2, 1)).reshape(b.shape[0], -1) - 8
    return d * q.float()


def _q4_1(b):
    d, m, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), b[:, 4:]
    q = _bits(qs, [0, 4], 0xF, (2, 1)).reshape(b.shape[0], -1)
    return d * q.float() + m


def _q5_0(b):
    d, qh, qs = _f16(b[:, :2]), _u32(b[:, 2:6]), b[:, 6:]
    hi = ((qh >> torch.arange(32, device=b.device)) & 1).to(torch.int32) << 4
    q = _bits(qs, [0, 4], 0xF, (2, 1)).reshape(b.shape[0], -1) | hi
    return d * (q - 16).float()


def _q5_1(b):
    d, m, qh, qs = _f16(b[:, :2]), _f16(b[:, 2:4]), _u32(b[:, 4:8]), b[:, 8:]
    hi = ((qh >> torch.arange(32, device=b.device)) & 1).to(torch.int32) << 4
    q = _bits(qs, [0, 4], 0xF, (2, 1)).reshape(b.shape[0], -1) | hi
    return d * q.float() + m


def _q8_0(b):
    return _f16(b[:, :2]) * b[:, 2:].view(torch.int8).float()


def _q2_k(b):
    n = b.shape[0]
    scales, qs, d, dmin = b[:, :16].to(torch.int32), b[:, 16:80], _f16(b[:, 80:82]), _f16(b[:, 82:84])
    dl = (d * (scales & 0xF).float()).reshape(n, 16, 1)
    ml = (dmin * (scales >> 4).float()).reshape(n, 16, 1)
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3, (4, 1)).reshape(n, 16, 16).float()
    return (dl * q - ml).reshape(n, QK_K)


def _q3_k(b):
    n = b.shape[0]
    hmask, qs, sc, d = b[:, :32], b[:, 32:96], b[:, 96:108], _f16(b[:, 108:110])
    ls = _bits(sc[:, :8], [0, 4], 0xF, (2, 1)).reshape(n, 16)
    hs = _bits(sc[:, 8:], [0, 2, 4, 6], 3, (4, 1)).reshape(n, 16)
    scales = ((ls | (hs << 4)) - 32).float()
    dl = (d * scales).reshape(n, 16, 1)
    ql = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3, (4, 1)).reshape(n, 16, 16)
    qh = _bits(hmask.reshape(n, 1, 32), list(range(8)), 1, (8, 1)).reshape(n, 16, 16)
    q = (ql - ((qh ^ 1) << 2)).float()
    return (dl * q).reshape(n, QK_K)


def _scale_min_k4(sc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # get_scale_min_k4 in ggml-quants.c
    s = sc.to(torch.int32).reshape(-1, 3, 4)
    d, m, md = s[:, 0], s[:, 1], s[:, 2]
    scale = torch.cat([d & 0x3F, (md & 0xF) | ((d >> 2) & 0x30)], dim=-1)
    mn = torch.cat([m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)], dim=-1)
    return scale.float(), mn.float()


def _q4_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    q = _bits(b[:, 16:].reshape(n, 4, 32), [0, 4], 0xF, (2, 1)).reshape(n, 8, 32).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(n, QK_K)


def _q5_k(b):
    n = b.shape[0]
    d, dmin = _f16(b[:, :2]), _f16(b[:, 2:4])
    sc, mn = _scale_min_k4(b[:, 4:16])
    qh, qs = b[:, 16:48], b[:, 48:]
    ql = _bits(qs.reshape(n, 4, 32), [0, 4], 0xF, (2, 1)).reshape(n, 8, 32)
    hb = _bits(qh.reshape(n, 1, 32), list(range(8)), 1, (8, 1)).reshape(n, 8, 32)
    q = (ql | (hb << 4)).float()
    return ((d * sc)[..., None] * q - (dmin * mn)[..., None]).reshape(n, QK_K)


def _q6_k(b):
    n = b.shape[0]
    ql, qh, sc, d = b[:, :128], b[:, 128:192], b[:, 192:208].view(torch.int8).float(), _f16(b[:, 208:210])
    dl = (d * sc).reshape(n, 16, 1)
    lo = _bits(ql.reshape(n, 2, 64), [0, 4], 0xF, (2, 1)).reshape(n, 8, 32)
    hi = _bits(qh.reshape(n, 2, 32), [0, 2, 4, 6], 3, (4, 1)).reshape(n, 8, 32)
    q = ((lo | (hi << 4)) - 32).reshape(n, 16, 16).float()
    return (dl * q).reshape(n, QK_K)


def _tq1_0(b):
    n = b.shape[0]
    qs, qh, d = b[:, :48].to(torch.int32), b[:, 48:52].to(torch.int32), _f16(b[:, 52:54])
    p5 = torch.tensor([1, 3, 9, 27, 81], dtype=torch.int32, device=b.device)
    q0 = (qs[:, None, :32] * p5[:, None]).reshape(n, -1)
    q1 = (qs[:, None, 32:] * p5[:, None]).reshape(n, -1)
    q2 = (qh[:, None, :] * p5[:4, None]).reshape(n, -1)
    q = torch.cat([q0, q1, q2], dim=-1) & 0xFF  # `uint8_t q = qs[j] * pow3[n]` wraps
    return ((q * 3) >> 8).sub(1).float() * d


def _tq2_0(b):
    n = b.shape[0]
    qs, d = b[:, :64], _f16(b[:, 64:66])
    q = _bits(qs.reshape(n, 2, 32), [0, 2, 4, 6], 3, (4, 1)).reshape(n, -1)
    return (q - 1).float() * d


def _iq4_nl(b):
    d, qs = _f16(b[:, :2]), b[:, 2:]
    q = _bits(qs, [0, 4], 0xF, (2, 1)).reshape(b.shape[0], -1)
    return d * _lookup(KVALUES_IQ4NL, q)


def _iq4_xs(b):
    n = b.shape[0]
    d, sh, sl, qs = _f16(b[:, :2]), _u16(b[:, 2:4]), b[:, 4:8], b[:, 8:]
    lo = _bits(sl, [0, 4], 0xF, (2, 1)).transpose(1, 2).reshape(n, 8)
    hi = (sh >> torch.arange(0, 16, 2, device=b.device)) & 3
    dl = (d * ((lo | (hi << 4)) - 32).float()).reshape(n, 8, 1)
    q = _bits(qs.reshape(n, 8, 16), [0, 4], 0xF, (2, 1)).reshape(n, 8, 32)
    return (dl * _lookup(KVALUES_IQ4NL, q)).reshape(n, QK_K)


def _mxfp4(b):
    e = b[:, :1].to(torch.int64)
    # ggml_e8m0_to_fp32_half
    bits = torch.where(e < 2, 0x00200000 << e, (e - 1) << 23).to(torch.int32)
    d = bits.view(torch.float32)
    q = _bits(b[:, 1:], [0, 4], 0xF, (2, 1)).reshape(b.shape[0], -1)
    return d * _lookup(KVALUES_MXFP4, q)


def _signs8(idx: torch.Tensor) -> torch.Tensor:
    """±1 for each of 8 sign bits of a byte tensor ``idx`` (last dim grows by 8)."""
    bits = (idx.to(torch.int32).unsqueeze(-1) >> torch.arange(8, device=idx.device)) & 1
    return 1.0 - 2.0 * bits.float()


def _iq2_xxs(b):
    n = b.shape[0]
    d, qs = _f16(b[:, :2]), _u32(b[:, 2:]).reshape(n, 8, 2)
    db = (d * (0.5 + (qs[..., 1] >> 28).float()) * 0.25).reshape(n, 8, 1, 1)
    sidx = (qs[..., 1:2] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F
    signs = _signs8(_lookup(KSIGNS, sidx).to(torch.int32))
    gidx = b[:, 2:].reshape(n, 8, 8)[..., :4]
    grid = iq_grid(QuantFormat.IQ2_XXS, b.device)[gidx.long()]
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_xs(b):
    n = b.shape[0]
    d, qs, sc = _f16(b[:, :2]), _u16(b[:, 2:66]).reshape(n, 32), b[:, 66:74]
    s = _bits(sc, [0, 4], 0xF, (2, 1)).transpose(1, 2).reshape(n, 16)
    db = (d * (0.5 + s.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs8(_lookup(KSIGNS, qs >> 9).to(torch.int32)).reshape(n, 16, 2, 8)
    grid = iq_grid(QuantFormat.IQ2_XS, b.device)[(qs & 511).long()].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq2_s(b):
    n = b.shape[0]
    d, qs, sg, qh, sc = _f16(b[:, :2]), b[:, 2:34], b[:, 34:66], b[:, 66:74], b[:, 74:82]
    s = _bits(sc, [0, 4], 0xF, (2, 1)).transpose(1, 2).reshape(n, 16)
    db = (d * (0.5 + s.float()) * 0.25).reshape(n, 16, 1, 1)
    signs = _signs8(sg).reshape(n, 16, 2, 8)
    hi = _bits(qh, [0, 2, 4, 6], 3, (4, 1)).transpose(1, 2).reshape(n, 32)
    idx = qs.to(torch.int32) | (hi << 8)
    grid = iq_grid(QuantFormat.IQ2_S, b.device)[idx.long()].reshape(n, 16, 2, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_xxs(b):
    n = b.shape[0]
    d, qs, sc = _f16(b[:, :2]), b[:, 2:66], _u32(b[:, 66:98])
    db = (d * (0.5 + (sc >> 28).float()) * 0.5).reshape(n, 8, 1, 1)
    sidx = (sc[..., None] >> torch.tensor([0, 7, 14, 21], device=b.device)) & 0x7F
    signs = _signs8(_lookup(KSIGNS, sidx).to(torch.int32))
    grid = iq_grid(QuantFormat.IQ3_XXS, b.device)[qs.long()].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq3_s(b):
    n = b.shape[0]
    d, qs, qh, sg, sc = _f16(b[:, :2]), b[:, 2:66], b[:, 66:74], b[:, 74:106], b[:, 106:110]
    s = _bits(sc, [0, 4], 0xF, (2, 1)).transpose(1, 2).reshape(n, 8)
    db = (d * (1 + 2 * s).float()).reshape(n, 8, 1, 1)
    signs = _signs8(sg).reshape(n, 8, 4, 8)
    hi = _bits(qh, list(range(8)), 1, (8, 1)).transpose(1, 2).reshape(n, 64)
    idx = qs.to(torch.int32) | (hi << 8)
    grid = iq_grid(QuantFormat.IQ3_S, b.device)[idx.long()].reshape(n, 8, 4, 8)
    return (db * grid * signs).reshape(n, QK_K)


def _iq1_s(b):
    n = b.shape[0]
    d, qs, qh = _f16(b[:, :2]), b[:, 2:34], _u16(b[:, 34:50])
    dl = (d * (2 * ((qh >> 12) & 7) + 1).float()).reshape(n, 8, 1, 1)
    delta = torch.where((qh & 0x8000) == 0, 0.125, -0.125).reshape(n, 8, 1, 1)
    hi = (qh[..., None] >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    idx = qs.to(torch.int32) | (hi.reshape(n, 32) << 8)
    grid = iq_grid(QuantFormat.IQ1_S, b.device)[idx.long()].reshape(n, 8, 4, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


def _iq1_m(b):
    n = b.shape[0]
    qs, qh, sc = b[:, :32], b[:, 32:48], _u16(b[:, 48:56])
    dbits = (sc & 0xF000) >> torch.tensor([12, 8, 4, 0], device=b.device)
    d = (dbits[:, 0] | dbits[:, 1] | dbits[:, 2] | dbits[:, 3]).to(torch.int16).view(torch.float16).float()
    s = (sc[..., None] >> torch.tensor([0, 3, 6, 9], device=b.device)) & 7
    dl = (d[:, None] * (2 * s.reshape(n, 16) + 1).float()).reshape(n, 8, 2, 1, 1)
    h = _bits(qh, [0, 4], 0xF, (2, 1)).transpose(1, 2).reshape(n, 32)
    idx = qs.to(torch.int32) | ((h & 7) << 8)
    delta = torch.where((h & 8) == 0, 0.125, -0.125).reshape(n, 8, 2, 2, 1)
    grid = iq_grid(QuantFormat.IQ1_S, b.device)[idx.long()].reshape(n, 8, 2, 2, 8)
    return (dl * (grid + delta)).reshape(n, QK_K)


_DEQ: dict[QuantFormat, Callable[[torch.Tensor], torch.Tensor]] = {
    QuantFormat.Q4_0: _q4_0, QuantFormat.Q4_1: _q4_1, QuantFormat.Q5_0: _q5_0, QuantFormat.Q5_1: _q5_1,
    QuantFormat.Q8_0: _q8_0, QuantFormat.Q2_K: _q2_k, QuantFormat.Q3_K: _q3_k, QuantFormat.Q4_K: _q4_k,
    QuantFormat.Q5_K: _q5_k, QuantFormat.Q6_K: _q6_k, QuantFormat.TQ1_0: _tq1_0, QuantFormat.TQ2_0: _tq2_0,
    QuantFormat.IQ4_NL: _iq4_nl, QuantFormat.IQ4_XS: _iq4_xs, QuantFormat.MXFP4: _mxfp4,
    QuantFormat.IQ2_XXS: _iq2_xxs, QuantFormat.IQ2_XS: _iq2_xs, QuantFormat.IQ2_S: _iq2_s,
    QuantFormat.IQ3_XXS: _iq3_xxs, QuantFormat.IQ3_S: _iq3_s, QuantFormat.IQ1_S: _iq1_s,
    QuantFormat.IQ1_M: _iq1_m,
}


def dequantize_blocks(blocks: torch.Tensor, fmt: QuantFormat) -> torch.Tensor:
    """Dequantize ``[n_blocks, type_size]`` uint8 blocks to float32 ``[n_blocks, block_size]``."""
    spec = FORMATS[fmt]
    if fmt is QuantFormat.F32:
        return blocks.contiguous().view(torch.float32).reshape(-1, 1)
    if fmt is QuantFormat.F16:
        return blocks.contiguous().view(torch.float16).float().reshape(-1, 1)
    if fmt is QuantFormat.BF16:
        return blocks.contiguous().view(torch.bfloat16).float().reshape(-1, 1)
    assert blocks.dtype == torch.uint8 and blocks.shape[-1] == spec.type_size, (blocks.dtype, blocks.shape)
    return _DEQ[fmt](blocks)


def dequantize(
    data: torch.Tensor, fmt: QuantFormat, shape: Sequence[int], dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dequantize a GGUF tensor payload (raw bytes as a uint8 tensor) on its device.

    Args:
        data: uint8 tensor holding ``tensor_nbytes(fmt, shape)`` bytes (any shape; flattened).
        fmt: the GGML type of the payload.
        shape: numpy shape of the float tensor; the last dimension is the row length.
        dtype: output dtype (float32 or bfloat16).

    Returns:
        tensor of ``shape`` and ``dtype`` on ``data.device``.

    Raises:
        ValueError: byte count or row length does not fit ``fmt``.
    """
    shape = tuple(int(s) for s in shape)
    if data.dtype != torch.uint8:
        raise ValueError(f"dequantize expects raw uint8 bytes, got {data.dtype}; use tensor.view(torch.uint8)")
    n_rows = 1
    for s in shape[:-1]:
        n_rows *= s
    expected = n_rows * row_nbytes(fmt, shape[-1])
    if data.numel() != expected:
        raise ValueError(f"{fmt} payload has {data.numel()} bytes, expected {expected} for shape {shape}")
    spec = FORMATS[fmt]
    out = dequantize_blocks(data.reshape(-1, spec.type_size), fmt)
    return out.reshape(shape).to(dtype)
