"""Time the IQ lattice quantizers on a GPU against libggml on the same machine's CPUs.

For each type of :data:`dq.kernels.api.LATTICE_FORMATS` and each shape (default: the two ~2M-weight
row subsets ``dq analyze`` measures per tensor of an 8B model, 146x14336 and 512x4096): the GPU time of
``quant_error`` with the imatrix (the byte-exact torch ports, their sequential loops as Triton kernels;
best of 3, eager, launch overhead included) and libggml's ``quantize`` + ``dequantize`` on ``--threads``
threads, in the same run; plus the CUDA kernel time and launch count of one call from torch.profiler.
Prints a table and writes JSON and Markdown.

Usage: python bench/lattice_times.py [--out bench/results/lattice_times_h200.json] [--threads 16]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from dq.kernels.api import LATTICE_FORMATS, quant_error
from dq.quant import libggml

_LAUNCH = ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC", "cuLaunchKernelEx")


def _profile(w, fmt, im) -> tuple[float, int]:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as p:
        quant_error(w, fmt, im, imatrix_quantizer=True)
        torch.cuda.synchronize()
    ev = p.key_averages()
    kernel_ms = sum(e.device_time_total for e in ev if e.device_type.name == "CUDA") / 1e3
    return kernel_ms, sum(e.count for e in ev if e.key in _LAUNCH)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", type=Path, default=Path("bench/results/lattice_times_h200.json"))
    ap.add_argument("--shapes", default="146x14336,512x4096")
    ap.add_argument("--threads", type=int, default=16)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    for shape in a.shapes.split(","):
        r, c = (int(v) for v in shape.split("x"))
        w = torch.randn(r, c, device="cuda")
        im = torch.rand(c, device="cuda") + 0.1
        wn, imn = w.cpu().numpy(), im.cpu().numpy()
        for fmt in LATTICE_FORMATS:
            quant_error(w[:8], fmt, im)  # compile the kernels
            torch.cuda.synchronize()
            ts = []
            for _ in range(3):
                t0 = time.perf_counter()
                quant_error(w, fmt, im, imatrix_quantizer=True)
                torch.cuda.synchronize()
                ts.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            libggml.dequantize(libggml.quantize(wn, fmt, imn, n_threads=a.threads), fmt, wn.shape)
            cpu = time.perf_counter() - t0
            kernel_ms, launches = _profile(w, fmt, im)
            rows.append({"shape": shape, "type": fmt.value, "gpu_ms": round(min(ts) * 1e3, 2),
                         "kernel_ms": round(kernel_ms, 2), "launches": launches,
                         "libggml_ms": round(cpu * 1e3, 1), "speedup": round(cpu / min(ts), 1)})
            print(f"{shape:>10} {fmt.value:>8} gpu {rows[-1]['gpu_ms']:8.2f} ms  kernels {kernel_ms:7.2f} ms "
                  f"{launches:5d} launches  libggml({a.threads}) {rows[-1]['libggml_ms']:8.1f} ms  "
                  f"x{rows[-1]['speedup']}", flush=True)
    meta = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "threads": a.threads,
            "cpus": __import__("os").cpu_count()}
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [f"# IQ lattice quantizers on {meta['gpu']} vs libggml ({a.threads} threads, {meta['cpus']} CPUs)",
             "", "`python bench/lattice_times.py`; quant_error with the imatrix, best of 3, eager.", "",
             "| shape | type | GPU ms | of which kernels ms | launches | libggml ms | x libggml |",
             "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['shape']} | {r['type']} | {r['gpu_ms']} | {r['kernel_ms']} | {r['launches']} | "
              f"{r['libggml_ms']} | {r['speedup']} |" for r in rows]
    a.out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(f"wrote {a.out} and {a.out.with_suffix('.md')}")


if __name__ == "__main__":
    main()
