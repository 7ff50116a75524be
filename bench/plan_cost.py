"""What planning costs after an analysis: time and peak memory against model size.

For each model, a fresh process loads the analysis (``OUT/analysis/<model>``, made by ``dq analyze`` with
its defaults if missing) and plans every budget of ``--bpw`` (six budgets, from the IQ1_S to the Q4_K_M
class); the process's peak RSS (``ru_maxrss``) and wall time are reported, with the model's size, its
largest decoder block in float32, and the analysis's own time (from ``analysis.json``, taken under the
load of the run that made it). The damage model is in the analysis, so planning runs no model pass.

    python bench/plan_cost.py --models smollm2-135m gemma3-270m qwen2.5-coder-1.5b
Prints a table, writes ``bench/results/plan_cost.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

BPW = (1.75, 2.0, 2.5, 3.0, 3.5, 4.8)

_CHILD = r"""
import json, math, resource, sys, time
from pathlib import Path
t0 = time.time()
from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan
from dq.quant.assign import read_source_tensors
adir, bpws = Path(sys.argv[1]), [float(b) for b in sys.argv[2].split(",")]
t_import = time.time() - t0
t1 = time.time()
inputs = load_plan_inputs(adir)
n = sum(math.prod(s.shape) for s in read_source_tensors(inputs.source_gguf))
t_load = time.time() - t1
per = []
from dq.errors import BudgetError
for b in bpws:
    t = time.time()
    try:
        plan = make_plan(inputs, budget_bytes(None, b, n))
    except BudgetError:  # below this model's smallest file (e.g. SmolLM2's 32-block fallbacks)
        per.append({"bpw": b, "seconds": time.time() - t, "bytes": None, "predicted_kld": None})
        continue
    per.append({"bpw": b, "seconds": time.time() - t, "bytes": plan.total_bytes, "predicted_kld": plan.predicted_damage})
print(json.dumps({"import_s": t_import, "load_s": t_load, "plans": per, "n_weights": n,
                  "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}))
"""


def largest_block_bytes(analysis) -> int:
    """float32 bytes of the largest decoder block (the analysis's streaming unit)."""
    by_layer: dict[int, int] = {}
    for t in analysis.tensors:
        if t.layer is not None:
            by_layer[t.layer] = by_layer.get(t.layer, 0) + 4 * t.n_elements
    return max(by_layer.values()) if by_layer else 0


def run_model(name: str, work: Path, bpw: tuple[float, ...]) -> dict:
    from dq.analysis.analyze import analyze
    from dq.analysis.artifact import Analysis
    from dq.convert.source import source_gguf
    from dq.models import resolve_model

    adir = work / "analysis" / name
    if not (adir / "analysis.json").is_file():
        analyze(name, adir, resume=True)
    source_gguf(resolve_model(name))  # converted once; conversion is not planning
    a = Analysis.load(adir)
    out = subprocess.run([sys.executable, "-c", _CHILD, str(adir), ",".join(map(str, bpw))], check=True,
                         capture_output=True, text=True)
    child = json.loads(out.stdout.strip().splitlines()[-1])
    total = child["load_s"] + sum(p["seconds"] for p in child["plans"])
    return {"model": name, "n_weights": child["n_weights"], "block_fp32_bytes": largest_block_bytes(a),
            "analysis_seconds": a.extra.get("seconds"), "load_seconds": child["load_s"],
            "plan_seconds_total": total, "plans": child["plans"], "peak_rss_bytes": child["peak_rss_bytes"]}


def table(rows: list[dict]) -> str:
    lines = ["| model | weights | largest block (fp32) | analysis (s) | load analysis (s) | "
             f"plan {len(rows[0]['plans'])} budgets (s, load included) | peak RSS | RSS - block |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['n_weights'] / 1e6:.0f} M | {r['block_fp32_bytes'] / 2**20:.0f} MiB | "
                     f"{r['analysis_seconds']} | {r['load_seconds']:.1f} | {r['plan_seconds_total']:.1f} | "
                     f"{r['peak_rss_bytes'] / 2**30:.2f} GiB | "
                     f"{(r['peak_rss_bytes'] - r['block_fp32_bytes']) / 2**30:.2f} GiB |")
    lines += ["", "| model | bits/weight budget | seconds | bytes | predicted mean KLD |", "|---|---|---|---|---|"]
    for r in rows:
        for p in r["plans"]:
            if p["bytes"] is None:
                lines.append(f"| {r['model']} | {p['bpw']} | {p['seconds']:.2f} | below the smallest file | - |")
            else:
                lines.append(f"| {r['model']} | {p['bpw']} | {p['seconds']:.2f} | {p['bytes']:,} | "
                             f"{p['predicted_kld']:.4g} |")
    return "\n".join(lines)


def main() -> None:
    from dq.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2-135m", "gemma3-270m", "qwen2.5-coder-1.5b"])
    ap.add_argument("--bpw", type=float, nargs="+", default=list(BPW))
    ap.add_argument("--work", type=Path, default=None, help="analyses (default $DQ_CACHE/bench)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    work = args.work or cache_dir() / "bench"
    rows = [run_model(m, work, tuple(args.bpw)) for m in args.models]
    text = table(rows)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    (args.results / "plan_cost.json").write_text(json.dumps(rows, indent=1))
    (args.results / "plan_cost.md").write_text(
        "# Planning cost after an analysis\n\n`python bench/plan_cost.py --models " + " ".join(args.models) +
        "`\n\n" + text + "\n")


if __name__ == "__main__":
    main()
