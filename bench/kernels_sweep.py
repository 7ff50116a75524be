"""Sweep the Triton kernels' launch shapes on a GPU (tile size x warps) and print the fastest per type.

The defaults in ``dq/kernels/_triton_quant.py`` / ``_triton_dequant.py`` come from this sweep; rerun
it on a new GPU before changing them. Times are CUDA-graph replays (launch overhead excluded).

Usage: python bench/kernels_sweep.py [--shape 4096x14336] [--out bench/results/kernels_sweep.json]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dq.quant import QuantFormat, libggml, tensor_nbytes

HBM_GBPS = 3350.0
ERR_TILES = {
    QuantFormat.Q8_0: (8, 16, 32, 64), QuantFormat.Q4_0: (8, 16, 32, 64), QuantFormat.Q5_1: (8, 16, 32, 64),
    QuantFormat.TQ2_0: (2, 4, 8, 16), QuantFormat.Q4_K: (2, 4, 8, 16), QuantFormat.Q5_K: (4, 8, 16),
    QuantFormat.Q2_K: (4, 8, 16), QuantFormat.Q3_K: (4, 8, 16), QuantFormat.Q6_K: (2, 4, 8, 16),
}
DEQ_TILES = {f: (2, 4, 8, 16) for f in (QuantFormat.Q2_K, QuantFormat.Q3_K, QuantFormat.Q4_K, QuantFormat.Q5_K,
                                      QuantFormat.Q6_K, QuantFormat.TQ1_0, QuantFormat.IQ4_XS)}
WARPS = (1, 2, 4, 8)


def gpu_ms(fn) -> float:
    from triton.testing import do_bench_cudagraph

    return do_bench_cudagraph(fn, rep=20)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--shape", default="4096x14336")
    ap.add_argument("--out", default="bench/results/kernels_sweep.json")
    ap.add_argument("--types", default="", help="comma list of types to sweep (default: all in the tables)")
    ap.add_argument("--kernels", default="err,deq")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels_sweep.py needs a CUDA GPU")
    from dq.kernels._triton_dequant import dequantize_triton
    from dq.kernels._triton_quant import quant_error_triton

    rows, cols = (int(v) for v in args.shape.split("x"))
    w_cpu = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
    w = w_cpu.cuda()
    im = torch.rand(cols, device="cuda") + 0.1
    res = []
    only = {QuantFormat(t) for t in args.types.split(",") if t}
    kernels = set(args.kernels.split(","))
    for fmt, tiles in ERR_TILES.items():
        if "err" not in kernels or (only and fmt not in only):
            continue
        for tile in tiles:
            for nw in WARPS:
                lanes = tile * 256 // (32 if fmt in (QuantFormat.Q4_K, QuantFormat.Q5_K) else 16)
                if fmt.value.endswith("_K") and nw > 1 and nw * 32 > lanes:
                    continue  # one lane per sub-block: more threads than lanes only repeat work
                ms = gpu_ms(lambda: quant_error_triton(w, fmt, im, tile=tile, num_warps=nw))
                gbps = (w.numel() + cols) * 4 / ms / 1e6
                res.append({"kernel": "err", "type": fmt.value, "tile": tile, "warps": nw, "ms": ms, "gbps": gbps})
                print(f"err {fmt.value:6} tile {tile:3} warps {nw}: {ms:8.3f} ms {gbps:7.0f} GB/s "
                      f"{100 * gbps / HBM_GBPS:5.1f}%", flush=True)
    for fmt, tiles in DEQ_TILES.items():
        if "deq" not in kernels or (only and fmt not in only):
            continue
        raw = libggml.quantize(w_cpu.numpy(), fmt)
        data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).cuda()
        moved = tensor_nbytes(fmt, (rows, cols)) + w.numel() * 2
        for tile in tiles:
            for nw in WARPS:
                ms = gpu_ms(lambda: dequantize_triton(data, fmt, w.numel(), torch.bfloat16, tile=tile, num_warps=nw))
                gbps = moved / ms / 1e6
                res.append({"kernel": "deq", "type": fmt.value, "tile": tile, "warps": nw, "ms": ms, "gbps": gbps})
                print(f"deq {fmt.value:6} tile {tile:3} warps {nw}: {ms:8.3f} ms {gbps:7.0f} GB/s "
                      f"{100 * gbps / HBM_GBPS:5.1f}%", flush=True)
    best = {}
    for r in res:
        k = (r["kernel"], r["type"])
        if k not in best or r["ms"] < best[k]["ms"]:
            best[k] = r
    print("\nfastest:")
    for (kern, t), r in best.items():
        print(f"  {kern} {t:6} tile {r['tile']:3} warps {r['warps']}: {r['gbps']:7.0f} GB/s "
              f"{100 * r['gbps'] / HBM_GBPS:5.1f}%")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"gpu": torch.cuda.get_device_name(), "shape": [rows, cols], "results": res}, indent=1))
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
