"""Quality vs size: llama.cpp's stock mixes against dq auto plans at the same byte budget.

For each model: one `dq analyze` (its imatrix is used by every file, stock and dq alike); for each stock
preset, llama.cpp's own `llama_model_quantize` writes the stock file; dq plans at a budget equal to that
file's size and writes its file; both are compared with the BF16 GGUF (the base) on held-out Wikipedia
text (disjoint from the calibration text): mean KLD, same-top-token rate, perplexity ratio.

    python bench/quality_vs_size.py --models smollm2-135m gemma3-270m --chunks 16
Prints a table, writes bench/results/quality_vs_size.json and a PNG plot.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

PRESETS = ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_S"]


def run_model(name: str, out: Path, presets: list[str], chunks: int, ctx: int, analyze_tokens: int,
              refine: tuple[str, ...] = ()) -> list[dict]:
    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.evals.kld import KLDConfig, run_kld
    from dq.export.gguf_quantize import quantize_gguf
    from dq.plan.planner import load_plan_inputs, make_plan
    from dq.quant.assign import assign_types, read_source_tensors
    from dq.quant.llama_quantize import llama_quantize

    adir = out / "analysis" / name
    t0 = time.time()
    if not (adir / "analysis.json").is_file():
        analyze(name, adir, AnalyzeOptions(n_tokens=analyze_tokens), resume=True)
    inputs = load_plan_inputs(adir)
    logging.info("%s: analysis ready (%.0f s)", name, time.time() - t0)
    cfg = KLDConfig(ctx=ctx, chunks=chunks)
    base = inputs.source_gguf
    rows = []
    for preset in presets:
        stock = out / "gguf" / f"{name}-{preset}.gguf"
        stock.parent.mkdir(parents=True, exist_ok=True)
        if not stock.is_file():
            llama_quantize(base, stock, preset, imatrix=inputs.imatrix.flat_weights())
        size = stock.stat().st_size
        files = [("stock " + preset, stock, None, None)]
        for refined in (False, True) if preset in refine else (False,):
            t1 = time.time()
            plan = make_plan(inputs, size, refine=refined)
            plan_s = time.time() - t1
            ours = out / "gguf" / f"{name}-dq{'-refine' if refined else ''}-at-{preset}.gguf"
            a = assign_types(read_source_tensors(base), explicit=plan.explicit_types())
            quantize_gguf(base, ours, a, imatrix=inputs.imatrix, imatrix_name=inputs.imatrix_path.name)
            plan.save(ours.with_suffix(".plan.yaml"))
            files.append((("dq+refine @ " if refined else "dq @ ") + preset, ours, plan, plan_s))
        for label, path, plan, plan_s in files:
            r = run_kld(path, base, cfg)
            rows.append({
                "model": name, "file": label, "preset": preset, "bytes": path.stat().st_size,
                "kld_mean": r.kld_mean, "kld_p99": r.kld_p99, "same_top": r.same_top, "ppl_ratio": r.ppl_ratio,
                "predicted_damage": plan.predicted_damage if plan else None,
                "plan_seconds": plan_s,
            })
            logging.info("%s %-16s %12s bytes  KLD %.4f  same-top %.3f  ppl x%.3f", name, label,
                         f"{rows[-1]['bytes']:,}", r.kld_mean, r.same_top, r.ppl_ratio)
    return rows


def print_table(rows: list[dict]) -> None:
    print(f"{'model':<14} {'file':<20} {'bytes':>13} {'mean KLD':>9} {'p99 KLD':>8} {'same top':>9} {'PPL ratio':>9} {'dq/stock KLD':>12}")
    stock = {(r["model"], r["preset"]): r for r in rows if r["file"].startswith("stock")}
    for r in rows:
        ratio = ""
        if r["file"].startswith("dq"):
            s = stock[(r["model"], r["preset"])]
            ratio = f"{r['kld_mean'] / s['kld_mean']:.2f}" + (" ok" if r["kld_mean"] <= 0.75 * s["kld_mean"] and r["bytes"] <= s["bytes"] else " MISS")
        print(f"{r['model']:<14} {r['file']:<20} {r['bytes']:>13,} {r['kld_mean']:>9.4f} {r['kld_p99']:>8.3f} "
              f"{100 * r['same_top']:>8.1f}% {r['ppl_ratio']:>9.3f} {ratio:>12}")


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 3, figsize=(15, 4.2 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, (key, label) in enumerate((("kld_mean", "mean KLD"), ("same_top", "same top token"),
                                          ("ppl_ratio", "PPL ratio"))):
            ax = axes[i][j]
            for kind, marker in (("stock", "o"), ("dq @", "s"), ("dq+refine", "^")):
                pts = sorted((r["bytes"] / 1e6, r[key], r["preset"]) for r in rows
                             if r["model"] == m and r["file"].startswith(kind))
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, label=kind)
                for x, y, p in pts:
                    ax.annotate(p, (x, y), fontsize=7)
            if key == "kld_mean":
                ax.set_yscale("log")
            ax.set_xlabel("file size (MB)")
            ax.set_title(f"{m}: {label}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--presets", nargs="+", default=PRESETS)
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--analyze-tokens", type=int, default=8192)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    ap.add_argument("--refine", nargs="*", default=[], metavar="PRESET",
                    help="also plan these budgets with --refine (measured-KLD correction) and add a row")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.out.mkdir(parents=True, exist_ok=True)
    rows = []
    for m in args.models:
        rows += run_model(m, args.out, args.presets, args.chunks, args.ctx, args.analyze_tokens, tuple(args.refine))
        (args.out / "quality_vs_size.json").write_text(json.dumps(rows, indent=1))
    print_table(rows)
    plot(rows, args.out / "quality_vs_size.png")


if __name__ == "__main__":
    main()
