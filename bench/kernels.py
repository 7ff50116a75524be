"""Benchmark dq.kernels on a GPU: GB/s per kernel and type vs HBM, and speed-up vs libggml on the CPUs.

For each shape and type: the fused error kernel (reads fp32 weights once), the dequant kernel (reads
the GGUF bytes, writes bf16), and the CPU path ``libggml.quantize`` + ``libggml.dequantize`` (the
error needs both) timed in the same run. IQ3_XXS, IQ3_S, IQ2_S, IQ2_XS, IQ2_XXS, IQ1_S and IQ1_M (``--types``)
have no single Triton error kernel: their "err" column is the torch port of the lattice search run on the GPU
(``dq.kernels.ref_iqgrid``, ``dq.kernels.ref_iq1``, its sequential loops as Triton kernels), timed eagerly;
their "deq" column is the Triton kernel of ``dq.kernels._triton_iqdequant``, as for every type in
``TRITON_DEQUANT_FORMATS``. Bytes moved / kernel time gives GB/s, compared with the HBM bandwidth measured
in the same run.

Usage: python bench/kernels.py [--out bench/results/kernels.json] [--shapes 4096x4096,4096x14336]
       python bench/kernels.py --types IQ2_XXS,IQ2_XS,IQ2_S,IQ3_XXS,IQ3_S,IQ1_S,IQ1_M --cpu-rows 64
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from dq.kernels import act_stats, dequantize, quant_error
from dq.kernels.api import LATTICE_FORMATS, TRITON_DEQUANT_FORMATS
from dq.kernels.ref_pack import quantize_bytes
from dq.quant import QuantFormat, libggml, tensor_nbytes
from dq.quant.formats import FORMATS

TYPES = [QuantFormat.Q8_0, QuantFormat.Q4_0, QuantFormat.Q4_1, QuantFormat.Q5_0, QuantFormat.Q5_1,
         QuantFormat.TQ1_0, QuantFormat.TQ2_0, QuantFormat.Q2_K, QuantFormat.Q3_K, QuantFormat.Q4_K,
         QuantFormat.Q5_K, QuantFormat.Q6_K, QuantFormat.IQ4_NL, QuantFormat.IQ4_XS]


def gpu_time(fn, reps: int = 20, graph: bool = True) -> float:
    """Seconds per call; replayed from a CUDA graph so host launch overhead (~0.1-0.2 ms) is excluded
    (``graph=False``: eager, launch overhead included, for code that synchronises: the lattice searches)."""
    try:
        from triton.testing import do_bench_cudagraph

        if graph:
            return do_bench_cudagraph(fn, rep=reps) / 1000
    except Exception:  # noqa: BLE001 - fall back to eager timing (includes launch overhead)
        pass
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / 1000 / reps


def measured_hbm_gbps() -> dict:
    """This GPU's memory bandwidth, measured: the best of a 2 GiB read (sum), write (fill) and copy."""
    src = torch.empty(1 << 29, dtype=torch.float32, device="cuda").normal_()
    dst = torch.empty_like(src)
    n = src.numel() * 4
    got = {"read": n / gpu_time(lambda: src.sum()) / 1e9,
           "write": n / gpu_time(lambda: dst.fill_(1.0)) / 1e9,
           "copy": 2 * n / gpu_time(lambda: dst.copy_(src)) / 1e9}
    return {**got, "best": max(got.values())}


def render(doc: dict) -> str:
    m = doc["meta"]
    hbm = m["hbm_gbps"]
    lines = [f"# dq.kernels on {m['gpu']} (bench/kernels.py)", "",
             f"torch {m['torch']}, triton {m.get('triton')}; HBM bandwidth measured in the same run (best of a "
             f"2 GiB read, write and copy): {hbm:.0f} GB/s; CPU baseline: libggml on this machine's {m['cpu_count']} cores "
             f"({m['libggml_threads']} threads). `err` = fused quantize-dequantize-error kernel, `deq` = GGUF bytes "
             f"-> bf16, `x cpu` = libggml quantize+dequantize time / kernel time (imatrix quantizers for the "
             f"last column).", "",
             "| shape | type | err ms | err GB/s | err %HBM | deq ms | deq GB/s | deq %HBM | libggml ms | err x CPU | "
             "imatrix err x CPU |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in doc["results"]:
        deq = (f"{r['deq_bf16_ms']:.3f} | {r['deq_gbps']:.0f} | {100 * r['deq_gbps'] / hbm:.1f}"
               if r["deq_gbps"] else "- | - | -")
        lines.append(f"| {r['shape'][0]}x{r['shape'][1]} | {r['type']} | {r['err_ms']:.3f} | {r['err_gbps']:.0f} | "
                     f"{100 * r['err_gbps'] / hbm:.1f} | {deq} | {r['cpu_quant_dequant_ms']:.1f} | "
                     f"{r['speedup_err_vs_cpu']:.0f} | {r['speedup_imatrix_vs_cpu']:.0f} |")
    a = doc["act_stats"]
    lines += ["", f"act_stats {a['shape'][0]}x{a['shape'][1]} {a['dtype']}: {a['ms']:.3f} ms, {a['gbps']:.0f} GB/s "
              f"({100 * a['gbps'] / hbm:.1f}% of HBM)"]
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--render", default=None, help="only write the Markdown of an existing JSON")
    ap.add_argument("--out", default="bench/results/kernels.json")
    ap.add_argument("--shapes", default="4096x4096,4096x14336")
    ap.add_argument("--types", default=",".join(t.value for t in TYPES))
    ap.add_argument("--cpu-rows", type=int, default=0, help="time libggml on this many rows and scale (0: all)")
    args = ap.parse_args()
    if args.render:
        doc = json.loads(Path(args.render).read_text())
        if "hbm_gbps" not in doc["meta"]:
            raise SystemExit("this JSON has no measured HBM bandwidth")
        Path(args.render).with_suffix(".md").write_text(render(doc))
        return 0
    if not torch.cuda.is_available():
        raise SystemExit("bench/kernels.py needs a CUDA GPU")
    hbm = measured_hbm_gbps()
    hbm_gbps = hbm["best"]
    print("measured HBM bandwidth (GB/s): " + ", ".join(f"{k} {v:.0f}" for k, v in hbm.items()))
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    types = [QuantFormat(t) for t in args.types.split(",")]
    rows_out = []
    print(f"{'shape':>11} {'type':>6} {'err ms':>8} {'err GB/s':>9} {'%HBM':>5} {'deq ms':>8} {'deq GB/s':>9} "
          f"{'%HBM':>5} {'cpu ms':>9} {'x cpu':>7}")
    for rows, cols in shapes:
        w_cpu = torch.randn(rows, cols, generator=torch.Generator().manual_seed(0))
        w = w_cpu.cuda()
        im = torch.rand(cols, device="cuda") + 0.1
        for fmt in types:
            # the IQ lattice searches run as torch ops on the GPU (no fused Triton kernel; their syncs rule out graphs)
            grid = fmt in LATTICE_FORMATS
            be, reps = ("torch", 3) if grid else ("triton", 20)
            t_err = gpu_time(lambda: quant_error(w, fmt, im, backend=be), reps, graph=not grid)
            err_bytes = w.numel() * 4 + cols * 4
            wn = w_cpu.numpy()
            if args.cpu_rows:
                wn = wn[: args.cpu_rows]
            t0 = time.perf_counter()
            ones = np.ones(cols, np.float32) if FORMATS[fmt].needs_imatrix else None  # as dq quantizes then
            raw = libggml.quantize(wn, fmt, ones)
            libggml.dequantize(raw, fmt, wn.shape)
            t_cpu = (time.perf_counter() - t0) * rows / wn.shape[0]
            if args.cpu_rows:  # the dequant input: the whole tensor's bytes from dq's port (libggml's bytes) on the GPU
                data = quantize_bytes(w, fmt, None if ones is None else torch.from_numpy(ones).cuda()).reshape(-1)
            else:
                data = torch.frombuffer(bytearray(raw), dtype=torch.uint8).cuda()
            t_deq = deq_gbps = None
            if fmt in TRITON_DEQUANT_FORMATS:
                t_deq = gpu_time(lambda: dequantize(data, fmt, (rows, cols), torch.bfloat16, backend="triton"))
                deq_gbps = (tensor_nbytes(fmt, (rows, cols)) + w.numel() * 2) / t_deq / 1e9
            # libggml's imatrix quantizer (quantize_row_*_impl) vs its port
            t_im = gpu_time(lambda: quant_error(w, fmt, im, backend=be, imatrix_quantizer=True), reps, graph=not grid)
            im_np = im.cpu().numpy()
            t0 = time.perf_counter()
            libggml.dequantize(libggml.quantize(wn, fmt, im_np), fmt, wn.shape)
            t_cpu_im = (time.perf_counter() - t0) * rows / wn.shape[0]
            r = {
                "shape": [rows, cols], "type": fmt.value,
                "err_imatrix_quantizer_ms": t_im * 1e3,
                "cpu_imatrix_quant_dequant_ms": t_cpu_im * 1e3,
                "speedup_imatrix_vs_cpu": t_cpu_im / t_im,
                "err_ms": t_err * 1e3, "err_gbps": err_bytes / t_err / 1e9,
                "deq_bf16_ms": None if t_deq is None else t_deq * 1e3, "deq_gbps": deq_gbps,
                "cpu_quant_dequant_ms": t_cpu * 1e3, "speedup_err_vs_cpu": t_cpu / t_err,
            }
            rows_out.append(r)
            print(f"{rows}x{cols:>6} {fmt.value:>6} {r['err_ms']:8.3f} {r['err_gbps']:9.1f} "
                  f"{100 * r['err_gbps'] / hbm_gbps:5.1f} {r['deq_bf16_ms'] or 0:8.3f} {deq_gbps or 0:9.1f} "
                  f"{100 * (deq_gbps or 0) / hbm_gbps:5.1f} {r['cpu_quant_dequant_ms']:9.1f} "
                  f"{r['speedup_err_vs_cpu']:7.1f}"
                  + f"   imatrix quantizer: {t_im * 1e3:.3f} ms vs libggml {t_cpu_im * 1e3:.1f} ms "
                  f"= {t_cpu_im / t_im:.0f}x", flush=True)
    x = torch.randn(8192, 4096, device="cuda", dtype=torch.bfloat16)
    t_act = gpu_time(lambda: act_stats(x, backend="triton"))
    act = {"shape": [8192, 4096], "dtype": "bf16", "ms": t_act * 1e3, "gbps": x.numel() * 2 / t_act / 1e9}
    print(f"act_stats 8192x4096 bf16: {act['ms']:.3f} ms, {act['gbps']:.1f} GB/s")
    meta = {
        "gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "cpu": platform.processor(),
        "cpu_count": os.cpu_count(), "hbm_gbps": hbm_gbps, "hbm_measured": hbm,
        "libggml_threads": max(1, min(8, os.cpu_count() or 1)),
    }
    try:
        import triton

        meta["triton"] = triton.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    doc = {"meta": meta, "results": rows_out, "act_stats": act}
    out.write_text(json.dumps(doc, indent=2))
    out.with_suffix(".md").write_text(render(doc))
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return 0


if __name__ == "__main__":
    np.seterr(all="ignore")
    raise SystemExit(main())
