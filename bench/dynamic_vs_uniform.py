"""Dynamic vs uniform NF4 (bitsandbytes safetensors): size, KLD vs the 16-bit base, MMLU subset.

- uniform: every linear in NF4 except ``lm_head`` (what ``load_in_4bit=True`` does);
- dynamic: dq's plan from measured NF4 activation error + super weights, ``--keep-fraction`` of linear
  weights kept 16-bit (Unsloth keeps ~10%).

KLD is ``dq.evals.kld.run_kld`` (llama-perplexity's method, held-out Wikipedia, base = the bf16 model);
MMLU/ARC use ``dq.evals.lmeval`` when it is importable. Base models are dequantized 4-bit GGUFs
(``shared/models.md``), so NF4 damage here is smaller than on a true BF16 checkpoint.

Usage:
    python bench/dynamic_vs_uniform.py [--models smollm2-135m gemma3-270m] [--keep-fraction 0.1]
        [--chunks 8] [--mmlu-limit 20] [--arc-limit 100] [--no-lmeval] [--no-kld] [--dense-4bit] [-o FILE]
Writes bench/results/dynamic_vs_uniform.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
# Run as a script, bench/ is sys.path[0]: bench/kernels.py would shadow the `kernels` package that
# bitsandbytes probes on import. Put the repository root there instead.
sys.path[:] = [str(ROOT.parent)] + [p for p in sys.path if Path(p or ".").resolve() != ROOT]

from dq.cache import cache_dir  # noqa: E402
from dq.export.safetensors_bnb import quantize_safetensors_bnb  # noqa: E402
from dq.models import materialize  # noqa: E402

log = logging.getLogger("bench.dynamic_vs_uniform")


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


def _quant(base: Path, out: Path, variant: str, keep_fraction: float) -> dict:
    if (out / "dq_plan.json").is_file():
        log.info("reusing %s", out)
        from dq.export.bnb_plan import BnbPlan

        plan = BnbPlan.load(out)
        return {"seconds": None, "plan": plan.summary()}
    t = time.time()
    if variant == "uniform":
        r = quantize_safetensors_bnb(base, out, keep=set())
    else:
        r = quantize_safetensors_bnb(base, out, keep_fraction=keep_fraction)
    return {"seconds": round(time.time() - t, 1), "plan": r.plan.summary()}


def _n_params(base: Path) -> int:
    import math

    from safetensors import safe_open

    n = 0
    for f in base.glob("*.safetensors"):
        with safe_open(f, "pt") as fh:
            n += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return n


def _save(results: dict, output: Path, models: list[str]) -> None:
    """Merge this run's rows into ``output`` (rows of other models are kept), after every row."""
    output.parent.mkdir(parents=True, exist_ok=True)
    old = json.loads(output.read_text()) if output.is_file() else {}
    rows = [r for r in old.get("rows", []) if r["model"] not in models] + results["rows"]
    plans = {**old.get("plans", {}), **results.get("plans", {})}
    tmp = output.with_suffix(".tmp")
    tmp.write_text(json.dumps({**results, "rows": rows, "plans": plans}, indent=1) + "\n")
    tmp.replace(output)


def run(models: list[str], keep_fraction: float, chunks: int, mmlu_limit: int, arc_limit: int, lmeval: bool,
        output: Path, kld: bool = True, dense_4bit: bool = False) -> dict:
    from dq.evals.kld import KLDConfig, run_kld

    results: dict = {"settings": {"keep_fraction": keep_fraction, "kld_ctx": 512, "kld_chunks": chunks,
                                  "mmlu_limit_per_subject": mmlu_limit, "arc_easy_limit": arc_limit,
                                  "lmeval_dense_4bit": dense_4bit}, "rows": []}
    for name in models:
        base = materialize(name)
        n_params = _n_params(base)
        work = cache_dir() / "bench" / "dynamic_vs_uniform"
        work.mkdir(parents=True, exist_ok=True)
        variants = {"bf16 (base)": base}
        for v in ("uniform", "dynamic"):
            out = work / (f"{name}-{v}-nf4" + ("" if v == "uniform" else f"-k{keep_fraction}"))
            info = _quant(base, out, v, keep_fraction)
            variants[v] = out
            results.setdefault("plans", {})[f"{name}/{v}"] = info
        for label, path in variants.items():
            row = {"model": name, "variant": label, "bytes": _dir_bytes(path), "n_params": n_params}
            row["bits_per_weight"] = round(8.0 * row["bytes"] / n_params, 3)
            if path != base and kld:
                k = run_kld(path, base, KLDConfig(ctx=512, chunks=chunks, hf_dtype="bfloat16"))
                row.update(kld_mean=k.kld_mean, kld_p99=k.kld_p99, same_top=k.same_top, ppl=k.ppl_quant,
                           ppl_base=k.ppl_base)
            if lmeval:
                try:
                    from dq.evals.lmeval import MMLU_SUBJECTS_QUICK, LMEvalConfig, run_lmeval
                except ImportError as exc:  # dq.evals.lmeval not landed
                    log.warning("lm-eval part skipped: %s", exc)
                else:
                    dense = dense_4bit  # a no-op on the 16-bit base, which then also runs in float32
                    dtype = "float32" if dense else "bfloat16"
                    runs = run_lmeval(path, LMEvalConfig(tasks=("mmlu",), mmlu_subjects=MMLU_SUBJECTS_QUICK,
                                                         limit=mmlu_limit, hf_dtype=dtype, dense_4bit=dense))
                    row["mmlu_acc"], row["mmlu_n"] = runs["mmlu"].acc, runs["mmlu"].n
                    if arc_limit:
                        runs = run_lmeval(path, LMEvalConfig(tasks=("arc_easy",), limit=arc_limit,
                                                             hf_dtype=dtype, dense_4bit=dense))
                        row["arc_easy_acc"], row["arc_easy_n"] = runs["arc_easy"].acc, runs["arc_easy"].n
            log.info("%s", row)
            results["rows"].append(row)
            _save(results, output, models)
    return results


def _fmt(v, spec):
    return format(v, spec) if isinstance(v, (int, float)) else "-"


def table(results: dict) -> str:
    lines = [f"{'model':<14} {'variant':<12} {'MB':>7} {'bpw':>6} {'KLD mean':>9} {'KLD p99':>8} {'same top':>8} "
             f"{'PPL':>7} {'MMLU':>12} {'ARC-E':>12}"]
    base_ppl = {r["model"]: r["ppl_base"] for r in results["rows"] if r.get("ppl_base") is not None}
    for r in results["rows"]:
        ppl = r.get("ppl") if "ppl" in r else base_ppl.get(r["model"])
        mmlu = f"{r['mmlu_acc']:.3f} (n={r['mmlu_n']})" if "mmlu_acc" in r else "-"
        arc = f"{r['arc_easy_acc']:.3f} (n={r['arc_easy_n']})" if "arc_easy_acc" in r else "-"
        lines.append(f"{r['model']:<14} {r['variant']:<12} {r['bytes'] / 1e6:>7.1f} {r['bits_per_weight']:>6.2f} "
                     f"{_fmt(r.get('kld_mean'), '.5f'):>9} {_fmt(r.get('kld_p99'), '.4f'):>8} "
                     f"{_fmt(r.get('same_top'), '.3f'):>8} {_fmt(ppl, '.2f'):>7} {mmlu:>12} {arc:>12}")
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", default=["smollm2-135m"])
    p.add_argument("--keep-fraction", type=float, default=0.1)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--mmlu-limit", type=int, default=20)
    p.add_argument("--arc-limit", type=int, default=100)
    p.add_argument("--no-lmeval", action="store_true")
    p.add_argument("--no-kld", action="store_true")
    p.add_argument("--dense-4bit", action="store_true",
                   help="lm-eval runs NF4 checkpoints with their 4-bit layers densified (same weights, float32; "
                        "dq.evals.hf_load) instead of through bitsandbytes' slow CPU path")
    p.add_argument("-o", "--output", type=Path, default=ROOT / "results" / "dynamic_vs_uniform.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stderr)
    run(args.models, args.keep_fraction, args.chunks, args.mmlu_limit, args.arc_limit, not args.no_lmeval,
        args.output, kld=not args.no_kld, dense_4bit=args.dense_4bit)
    print(table(json.loads(args.output.read_text())))
    print(f"\nwrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
