"""Benchmark `dq analyze`: wall time and peak RSS on SmolLM2-135M and Gemma-3-270M, full candidate list.

Each model runs in its own subprocess so ``ru_maxrss`` is that run's peak. The bound checked is

    peak RSS <= baseline + one block (float32) + activations + embedding/LM head (float32) + slack

where baseline is the RSS after importing torch/transformers and building the meta skeleton, activations
are the calibration hidden states in and out of a block (2 x tokens x d x 4 bytes) plus the kept inputs
for activation error, and slack is the stated constant (512 MiB: allocator, mmapped safetensors pages,
libggml buffers, logits chunks).

Usage: python bench/analyze.py [--models smollm2-135m gemma3-270m] [--tokens 8192]
Writes bench/results/analyze.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

SLACK = 512 * 2**20


def _child(model: str, out: str, tokens: int) -> dict:
    import logging

    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.analysis.loader import ModelSkeleton
    from dq.models import resolve_model

    model_dir = resolve_model(model)
    sk = ModelSkeleton.open(model_dir)
    baseline = _rss()
    block = sum(p.numel() for p in sk.module(sk.layer_prefix(0)).parameters()) * 4
    emb = sk.model.get_input_embeddings().weight.numel() * 4
    d = int(sk.text_config.hidden_size)
    inter = int(getattr(sk.text_config, "intermediate_size", 4 * d))
    del sk
    opts = AnalyzeOptions(n_tokens=tokens)
    acts = 2 * tokens * d * 4 + opts.act_tokens * (6 * d + inter) * 4
    t0 = time.time()
    a = analyze(model, out, opts)
    wall = time.time() - t0
    peak = _rss_peak()
    bound = baseline + block + acts + emb + SLACK
    return {
        "model": model, "tokens": a.n_tokens, "candidates": len(a.candidates), "tensors": len(a.tensors),
        "wall_s": round(wall, 1), "peak_rss_mib": round(peak / 2**20), "baseline_mib": round(baseline / 2**20),
        "block_mib": round(block / 2**20, 1), "activations_mib": round(acts / 2**20, 1),
        "embedding_mib": round(emb / 2**20, 1), "bound_mib": round(bound / 2**20), "within_bound": peak <= bound,
        "super_weights": [s.to_dict() for s in a.super_weights],
    }


def _rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


def _rss_peak() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m"])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(_child(args.child[0], args.child[1], args.tokens)))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.models:
        res = subprocess.run([sys.executable, __file__, "--tokens", str(args.tokens), "--child", m,
                              str(args.out / f"analyze-{m}")], capture_output=True, text=True)
        if res.returncode != 0:
            print(res.stderr[-3000:], file=sys.stderr)
            return res.returncode
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
    (args.out / "analyze.json").write_text(json.dumps(rows, indent=1))
    print(f"{'model':<14} {'tokens':>6} {'types':>5} {'wall s':>7} {'peak MiB':>8} {'base':>6} {'block':>6} "
          f"{'acts':>6} {'emb':>6} {'bound':>6} ok")
    for r in rows:
        print(f"{r['model']:<14} {r['tokens']:>6} {r['candidates']:>5} {r['wall_s']:>7} {r['peak_rss_mib']:>8} "
              f"{r['baseline_mib']:>6} {r['block_mib']:>6} {r['activations_mib']:>6} {r['embedding_mib']:>6} "
              f"{r['bound_mib']:>6} {r['within_bound']}")
        for s in r["super_weights"]:
            print(f"   super weight {s['tensor']}[{s['row']},{s['col']}] = {s['value']:+.3g}: "
                  f"ppl x{s['ablation_ppl_ratio']:.3f}, KLD {s['ablation_kld']:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
