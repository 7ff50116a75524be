"""The damage model against measured KLD: random mixed plans and single-role perturbations.

For each model: its `dq analyze` (reused from ``OUT/analysis/<model>``), then

- ``--plans`` random mixed plans: each draws a target in 1.6-5 bits per weight and a spread, and gives
  every quantizable tensor a candidate type near the target (any candidate, no policy floors);
- single-role perturbations: every tensor of one role (attn_q, ffn_down, output, ...) at one type,
  everything else left in the source's BF16;

quantizes each (llama.cpp's quantizers through dq, with a tensor cache), and compares the damage model's
prediction (the sum of the analysis's per-tensor ``kld``) with the mean KLD that llama.cpp measures
against the BF16 GGUF on held-out Wikipedia. Prints a table, writes ``bench/results/damage_model_<model>``
``.json``, ``.md`` and a scatter plot ``.png``: Spearman rho, median relative error, and the power law ``measured = a *
predicted^b`` fitted in log space (b = 1, a = 1 is the model as it stands).

    python bench/damage_model.py --models smollm2-135m qwen2.5-coder-1.5b --plans 24 --chunks 8
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import time
from pathlib import Path

import numpy as np

ROLE_TYPES = ("Q3_K", "IQ2_XXS")


def _items(inputs, sources):
    """Every quantizable tensor with every measured candidate (no floors, no protection)."""
    from dq.plan.allocate import build_items
    from dq.plan.policy import Policy
    from dq.quant.formats import FORMATS

    low = min(inputs.analysis.candidates, key=lambda f: FORMATS[f].bits_per_weight)
    policy = Policy(role_floors={r: low for r in Policy().role_floors}, first_down_layers=0,
                    protect_super_weights=False, float_types=())
    # types that need an imatrix only where it has an entry (an untied embedding has none), as the planner does
    names = frozenset(inputs.imatrix.entries) if inputs.imatrix is not None else frozenset()
    items, _ = build_items(inputs.analysis, sources, policy, inputs.damage, imatrix_names=names)
    return [it for it in items if it.role.value not in ("vision", "projector")]


def _bits(opt, shape) -> float:
    return 8 * opt.nbytes / math.prod(shape)


def random_plans(items, shapes, n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    plans = []
    for k in range(n):
        target = rng.uniform(1.6, 5.0)
        spread = rng.uniform(0.3, 1.5)
        picks = {}
        for it in items:
            ladder = sorted(it.options, key=lambda o: o.nbytes)
            bits = np.array([_bits(o, shapes[it.name]) for o in ladder])
            j = int(np.argmin(np.abs(bits - target))) + int(round(rng.normal(0, spread)))
            picks[it.name] = ladder[int(np.clip(j, 0, len(ladder) - 1))]
        plans.append({"kind": "random", "label": f"random {k}", "picks": picks})
    return plans


def role_plans(items) -> list[dict]:
    from dq.quant.formats import parse_format

    plans = []
    for role in sorted({it.role.value for it in items}):
        group = [it for it in items if it.role.value == role]
        for t in ROLE_TYPES:
            fmt = parse_format(t)
            picks = {it.name: o for it in group for o in it.options if o.fmt is fmt}
            if len(picks) == len(group):
                plans.append({"kind": "role", "label": f"{role} @ {t}", "picks": picks})
    return plans


def _interleave(a: list, b: list) -> list:
    """a0, b0, a1, b1, ...: a run stopped by ``--max-minutes`` has measured plans of both kinds."""
    out = []
    for k in range(max(len(a), len(b))):
        out += a[k : k + 1] + b[k : k + 1]
    return out


def run_model(name: str, out: Path, n_plans: int, chunks: int, seed: int,
              deadline: float | None = None) -> tuple[list[dict], int]:
    from dq.analysis.analyze import analyze
    from dq.evals.kld import KLDConfig, run_kld
    from dq.export.gguf_quantize import quantize_gguf
    from dq.export.tensor_cache import TensorCache
    from dq.plan.planner import load_plan_inputs
    from dq.quant.assign import assign_types, read_source_tensors

    adir = out / "analysis" / name
    if not (adir / "analysis.json").is_file():
        analyze(name, adir, resume=True)
    inputs = load_plan_inputs(adir)
    sources = read_source_tensors(inputs.source_gguf)
    shapes = {s.name: s.shape for s in sources}
    items = _items(inputs, sources)
    n_quant = sum(math.prod(shapes[it.name]) for it in items)
    cache = TensorCache(out / "tensor-cache" / name)
    cfg = KLDConfig(ctx=512, chunks=chunks)
    rows = []
    plans = _interleave(random_plans(items, shapes, n_plans, seed), role_plans(items))
    im_sha = hashlib.sha256(inputs.imatrix_path.read_bytes()).hexdigest()
    kept_dir = out / "rows-damage" / name
    kept_dir.mkdir(parents=True, exist_ok=True)
    for k, p in enumerate(plans):
        t0 = time.time()
        types = {n: o.fmt for n, o in p["picks"].items()}
        key = hashlib.sha256(json.dumps([chunks, im_sha, sorted((n, f.value) for n, f in types.items())]).encode())
        kept = kept_dir / f"{key.hexdigest()[:20]}.json"
        if kept.is_file():  # resumable: a plan measured before (same types, imatrix and text) is not measured again
            rows.append(json.loads(kept.read_text()) | {"label": p["label"], "kind": p["kind"],
                                                       "predicted": sum(o.damage for o in p["picks"].values())})
            logging.info("%s %-24s reusing the row measured before (%s)", name, p["label"], kept.name)
            continue
        if deadline is not None and time.time() > deadline:
            logging.warning("%s: --max-minutes reached after %d of %d plans; run again to measure the rest",
                            name, len(rows), len(plans))
            break
        path = out / "gguf" / f"{name}-damage-{k}.gguf"
        path.parent.mkdir(parents=True, exist_ok=True)
        quantize_gguf(inputs.source_gguf, path, assign_types(sources, explicit=types), imatrix=inputs.imatrix,
                      imatrix_name=inputs.imatrix_path.name, tensor_cache=cache)
        r = run_kld(path, inputs.source_gguf, cfg)
        os.unlink(path)
        picked_bytes = sum(o.nbytes for o in p["picks"].values())
        rows.append({
            "model": name, "kind": p["kind"], "label": p["label"],
            "bpw": None if p["kind"] == "role" else 8 * picked_bytes / n_quant,
            "predicted": sum(o.damage for o in p["picks"].values()),
            "measured": r.kld_mean, "measured_stderr": r.kld_mean_stderr, "seconds": round(time.time() - t0, 1),
        })
        kept.write_text(json.dumps(rows[-1]))
        logging.info("%s %-24s predicted %.4g measured %.4g (%.0f s)", name, p["label"], rows[-1]["predicted"],
                     r.kld_mean, rows[-1]["seconds"])
    return rows, len(plans)


def summarize(rows: list[dict]) -> list[dict]:
    from scipy.stats import spearmanr

    out = []
    for model in sorted({r["model"] for r in rows}):
        for kind in ("random", "role", "all"):
            sel = [r for r in rows if r["model"] == model and (kind == "all" or r["kind"] == kind)]
            if len(sel) < 3:
                continue
            p = np.array([r["predicted"] for r in sel])
            m = np.array([r["measured"] for r in sel])
            rho = float(spearmanr(p, m)[0])
            rel = float(np.median(np.abs(p - m) / m))
            b, loga = np.polyfit(np.log(p), np.log(m), 1)
            out.append({"model": model, "plans": kind, "n": len(sel), "spearman": rho, "median_rel_err": rel,
                        "fit_a": float(np.exp(loga)), "fit_b": float(b)})
    return out


def table(rows: list[dict], summary: list[dict]) -> str:
    lines = ["| model | plans | n | Spearman rho | median rel. error | fit: measured = a * predicted^b |",
             "|---|---|---|---|---|---|"]
    for s in summary:
        lines.append(f"| {s['model']} | {s['plans']} | {s['n']} | {s['spearman']:.3f} | {s['median_rel_err']:.1%} | "
                     f"a = {s['fit_a']:.3f}, b = {s['fit_b']:.3f} |")
    lines += ["", "| model | plan | bits/weight | predicted KLD | measured KLD (± s.e.) |", "|---|---|---|---|---|"]
    for r in rows:
        bpw = f"{r['bpw']:.2f}" if r["bpw"] is not None else "-"
        lines.append(f"| {r['model']} | {r['label']} | {bpw} | {r['predicted']:.4g} | "
                     f"{r['measured']:.4g} ± {r['measured_stderr']:.2g} |")
    return "\n".join(lines)


def plot(rows: list[dict], summary: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 5.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        for kind, marker in (("random", "o"), ("role", "^")):
            sel = [r for r in rows if r["model"] == model and r["kind"] == kind]
            ax.scatter([r["predicted"] for r in sel], [r["measured"] for r in sel], marker=marker, label=kind, s=22)
        lo = min(min(r["predicted"], r["measured"]) for r in rows if r["model"] == model)
        hi = max(max(r["predicted"], r["measured"]) for r in rows if r["model"] == model)
        ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="measured = predicted")
        s = next((x for x in summary if x["model"] == model and x["plans"] == "all"),
                 {"spearman": float("nan"), "median_rel_err": float("nan")})  # fewer than 3 plans measured
        ax.set(xscale="log", yscale="log", xlabel="predicted mean KLD (sum of per-tensor kld)",
               ylabel="measured mean KLD (llama.cpp, held-out wiki)",
               title=f"{model}: Spearman {s['spearman']:.3f}, median rel. err {s['median_rel_err']:.0%}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def write(rows: list[dict], results: Path, argv: str, n_planned: int | None = None) -> None:
    """Table, JSON and scatter plot of one model's rows: ``results/damage_model_<model>.*``."""
    summary = summarize(rows)
    text = table(rows, summary)
    if n_planned is not None and len(rows) < n_planned:
        text = f"**Partial run: {len(rows)} of {n_planned} plans measured (--max-minutes).**\n\n" + text
    print(text)
    stem = f"damage_model_{rows[0]['model']}"  # model names hold dots (qwen2.5-coder-1.5b): no with_suffix
    (results / f"{stem}.json").write_text(json.dumps({"command": argv, "summary": summary, "rows": rows,
                                                      "plans_planned": n_planned}, indent=1))
    (results / f"{stem}.md").write_text(f"# Damage model vs measured KLD: {rows[0]['model']}\n\n`{argv}`\n\n{text}\n")
    plot(rows, summary, results / f"{stem}.png")


def main() -> None:
    from dq.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m"])
    ap.add_argument("--plans", type=int, default=24, help="random mixed plans per model")
    ap.add_argument("--chunks", type=int, default=8, help="512-token chunks of held-out text per KLD pass")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-minutes", type=float, default=None,
                    help="stop measuring new plans after this long and write what is measured (rerun resumes)")
    ap.add_argument("--work", type=Path, default=None, help="analyses, tensor cache, GGUFs (default $DQ_CACHE/bench)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    ap.add_argument("--render", type=Path, default=None, metavar="JSON",
                    help="only re-render the table and plot of a JSON this script wrote")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    args.results.mkdir(parents=True, exist_ok=True)
    if args.render is not None:
        doc = json.loads(args.render.read_text())
        write(doc["rows"], args.results, doc["command"], doc.get("plans_planned"))
        return
    work = args.work or cache_dir() / "bench"
    deadline = None if args.max_minutes is None else time.time() + 60 * args.max_minutes
    for m in args.models:
        argv = f"python bench/damage_model.py --models {m} --plans {args.plans} --chunks {args.chunks}"
        rows, n_planned = run_model(m, work, args.plans, args.chunks, args.seed, deadline)
        write(rows, args.results, argv, n_planned)


if __name__ == "__main__":
    main()
