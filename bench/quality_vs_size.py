"""Quality vs size: llama.cpp's stock mixes and hand recipes against dq plans at the same byte budgets.

For each model: one `dq analyze` (its imatrix is used by every file: stock, recipe and dq alike); for each
stock preset llama.cpp's own ``llama_model_quantize`` writes the stock file, and each hand recipe of
``shared/models.md`` runs through the same call with its ``--tensor-type`` rules (the model's recipes are in
:data:`RECIPES`); dq plans at a budget equal to each of those files' sizes and writes its file. All are
compared with the BF16 GGUF (the base) on held-out Wikipedia (disjoint from the calibration text) by
llama.cpp: mean KLD, p99.9 KLD, same-top-token rate, perplexity ratio.

    python bench/quality_vs_size.py --models qwen2.5-coder-1.5b --chunks 16
    python bench/quality_vs_size.py --models qwen2.5-coder-1.5b --chunks 16 --device cuda   # all on one GPU

With ``--device cuda`` the analysis, every file's quantization and the KLD pass run on the GPU: stock mixes and
recipes through dq's port of llama.cpp's preset rules and its kernels (the same tensors as llama-quantize), and
KLD by the torch backend against the Hugging Face model the BF16 GGUF was converted from (``dq eval --device
cuda``; bench/results/eval_gpu*.md compares it with llama.cpp's KLD). Rows carry the device they were measured on.
Prints a table and writes ``bench/results/quality_vs_size_<model>.{json,md,png}``.

Resumable: each measured row is kept under ``<work>/rows/`` keyed by the file's name, size and mtime and the
KLD settings, and a dq file whose saved plan assigns the same types is not written again, so a rerun after
an interruption measures only what is missing. ``--carry-over`` re-measures only the budgets named by
``--presets``/``--recipes`` and keeps the other rows of the committed JSON, marked in the table; a kept dq
row counts only if re-planning its budget now gives the same plan (the fingerprint of its types,
``plan_sha``); otherwise it is marked stale and gets no verdict, so a planner change cannot hide behind an
old row. Every file also gets the damage model's prediction (the sum
of the analysis's per-tensor ``kld`` at the file's types), stock and recipe files included.
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

PRESETS = ["Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_XXS", "IQ1_M", "IQ1_S"]
# Targets of the planner issue: dq <= 0.5x the stock mix's mean KLD from IQ1_S to Q3_K_M, <= 0.8x a hand
# recipe at its size, same-top-token >= 55% at the IQ1_S size.
STOCK_TARGET = {"Q3_K_M": 0.5, "Q2_K": 0.5, "IQ2_XXS": 0.5, "IQ1_M": 0.5, "IQ1_S": 0.5}
RECIPE_TARGET = 0.8

# shared/models.md: llama-quantize --tensor-type rules (first match wins) and the base ftype.
_DYN_A = [("^output\\.weight", "Q4_K"), ("^token_embd\\.weight", "Q2_K"), ("attn_v", "Q6_K"), ("attn_k", "Q4_K"),
          ("attn_q", "IQ2_XXS"), ("attn_output", "IQ3_XXS"), ("blk\\.(0|1|2)\\.ffn_down", "Q4_K"),
          ("blk\\.(25|26|27)\\.ffn_down", "IQ3_XXS"), ("ffn_down", "IQ2_XXS"), ("ffn_(gate|up)", "IQ2_XXS")]
_DYN_E = [("^output\\.weight", "Q3_K"), ("^token_embd\\.weight", "Q2_K"), ("attn_v", "Q6_K"), ("attn_k", "Q4_K"),
          ("attn_q", "IQ3_XXS"), ("attn_output", "IQ3_XXS"), ("blk\\.(0|1|2)\\.ffn_down", "Q4_K"),
          ("blk\\.(25|26|27)\\.ffn_down", "IQ3_XXS"), ("ffn_down", "IQ2_S"), ("ffn_(gate|up)", "IQ2_XXS")]
_DYN_C = [("^output\\.weight", "Q5_K"), ("^token_embd\\.weight", "Q2_K"), ("attn_v", "Q6_K"), ("attn_k", "Q4_K"),
          ("attn_q", "IQ3_XXS"), ("attn_output", "IQ3_XXS"), ("blk\\.(0|1|2)\\.ffn_down", "Q4_K"),
          ("ffn_down", "IQ3_XXS"), ("ffn_(gate|up)", "IQ3_XXS")]
_DYN_D = [("^output\\.weight", "Q4_K"), ("^token_embd\\.weight", "Q2_K"), ("attn_v", "Q6_K"), ("attn_k", "Q4_K"),
          ("attn_q", "IQ2_XXS"), ("attn_output", "IQ3_XXS"), ("blk\\.(0|1|2)\\.ffn_down", "Q4_K"),
          ("blk\\.(25|26|27)\\.ffn_down", "IQ3_XXS"), ("ffn_down", "IQ1_M"), ("ffn_(gate|up)", "IQ1_M")]
RECIPES: dict[str, dict[str, tuple[str, list[tuple[str, str]]]]] = {
    "qwen2.5-coder-1.5b": {"dynA": ("IQ2_XXS", _DYN_A), "dynE": ("IQ2_XXS", _DYN_E), "dynC": ("Q2_K", _DYN_C),
                           "dynD": ("IQ1_M", _DYN_D)},
}


def _row_key(path: Path, cfg) -> str:
    import hashlib

    st = path.stat()
    backend = "" if cfg.device == "cpu" else f"|{cfg.device}"  # a row measured by llama.cpp keeps its old key
    return hashlib.sha256(f"{path.name}|{st.st_size}|{st.st_mtime_ns}|{cfg.ctx}|{cfg.chunks}{backend}".encode()
                          ).hexdigest()[:20]


def _kld_row(model: str, label: str, kind: str, budget: str, path: Path, base: Path, cfg, n_weights: int,
             rows_dir: Path, plan=None, plan_s=None) -> dict:
    from dq.evals.kld import run_kld

    kept = rows_dir / f"{_row_key(path, cfg)}.json"
    if kept.is_file():
        row = json.loads(kept.read_text())
        row.update(file=label, plan_seconds=plan_s if plan_s is not None else row.get("plan_seconds"))
        logging.info("%s %-20s reusing the row measured before (%s)", model, label, kept.name)
        return row
    r = run_kld(path, base, cfg)
    size = path.stat().st_size
    row = {"model": model, "file": label, "kind": kind, "budget": budget, "bytes": size,
           "bpw": 8 * size / n_weights, "kld_mean": r.kld_mean, "kld_mean_stderr": r.kld_mean_stderr,
           "kld_p99": r.kld_p99, "kld_p999": r.kld_p999, "same_top": r.same_top, "same_top_stderr": r.same_top_stderr,
           "ppl_ratio": r.ppl_ratio, "predicted_kld": plan.predicted_damage if plan else None, "plan_seconds": plan_s,
           "device": cfg.device}
    logging.info("%s %-20s %13s bytes  KLD %.4f  p99.9 %.3f  same-top %.3f  ppl x%.3f", model, label, f"{size:,}",
                 r.kld_mean, r.kld_p999, r.same_top, r.ppl_ratio)
    rows_dir.mkdir(parents=True, exist_ok=True)
    tmp = kept.with_suffix(".tmp")
    tmp.write_text(json.dumps(row))
    tmp.replace(kept)
    return row


def predicted_for_file(dm, path: Path) -> float | None:
    """The damage model's prediction for any GGUF (stock, recipe, dq): the sum of the analysis's per-tensor
    ``kld`` at the file's types; None if a type of the file is not among the analysed candidates."""
    from gguf import GGMLQuantizationType

    from dq.quant.formats import QuantFormat
    from dq.quant.gguf_header import read_gguf_header

    total = 0.0
    for t in read_gguf_header(path).tensors:
        name = GGMLQuantizationType(t.ggml_type).name
        if name in ("F32", "F16", "BF16") or t.name not in dm.kld:
            continue
        d = dm.damage(t.name, QuantFormat(name))
        if d is None:
            return None
        total += d
    return total


def _same_plan(saved: Path, plan) -> bool:
    from dq.plan.artifact import QuantPlan

    if not saved.is_file():
        return False
    return QuantPlan.load(saved).explicit_types() == plan.explicit_types()


def _reference_file(base: Path, path: Path, preset: str, rules, inputs, device: str) -> None:
    """A stock or recipe file: llama.cpp's ``llama_model_quantize`` on the CPU; on a GPU, the same preset rules
    through dq (:func:`dq.quant.assign.assign_preset`, llama.cpp's per-tensor choices ported and tested against
    its dry run) and dq's kernels, whose bytes are llama.cpp's (tests/export/test_quantize_tiny.py)."""
    from dq.export.gguf_quantize import quantize_gguf
    from dq.quant.assign import assign_preset
    from dq.quant.formats import QuantFormat
    from dq.quant.llama_quantize import PRESETS, llama_quantize

    if device == "cpu":
        llama_quantize(base, path, preset, imatrix=inputs.imatrix.flat_weights(), overrides=rules or None)
        return
    overrides = [(rx, QuantFormat(t)) for rx, t in rules or ()]
    a = assign_preset(base, preset, overrides, has_imatrix=True)
    quantize_gguf(base, path, a, imatrix=inputs.imatrix, imatrix_name=inputs.imatrix_path.name,
                  preset_ftype=PRESETS[preset], device=device)


def run_model(name: str, work: Path, presets: list[str], recipes: list[str], chunks: int, ctx: int,
              device: str = "cpu") -> list[dict]:
    import math

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.evals.kld import KLDConfig
    from dq.export.gguf_quantize import quantize_gguf
    from dq.export.tensor_cache import TensorCache
    from dq.plan.planner import load_plan_inputs, make_plan
    from dq.quant.assign import assign_types, read_source_tensors

    adir = work / "analysis" / name
    t0 = time.time()
    if not (adir / "analysis.json").is_file():
        analyze(name, adir, AnalyzeOptions(device=device), resume=True)
    inputs = load_plan_inputs(adir)
    logging.info("%s: analysis ready (%.0f s)", name, time.time() - t0)
    cfg = KLDConfig(ctx=ctx, chunks=chunks, device=device)
    base = inputs.source_gguf
    # llama.cpp (CPU) compares with the BF16 GGUF; the torch backend (GPU) builds each file in the transformers
    # model of the Hugging Face directory that GGUF was converted from
    kld_base = base if device == "cpu" else inputs.model_dir
    sources = read_source_tensors(base)
    n_weights = sum(math.prod(s.shape) for s in sources)
    cache = TensorCache(work / "tensor-cache" / name)
    gdir = work / "gguf"
    gdir.mkdir(parents=True, exist_ok=True)
    refs: list[tuple[str, str, str, Path]] = []  # (label, kind, budget name, path)
    for preset in presets:
        path = gdir / f"{name}-{preset}.gguf"
        if not path.is_file():
            _reference_file(base, path, preset, None, inputs, device)
        refs.append((f"stock {preset}", "stock", preset, path))
    for rname in recipes:
        ftype, rules = RECIPES[name][rname]
        path = gdir / f"{name}-{rname}.gguf"
        if not path.is_file():
            _reference_file(base, path, ftype, rules, inputs, device)
        refs.append((f"recipe {rname}", "recipe", rname, path))
    rows = []
    rows_dir = work / "rows" / name
    for label, kind, budget, path in refs:
        rows.append(_kld_row(name, label, kind, budget, path, kld_base, cfg, n_weights, rows_dir))
        rows[-1]["predicted_kld"] = predicted_for_file(inputs.damage, path)
        t1 = time.time()
        plan = make_plan(inputs, path.stat().st_size)
        plan_s = time.time() - t1
        ours = gdir / f"{name}-dq-at-{budget}.gguf"
        saved = ours.with_suffix(".plan.yaml")
        if not (ours.is_file() and _same_plan(saved, plan)):
            quantize_gguf(base, ours, assign_types(sources, explicit=plan.explicit_types()), imatrix=inputs.imatrix,
                          imatrix_name=inputs.imatrix_path.name, tensor_cache=cache, device=device)
            plan.save(saved)
        rows.append(_kld_row(name, f"dq @ {budget}", "dq", budget, ours, kld_base, cfg, n_weights, rows_dir, plan,
                             plan_s))
        rows[-1]["plan_sha"] = plan_sha(plan)
    return rows


_CARRIED_MARK = {"reference": " (c)", "same plan": " (c)", "stale": " (s)"}


def plan_sha(plan) -> str:
    """A fingerprint of a plan's types: equal fingerprints, byte-identical files."""
    import hashlib

    types = sorted((n, f.value) for n, f in plan.explicit_types().items())
    return hashlib.sha256(json.dumps(types).encode()).hexdigest()[:16]


def carry_over(rows: list[dict], old_json: Path, adir: Path) -> list[dict]:
    """``rows`` plus the rows of ``old_json`` for budgets not in ``rows``, in the old order.

    A carried dq row is marked ``carried: "same plan"`` where re-planning its budget now gives the plan it
    measured (equal ``plan_sha``), else ``carried: "stale"``: it measured another plan (an older planner or
    analysis), and its verdict says so instead of a ratio."""
    from dq.plan.planner import load_plan_inputs, make_plan

    done = {r["budget"] for r in rows}
    everything = json.loads(old_json.read_text())["rows"]
    old = [r for r in everything if r["budget"] not in done]
    inputs = load_plan_inputs(adir)
    carried = []
    for r in old:
        mark = "reference"
        if r["kind"] == "dq":
            ref = next(x for x in old if x["budget"] == r["budget"] and x["kind"] != "dq")
            mark = "same plan" if r.get("plan_sha") == plan_sha(make_plan(inputs, ref["bytes"])) else "stale"
        carried.append({**r, "carried": mark})
    order = [r["budget"] for r in everything]
    return sorted(rows + carried, key=lambda r: (order.index(r["budget"]) if r["budget"] in order else len(order),
                                                  r["kind"] == "dq"))


def verdicts(rows: list[dict]) -> list[dict]:
    """dq's ratio to the file of the same budget, and whether the issue's target is met."""
    out = []
    for r in rows:
        if r["kind"] != "dq":
            continue
        ref = next(x for x in rows if x["model"] == r["model"] and x["budget"] == r["budget"] and x["kind"] != "dq")
        ratio = r["kld_mean"] / ref["kld_mean"]
        target = STOCK_TARGET.get(r["budget"]) if ref["kind"] == "stock" else RECIPE_TARGET
        ok = None if target is None else (ratio <= target and r["bytes"] <= ref["bytes"])
        if r.get("carried") == "stale":
            ok = "stale"
        extra = ""
        if r["budget"] == "IQ1_S":
            extra = f"same-top {r['same_top']:.1%} (target >= 55%)"
        out.append({"model": r["model"], "budget": r["budget"], "vs": ref["file"], "kld_ratio": ratio,
                    "target": target, "met": ok, "note": extra})
    return out


def table(rows: list[dict], ver: list[dict]) -> str:
    lines = ["| model | file | bytes | bits/weight | mean KLD (± s.e.) | predicted KLD | p99.9 KLD | same top | "
             "PPL ratio |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pred = "-" if r.get("predicted_kld") is None else f"{r['predicted_kld']:.4g}"
        lines.append(f"| {r['model']} | {r['file']}{_CARRIED_MARK.get(r.get('carried'), '')} | {r['bytes']:,} | {r['bpw']:.3f} | {r['kld_mean']:.4f} ± "
                     f"{r['kld_mean_stderr']:.4f} | {pred} | {r['kld_p999']:.3f} | {100 * r['same_top']:.1f}% | "
                     f"{r['ppl_ratio']:.3f} |")
    lines += ["", "| model | budget | dq KLD / reference KLD | reference | target | met |", "|---|---|---|---|---|---|"]
    for v in ver:
        t = "-" if v["target"] is None else f"<= {v['target']}x"
        met = {None: "-", True: "yes", False: "**MISSED**", "stale": "not re-measured (s)"}[v["met"]]
        lines.append(f"| {v['model']} | {v['budget']} | {v['kld_ratio']:.2f}x | {v['vs']} | {t} | {met} "
                     f"{v['note']} |")
    return "\n".join(lines)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(len(models), 3, figsize=(16, 4.6 * len(models)), squeeze=False)
    for i, m in enumerate(models):
        for j, (key, label) in enumerate((("kld_mean", "mean KLD"), ("same_top", "same top token"),
                                          ("ppl_ratio", "PPL ratio"))):
            ax = axes[i][j]
            for kind, marker, ls in (("stock", "o", "-"), ("recipe", "D", ""), ("dq", "s", "-")):
                pts = sorted((r["bytes"] / 1e6, r[key], r["budget"]) for r in rows
                             if r["model"] == m and r["kind"] == kind)
                if not pts:
                    continue
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, linestyle=ls or "none",
                        label={"stock": "llama.cpp stock mix", "recipe": "hand recipe", "dq": "dq plan"}[kind])
                for x, y, p in pts:
                    ax.annotate(p, (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
            stale = [(r["bytes"] / 1e6, r[key]) for r in rows
                     if r["model"] == m and r.get("carried") == "stale"]
            if stale:  # carried rows of an older plan: ringed, so a reader does not take them for measured ones
                ax.scatter([s[0] for s in stale], [s[1] for s in stale], s=140, facecolors="none",
                           edgecolors="red", label="stale (older plan, not re-measured)")
            if key in ("kld_mean", "ppl_ratio"):
                ax.set_yscale("log")
            ax.set_xlabel("file size (MB)")
            ax.set_title(f"{m}: {label}")
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    from dq.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--presets", nargs="*", default=PRESETS, help="stock budgets to run (none: recipes only)")
    ap.add_argument("--recipes", nargs="*", default=None, help="hand recipes to run (default: all of the model's)")
    ap.add_argument("--chunks", type=int, default=16)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--work", type=Path, default=None, help="analyses, GGUFs, tensor cache (default $DQ_CACHE/bench)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    ap.add_argument("--device", default="cpu",
                    help="cuda: analysis, quantization (dq's kernels, llama.cpp's bytes) and KLD (the torch backend) "
                         "on a GPU; every row of the table is then measured there")
    ap.add_argument("--carry-over", action="store_true",
                    help="keep the committed rows of budgets not run now (dq rows only if their plan is unchanged)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work or cache_dir() / "bench"
    args.results.mkdir(parents=True, exist_ok=True)
    for m in args.models:
        recipes = list(RECIPES.get(m, {})) if args.recipes is None else args.recipes
        rows = run_model(m, work, args.presets, recipes, args.chunks, args.ctx, args.device)
        stem = f"quality_vs_size_{m}"  # model names hold dots (qwen2.5-coder-1.5b): no with_suffix
        if args.carry_over:
            rows = carry_over(rows, args.results / f"{stem}.json", work / "analysis" / m)
        ver = verdicts(rows)
        text = table(rows, ver)
        print(text)
        (args.results / f"{stem}.json").write_text(json.dumps({"rows": rows, "verdicts": ver}, indent=1))
        cmd = (f"python bench/quality_vs_size.py --models {m} --chunks {args.chunks}"
               + (f" --presets {' '.join(args.presets)}" if args.presets != PRESETS else "")
               + (f" --recipes {' '.join(recipes)}" if recipes != list(RECIPES.get(m, {})) else "")
               + (f" --device {args.device}" if args.device != "cpu" else "")
               + (" --carry-over" if args.carry_over else ""))
        if any(r.get("carried") for r in rows):
            text += ("\n\nCarried over from the previous run of this table (same analysis settings and KLD text), "
                     "not re-measured: (c) a reference file, or a dq row whose budget re-planned now gives the plan it "
                     "measured; (s) a dq row of another plan (an older planner or analysis): re-planning its budget "
                     "now gives different types, so the row says nothing about the current planner there.")
        (args.results / f"{stem}.md").write_text(f"# Quality vs size: {m}\n\n`{cmd}`\n\n{text}\n")
        plot(rows, args.results / f"{stem}.png")


if __name__ == "__main__":
    main()
