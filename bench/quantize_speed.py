"""Quantization speed: dq's writer vs llama.cpp's `llama_model_quantize`, same settings, one run.

For SmolLM2-135M (BF16 GGUF from llama.cpp's converter): Q4_K_M, IQ2_XXS (with an imatrix from
`dq analyze`) and a mixed recipe (attention Q8_0, FFN IQ2_XXS, token_embd Q6_K). Reports seconds and
MB/s of BF16 input, and checks that the two files hold identical tensor bytes.

    python bench/quantize_speed.py [--model smollm2-135m] [--repeat 2]
Prints a table and writes bench/results/quantize_speed.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np

RECIPES = {
    "Q4_K_M": ("Q4_K_M", []),
    "IQ2_XXS": ("IQ2_XXS", []),
    "mixed": ("IQ2_XXS", ["attn_=Q8_0", "ffn_=IQ2_XXS", "^token_embd\\.weight=Q6_K"]),
}


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
                         "under $DQ_CACHE/bench/analysis/MODEL)")
    ap.add_argument("--out", type=Path, default=Path("bench/results/quantize_speed.json"))
    args = ap.parse_args()

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.cache import cache_dir
    from dq.convert.source import source_gguf
    from dq.export.gguf_quantize import quantize_gguf
    from dq.models import resolve_model
    from dq.quant.assign import assign_preset, parse_tensor_type
    from dq.quant.imatrix import read_imatrix
    from dq.quant.llama_quantize import PRESETS, llama_quantize

    src = source_gguf(resolve_model(args.model))
    args.analysis = args.analysis or cache_dir() / "bench" / "analysis" / args.model
    if not (args.analysis / "imatrix.gguf").is_file():
        analyze(args.model, args.analysis, AnalyzeOptions(n_tokens=2048, super_weights=False, plots=False), resume=True)
    im_path = args.analysis / "imatrix.gguf"
    imatrix = read_imatrix(im_path)
    mb = src.stat().st_size / 1e6
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for label, (preset, rules) in RECIPES.items():
            overrides = [parse_tensor_type(r) for r in rules]
            ours, ref = Path(tmp) / "dq.gguf", Path(tmp) / "ref.gguf"
            t_dq, t_ll = [], []
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                a = assign_preset(src, preset, overrides)
                quantize_gguf(src, ours, a, imatrix=imatrix, imatrix_name=im_path.name, preset_ftype=PRESETS[preset])
                t_dq.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                llama_quantize(src, ref, preset, overrides=overrides, imatrix=imatrix.flat_weights())
                t_ll.append(time.perf_counter() - t0)
            rows.append({
                "recipe": label, "input_mb": mb, "dq_s": min(t_dq), "llama_cpp_s": min(t_ll),
                "dq_mb_s": mb / min(t_dq), "llama_cpp_mb_s": mb / min(t_ll),
                "dq_bytes": ours.stat().st_size, "llama_cpp_bytes": ref.stat().st_size,
                "identical_tensors": _same_tensors(ours, ref),
            })
    head = (f"model {args.model}, {mb:.0f} MB BF16 input, {os.cpu_count()} CPU threads, "
            f"{platform.processor() or platform.machine()}; best of {args.repeat}")
    lines = [head, "", "| recipe | dq s | dq MB/s | llama.cpp s | llama.cpp MB/s | dq / llama.cpp time | identical tensors |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['recipe']} | {r['dq_s']:.2f} | {r['dq_mb_s']:.1f} | {r['llama_cpp_s']:.2f} | "
                     f"{r['llama_cpp_mb_s']:.1f} | {r['dq_s'] / r['llama_cpp_s']:.2f}x | {r['identical_tensors']} |")
    text = "\n".join(lines)
    print(text)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "cpus": os.cpu_count(), "rows": rows}, indent=1))
    args.out.with_suffix(".md").write_text(
        f"# Quantization speed: dq vs llama.cpp's llama_model_quantize\n\n`python bench/quantize_speed.py "
        f"--model {args.model} --repeat {args.repeat}` (run alone; dq's time includes resolving the preset)\n\n"
        f"{text}\n")


if __name__ == "__main__":
    main()
