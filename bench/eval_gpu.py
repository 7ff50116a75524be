"""``dq eval --device cuda`` against CPU llama.cpp on the same quantized files, on a GPU machine.

The GPU image has no Hub and no model packages, so the model is a random Llama built there from
transformers' config class (``dq.testing.tiny_llama``, 256-aligned widths, its LM head scaled so the
next-token distributions are peaked like a trained model's), converted by llama.cpp's converter, analysed
by ``dq analyze --device cuda`` (for the imatrix), and quantized by llama.cpp's presets through dq. Each file
is then evaluated twice against the same cached base pass: by the torch GGUF backend on the GPU (dq's kernels
dequantize every tensor into transformers) and by llama.cpp on the machine's CPUs. Prints a table and writes
``eval_gpu.json`` / ``.md`` beside it.

    python bench/eval_gpu.py --out bench/results          # on the GPU machine (see bench/gpu_suite.sh for setup)
    python bench/eval_gpu.py --model smollm2-135m --presets Q2_K IQ2_XXS   # a packaged real model, if installed there

With ``--model`` the packaged model (its wheel carried to the GPU machine and installed there) replaces the
random one; the results go to ``eval_gpu_<model>.{md,json}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

PRESETS = ("Q4_K_M", "Q2_K", "IQ2_XXS")


def build(work: Path, hidden: int, layers: int, vocab: int, head_scale: float) -> Path:
    import torch
    from transformers import AutoModelForCausalLM

    from dq.testing import tiny_llama

    if (work / "model" / "config.json").is_file():
        return work / "model"
    d = tiny_llama(work / "model", hidden=hidden, intermediate=hidden * 11 // 4 // 256 * 256, layers=layers,
                   heads=hidden // 64, kv_heads=max(1, hidden // 256), vocab_size=vocab)
    m = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16)
    with torch.no_grad():
        m.lm_head.weight.mul_(head_scale)
    m.save_pretrained(d)
    return d


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dq-eval-gpu"))
    ap.add_argument("--hidden", type=int, default=1536)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--head-scale", type=float, default=8.0, help="LM head multiplier: logit std ~5, as trained")
    ap.add_argument("--model", default=None, help="a packaged model (e.g. smollm2-135m) instead of a random Llama")
    ap.add_argument("--presets", nargs="+", default=list(PRESETS))
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--device", default="cuda", help="where the torch backend runs (cpu: a smoke test)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    import torch

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.convert.source import source_gguf
    from dq.evals.kld import KLDConfig, run_kld
    from dq.models import resolve_model
    from dq.quant.imatrix import read_imatrix
    from dq.quant.llama_quantize import llama_quantize

    args.work.mkdir(parents=True, exist_ok=True)
    if args.model:
        hf = resolve_model(args.model)
    else:
        hf = build(args.work, args.hidden, args.layers, args.vocab, args.head_scale)
    base = source_gguf(hf)
    if not (args.work / "analysis" / "analysis.json").is_file():
        analyze(hf, args.work / "analysis", AnalyzeOptions(device=args.device, plots=False, ablation_tokens=0))
    analyze_s = json.loads((args.work / "analysis" / "analysis.json").read_text())["extra"]["seconds"]
    weights = read_imatrix(args.work / "analysis" / "imatrix.gguf").flat_weights()
    cpu = KLDConfig(ctx=512, chunks=args.chunks)
    gpu = replace(cpu, device=args.device, gguf_backend="torch")
    rows = []
    for preset in args.presets:
        q = args.work / f"model-{preset}.gguf"
        llama_quantize(base, q, preset, imatrix=weights)
        t1 = time.time()
        g = run_kld(q, hf, gpu)  # the first run also computes the base pass (HF on the GPU), cached for both
        t2 = time.time()
        # llama.cpp's own BF16 GGUF as its base (the same tokenizer as the quant on any transformers build)
        c = run_kld(q, base if args.model else hf, cpu)
        t3 = time.time()
        rows.append({"preset": preset, "bytes": q.stat().st_size, "kld_gpu": g.kld_mean, "kld_cpu": c.kld_mean,
                     "kld_stderr_cpu": c.kld_mean_stderr, "same_top_gpu": g.same_top, "same_top_cpu": c.same_top,
                     "ratio": g.kld_mean / c.kld_mean, "seconds_gpu": round(t2 - t1, 1),
                     "seconds_cpu": round(t3 - t2, 1)})
    gpu_name = torch.cuda.get_device_name() if args.device == "cuda" else "CPU"
    what = (args.model if args.model else
            f"random Llama {args.hidden} wide, {args.layers} layers, vocab {args.vocab} (head x{args.head_scale})")
    head = (f"{what}; {args.chunks} x 512 tokens of held-out Wikipedia; {gpu_name}; llama.cpp on "
            f"{torch.get_num_threads()} CPU threads; dq analyze --device {args.device} {analyze_s:.0f} s")
    lines = [head, "", "| preset | bytes | KLD torch/GPU | KLD llama.cpp/CPU | ratio | same-top GPU | same-top CPU "
             "| s GPU | s CPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['preset']} | {r['bytes']:,} | {r['kld_gpu']:.5f} | {r['kld_cpu']:.5f} ± "
                     f"{r['kld_stderr_cpu']:.5f} | {r['ratio']:.3f} | {r['same_top_gpu']:.3f} | "
                     f"{r['same_top_cpu']:.3f} | {r['seconds_gpu']} | {r['seconds_cpu']} |")
    text = "\n".join(lines)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"eval_gpu_{args.model}" if args.model else "eval_gpu"
    (args.out / f"{stem}.md").write_text(text + "\n")
    (args.out / f"{stem}.json").write_text(json.dumps({"setup": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
