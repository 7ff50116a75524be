"""Quantization speed: dq's writer vs llama.cpp's `llama_model_quantize`, same settings, one run.

For SmolLM2-135M (BF16 GGUF from llama.cpp's converter): Q4_K_M, IQ2_XXS (with an imatrix from
`dq analyze`) and a mixed recipe (attention Q8_0, FFN IQ2_XXS, token_embd Q6_K). Reports seconds and
MB/s of BF16 input, and checks that the two files hold identical tensor bytes.

    python bench/quantize_speed.py [--model smollm2-135m] [--repeat 2]
Prints a table and writes bench/results/quantize_speed.json.

On a GPU machine, ``--device cuda`` adds dq's kernel path (``dq quantize --device cuda``) in the same run,
and ``--no-cpu`` leaves dq's CPU path out; ``--model`` takes any HF directory (e.g. an 8B-shaped model from
``bench/analyze_gpu.py shaped``) and ``--imatrix random`` a seeded random imatrix for models with random
weights (the bytes must still be llama.cpp's):

    python bench/quantize_speed.py --model M --device cuda --no-cpu --imatrix random --repeat 1 \
        --recipes Q4_K_M Q2_K IQ2_XXS IQ1_S --out $OUT/quantize_speed_gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPES = {
    "Q4_K_M": ("Q4_K_M", []),
    "Q2_K": ("Q2_K", []),
    "IQ2_XXS": ("IQ2_XXS", []),
    "IQ1_S": ("IQ1_S", []),
    "mixed": ("IQ2_XXS", ["attn_=Q8_0", "ffn_=IQ2_XXS", "^token_embd\\.weight=Q6_K"]),
}
DEFAULT_RECIPES = ("Q4_K_M", "IQ2_XXS", "mixed")


def random_imatrix(src: Path, path: Path, seed: int = 0) -> Path:
    """A seeded imatrix (heavy-tailed positive channel weights) for every 2-D/3-D weight of ``src``."""
    from dq.quant.assign import read_source_tensors
    from dq.quant.imatrix import Imatrix, ImatrixEntry, write_imatrix

    rng = np.random.default_rng(seed)
    entries = {}
    for t in read_source_tensors(src):
        if len(t.shape) >= 2 and t.name.endswith("weight") and t.name != "token_embd.weight":
            n_mat = t.shape[0] if len(t.shape) == 3 else 1
            sums = (rng.random((n_mat, t.shape[-1])) ** 4 * 100 + 1).astype(np.float32)
            entries[t.name] = ImatrixEntry(sums, np.full(n_mat, 100.0, np.float32))
    return write_imatrix(path, Imatrix(entries, ("random",), 1, 100))


def _same_tensors(a: Path, b: Path) -> bool:
    from gguf import GGUFReader

    tb = {t.name: t for t in GGUFReader(b).tensors}
    for t in GGUFReader(a).tensors:
        u = tb[t.name]
        if t.tensor_type != u.tensor_type or not np.array_equal(np.asarray(t.data).view(np.uint8),
                                                               np.asarray(u.data).view(np.uint8)):
            return False
    return True


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--analysis", type=Path, default=None,
                    help="a dq analyze directory for the imatrix (default: made once with a small budget "
                         "under $DQ_CACHE/bench/analysis/MODEL-speed)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantize_speed.json"))
    ap.add_argument("--recipes", nargs="+", default=list(DEFAULT_RECIPES), choices=sorted(RECIPES))
    ap.add_argument("--device", default=None, help="also time dq's kernel path on this device (e.g. cuda)")
    ap.add_argument("--no-cpu", action="store_true", help="leave dq's CPU path out")
    ap.add_argument("--imatrix", default=None, help="'random': a seeded random imatrix instead of an analysis")
    ap.add_argument("--threads", type=int, default=None, help="libggml threads for dq's CPU path")
    args = ap.parse_args()

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.cache import cache_dir
    from dq.convert.source import source_gguf
    from dq.export.gguf_quantize import quantize_gguf
    from dq.models import resolve_model
    from dq.quant.assign import assign_preset, parse_tensor_type
    from dq.quant.gguf_header import read_gguf_header
    from dq.quant.imatrix import read_imatrix
    from dq.quant.llama_quantize import PRESETS, llama_quantize

    src = source_gguf(resolve_model(args.model))
    if args.imatrix == "random":
        im_path = random_imatrix(src, Path(tempfile.gettempdir()) / "dq-bench-random.imatrix.gguf")
    else:
        # not MODEL itself: bench/quality_vs_size.py keeps its full-budget analysis there
        args.analysis = args.analysis or cache_dir() / "bench" / "analysis" / f"{Path(args.model).name}-speed"
        if not (args.analysis / "imatrix.gguf").is_file():
            analyze(args.model, args.analysis, AnalyzeOptions(n_tokens=2048, super_weights=False, plots=False),
                    resume=True)
        im_path = args.analysis / "imatrix.gguf"
    imatrix = read_imatrix(im_path)
    mb = src.stat().st_size / 1e6
    paths = [("cpu", "cpu")] if not args.no_cpu else []
    if args.device:
        paths.append(("gpu", args.device))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label in args.recipes:
            preset, rules = RECIPES[label]
            overrides = [parse_tensor_type(r) for r in rules]
            ref = Path(tmp) / "ref.gguf"
            times: dict[str, list[float]] = {k: [] for k, _ in paths}
            t_ll = []
            row: dict = {"recipe": label, "input_mb": mb}
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                llama_quantize(src, ref, preset, overrides=overrides, imatrix=imatrix.flat_weights())
                t_ll.append(time.perf_counter() - t0)
                for key, device in paths:
                    ours = Path(tmp) / f"dq-{key}.gguf"
                    t0 = time.perf_counter()
                    header = read_gguf_header(src)  # as `dq quantize` does: one parse for preset and writer
                    a = assign_preset(header, preset, overrides, has_imatrix=True)
                    quantize_gguf(header, ours, a, imatrix=imatrix, imatrix_name=im_path.name,
                                  preset_ftype=PRESETS[preset], device=device, n_threads=args.threads)
                    times[key].append(time.perf_counter() - t0)
            row.update(llama_cpp_s=min(t_ll), llama_cpp_mb_s=mb / min(t_ll), llama_cpp_bytes=ref.stat().st_size)
            for key, _ in paths:
                ours = Path(tmp) / f"dq-{key}.gguf"
                name = "dq" if key == "cpu" else "dq_gpu"
                row.update({f"{name}_s": min(times[key]), f"{name}_mb_s": mb / min(times[key]),
                            f"{name}_bytes": ours.stat().st_size,
                            f"{name}_identical_tensors": _same_tensors(ours, ref)})
            rows.append(row)
            print(json.dumps(row), flush=True)
    gpu = ""
    if args.device:
        import torch

        gpu = f", GPU {torch.cuda.get_device_name()}" if str(args.device).startswith("cuda") else ""
    head = (f"model {Path(args.model).name}, {mb:.0f} MB BF16 input, {os.cpu_count()} CPU threads, "
            f"{platform.processor() or platform.machine()}{gpu}; best of {args.repeat}")
    cols = [("dq", "dq CPU"), ("dq_gpu", f"dq {args.device}")]
    cols = [(k, lab) for k, lab in cols if f"{k}_s" in rows[0]]
    lines = [head, "", "| recipe | llama.cpp s | llama.cpp MB/s | "
             + " | ".join(f"{lab} s | {lab} MB/s | speed-up vs llama.cpp | identical tensors" for _, lab in cols)
             + " |", "|---|---|---|" + "---|---|---|---|" * len(cols)]
    for r in rows:
        cells = [f"{r[k + '_s']:.2f} | {r[k + '_mb_s']:.1f} | {r['llama_cpp_s'] / r[k + '_s']:.2f}x | "
                 f"{r[k + '_identical_tensors']}" for k, _ in cols]
        lines.append(f"| {r['recipe']} | {r['llama_cpp_s']:.2f} | {r['llama_cpp_mb_s']:.1f} | " + " | ".join(cells) + " |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": Path(args.model).name, "cpus": os.cpu_count(), "device": args.device,
                                    "rows": rows}, indent=1))
    cmd = " ".join(["python bench/quantize_speed.py", *sys.argv[1:]])
    args.out.with_suffix(".md").write_text(
        f"# Quantization speed: dq vs llama.cpp's llama_model_quantize\n\n`{cmd}` (run alone; dq's time includes "
        f"resolving the preset)\n\n{text}\n")


if __name__ == "__main__":
    main()
