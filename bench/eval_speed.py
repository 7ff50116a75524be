"""Speed of ``dq eval`` on SmolLM2-135M: KLD-pass tokens/s and seconds per 5-shot MMLU question, GGUF
(dq's in-process llama.cpp backend) vs HF (transformers / lm-eval's HF backend); optionally the agreement
of dq's KLD with llama.cpp's own ``llama-perplexity --kl-divergence`` on the same text.

Usage:
    python bench/eval_speed.py [--chunks 4] [--mmlu-limit 2] [--threads N]
        [--llama-perplexity /path/to/llama-perplexity] [--lp-chunks 8]

Prints a table and writes bench/results/eval_speed-<UTC time>.json. Build llama-perplexity once from the
llama-cpp-python 0.3.36 sdist (vendor/llama.cpp): cmake -B build -DLLAMA_CURL=OFF -DGGML_NATIVE=ON &&
cmake --build build --target llama-perplexity -j2.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def kld_speed(base_dir: Path, bf16_gguf: Path, q4: Path, chunks: int, threads: int | None) -> list[dict]:
    from dq.data import heldout_text
    from dq.evals.backends import open_logits_model
    from dq.evals.kld import KLDConfig, base_pass, eval_tokens, quant_pass

    cfg = KLDConfig(ctx=512, chunks=chunks, n_threads=threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        with open_logits_model(base_dir, n_ctx=cfg.ctx, n_threads=threads) as b:
            _, ids = eval_tokens(b, heldout_text(), cfg)
            t0 = time.perf_counter()
            cache = base_pass(b, ids, cfg, cache_root=Path(tmp))
            dt = time.perf_counter() - t0
            rows.append({"pass": "base (cached top-k)", "backend": "hf float32", "model": "smollm2 bf16",
                         "seconds": dt, "tokens_per_s": ids.size / dt})
            t0 = time.perf_counter()
            quant_pass(b, ids, cache, cfg)
            dt = time.perf_counter() - t0
            rows.append({"pass": "quant (KLD)", "backend": "hf float32", "model": "smollm2 bf16",
                         "seconds": dt, "tokens_per_s": ids.size / dt})
        for name, path in (("smollm2 BF16 gguf", bf16_gguf), ("smollm2 Q4_K_M gguf", q4)):
            with open_logits_model(path, n_ctx=cfg.ctx, n_threads=threads) as q:
                q.logits(ids[0].tolist()[:16])  # warm-up
                t0 = time.perf_counter()
                quant_pass(q, ids, cache, cfg)
                dt = time.perf_counter() - t0
            rows.append({"pass": "quant (KLD)", "backend": "llama.cpp", "model": name, "seconds": dt,
                         "tokens_per_s": ids.size / dt})
    return rows


def mmlu_speed(base_dir: Path, bf16_gguf: Path, q4: Path, limit: int, threads: int | None) -> list[dict]:
    from dq.evals.lmeval import MMLU_SUBJECTS_QUICK, LMEvalConfig, run_lmeval

    cfg = LMEvalConfig(limit=limit, mmlu_subjects=MMLU_SUBJECTS_QUICK, n_threads=threads)
    rows = []
    for name, path, backend in (("smollm2 bf16", base_dir, "lm-eval HF float32"),
                                ("smollm2 BF16 gguf", bf16_gguf, "dq llama.cpp"),
                                ("smollm2 Q4_K_M gguf", q4, "dq llama.cpp")):
        t0 = time.perf_counter()
        run = run_lmeval(path, cfg, cache=False)["mmlu"]
        dt = time.perf_counter() - t0
        rows.append({"backend": backend, "model": name, "questions": run.n, "seconds": dt,
                     "s_per_question": dt / run.n, "acc": run.acc})
    return rows


_LP_KEYS = {
    "ppl_quant": r"Mean PPL\(Q\)\s*:\s*([\d.]+)", "ppl_base": r"Mean PPL\(base\)\s*:\s*([\d.]+)",
    "ppl_ratio": r"Mean PPL\(Q\)/PPL\(base\)\s*:\s*([\d.]+)", "kld_mean": r"Mean\s+KLD:\s*([\d.]+)",
    "kld_max": r"Maximum KLD:\s*([\d.]+)", "kld_p999": r"99\.9%\s+KLD:\s*([\d.]+)",
    "kld_p99": r"99\.0%\s+KLD:\s*([\d.]+)", "kld_median": r"Median\s+KLD:\s*([\d.]+)",
    "same_top": r"Same top p:\s*([\d.]+)", "delta_p_mean": r"Mean\s+Δp:\s*(-?[\d.]+)",
}


def llama_perplexity_agreement(lp: Path, bf16_gguf: Path, quants: dict[str, Path], chunks: int,
                               threads: int | None) -> list[dict]:
    """dq eval QUANT --base BF16.gguf vs llama-perplexity --kl-divergence on the same text and settings."""
    from dq.data import heldout_text
    from dq.evals.backends import open_logits_model
    from dq.evals.kld import KLDConfig, _token_prefix, run_kld

    cfg = KLDConfig(ctx=512, chunks=chunks, n_threads=threads)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        with open_logits_model(bf16_gguf, n_ctx=512, n_threads=threads) as b:
            prefix, _ = _token_prefix(b, heldout_text(), 512 * chunks)
        text = tmp / "wiki.txt"
        text.write_text(prefix)  # the exact text dq tokenizes
        th = ["-t", str(threads or os.cpu_count())]
        common = ["-c", "512", "--chunks", str(chunks), "-b", "512", "-f", str(text)] + th
        subprocess.run([str(lp), "-m", str(bf16_gguf), "--kl-divergence-base", str(tmp / "base.kld")] + common,
                       check=True, capture_output=True)
        for name, q in quants.items():
            out = subprocess.run([str(lp), "-m", str(q), "--kl-divergence-base", str(tmp / "base.kld"),
                                  "--kl-divergence"] + common, check=True, capture_output=True, text=True)
            log = out.stdout + out.stderr
            ref = {k: float(m.group(1)) for k, rx in _LP_KEYS.items() if (m := re.search(rx, log))}
            for k in ("same_top", "delta_p_mean"):
                if k in ref:
                    ref[k] /= 100.0
            ours = run_kld(q, bf16_gguf, cfg, cache_root=tmp).to_dict()
            for k, v in ref.items():
                rows.append({"quant": name, "metric": k, "llama_perplexity": v, "dq": ours[k],
                             "rel_diff": (ours[k] - v) / v if v else None})
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--mmlu-limit", type=int, default=2, help="questions per subject (5 subjects)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--llama-perplexity", type=Path, default=None)
    ap.add_argument("--lp-chunks", type=int, default=8)
    ap.add_argument("--skip-speed", action="store_true")
    args = ap.parse_args()

    from dq.convert.source import source_gguf
    from dq.evals.thresholds import build_quant
    from dq.models import materialize

    base_dir = materialize("smollm2-135m")
    bf16 = source_gguf(base_dir)
    q4 = build_quant(base_dir, "Q4_K_M")
    result: dict = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                                "threads": args.threads or os.environ.get("DQ_THREADS") or os.cpu_count()},
                    "model": "smollm2-135m"}
    if not args.skip_speed:
        result["kld"] = kld_speed(base_dir, bf16, q4, args.chunks, args.threads)
        result["mmlu"] = mmlu_speed(base_dir, bf16, q4, args.mmlu_limit, args.threads)
        print(f"KLD pass, {args.chunks} x 512 tokens")
        print(f"{'pass':<22} {'backend':<12} {'model':<22} {'s':>7} {'tok/s':>8}")
        for r in result["kld"]:
            print(f"{r['pass']:<22} {r['backend']:<12} {r['model']:<22} {r['seconds']:>7.1f} {r['tokens_per_s']:>8.1f}")
        print(f"\n5-shot MMLU, {args.mmlu_limit} questions x 5 subjects")
        print(f"{'backend':<20} {'model':<22} {'n':>3} {'s':>7} {'s/question':>11} {'acc':>6}")
        for r in result["mmlu"]:
            print(f"{r['backend']:<20} {r['model']:<22} {r['questions']:>3} {r['seconds']:>7.1f} "
                  f"{r['s_per_question']:>11.2f} {100 * r['acc']:>5.1f}%")
    if args.llama_perplexity:
        q2 = build_quant(base_dir, "Q2_K")
        rows = llama_perplexity_agreement(args.llama_perplexity, bf16, {"Q4_K_M": q4, "Q2_K": q2},
                                          args.lp_chunks, args.threads)
        result["llama_perplexity"] = {"chunks": args.lp_chunks, "ctx": 512, "base": "SmolLM2 BF16 GGUF",
                                      "rows": rows}
        print(f"\ndq eval vs llama-perplexity --kl-divergence ({args.lp_chunks} x 512 tokens, base BF16 GGUF)")
        print(f"{'quant':<8} {'metric':<14} {'llama-ppl':>11} {'dq':>11} {'rel diff':>9}")
        for r in rows:
            rd = "-" if r["rel_diff"] is None else f"{100 * r['rel_diff']:+.2f}%"
            print(f"{r['quant']:<8} {r['metric']:<14} {r['llama_perplexity']:>11.5g} {r['dq']:>11.5g} {rd:>9}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / f"eval_speed-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nwrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
