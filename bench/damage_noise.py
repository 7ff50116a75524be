"""How noisy the damage model's per-tensor predictions are: the same analysis at several seeds.

A seed draws other probe sequences, other Rademacher probes and other measured rows. For each pair of seeds
and each type, the spread of ``log(kld_a / kld_b)`` over the model's block tensors (after removing the
pair's median, a whole-model factor that a plan does not see) is sqrt(2) times one analysis's relative
noise per tensor. Runs ``dq analyze`` with a few candidates, no super weights and no role responses.

    python bench/damage_noise.py --model qwen2.5-coder-1.5b --seeds 1 2 --grad-tokens 4096 8192
Prints a table and writes ``bench/results/damage_noise_<model>.{json,md}``.
"""

from __future__ import annotations

import argparse
import itertools
import json
import logging
import time
from pathlib import Path

import numpy as np

TYPES = ("Q4_K", "IQ2_XXS", "IQ1_S")


def _klds(path: Path, seed: int, grad_tokens: int) -> tuple[dict[tuple[str, str], float], int]:
    """A cached analysis's per-tensor predicted KLDs and its probe count; refuses one made with other settings."""
    a = json.loads(path.read_text())
    opts = a["extra"]["options"]
    made = (opts["seed"], opts["grad_tokens"], tuple(opts["candidates"]))
    if made != (seed, grad_tokens, TYPES):
        raise SystemExit(f"{path} was analysed with seed/grad tokens/candidates {made}, not "
                         f"{(seed, grad_tokens, TYPES)}: delete its folder to re-analyse")
    klds = {(t["name"], e["requested"]): e["kld"] for t in a["tensors"] if t.get("layer") is not None
            for e in t.get("errors", ()) if e.get("kld")}
    return klds, int(a["extra"]["damage_model"]["probes"])


def noise(a: dict, b: dict, fmt: str) -> tuple[float, int]:
    """One analysis's relative noise per tensor at ``fmt`` from two seeds' predictions."""
    r = np.array([np.log(a[k] / b[k]) for k in a if k[1] == fmt and k in b and a[k] > 0 and b[k] > 0])
    r = r - np.median(r)
    return float(r.std() / np.sqrt(2)), int(r.size)


def main() -> None:
    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.cache import cache_dir

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="qwen2.5-coder-1.5b")
    ap.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--grad-tokens", nargs="+", type=int, default=[4096, 8192])
    ap.add_argument("--work", type=Path, default=None, help="analyses (default $DQ_CACHE/bench/noise)")
    ap.add_argument("--results", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    work = args.work or cache_dir() / "bench" / "noise"
    rows = []
    for grad in args.grad_tokens:
        runs = {}
        for seed in args.seeds:
            out = work / f"{args.model}-s{seed}-g{grad}"
            t0 = time.time()
            if not (out / "analysis.json").is_file():
                analyze(args.model, out, AnalyzeOptions(seed=seed, grad_tokens=grad, candidates=TYPES,
                                                        super_weights=False, plots=False, response_tokens=0),
                        resume=True)
            runs[seed], probes = _klds(out / "analysis.json", seed, grad)
            logging.info("seed %d, grad tokens %d: %.0f s", seed, grad, time.time() - t0)
        for fmt in TYPES:
            vals = [noise(runs[a], runs[b], fmt) for a, b in itertools.combinations(args.seeds, 2)]
            rows.append({"grad_tokens": grad, "probes": probes, "type": fmt, "tensors": vals[0][1],
                         "relative_noise": float(np.mean([v for v, _ in vals]))})
    lines = ["| probes (grad tokens) | type | tensors | relative noise of one analysis per tensor |",
             "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['probes']} ({r['grad_tokens']}) | {r['type']} | {r['tensors']} | "
                     f"{100 * r['relative_noise']:.1f}% |")
    text = "\n".join(lines)
    print(text)
    args.results.mkdir(parents=True, exist_ok=True)
    stem = f"damage_noise_{args.model}"
    (args.results / f"{stem}.json").write_text(json.dumps({"seeds": args.seeds, "rows": rows}, indent=1))
    cmd = (f"python bench/damage_noise.py --model {args.model} --seeds {' '.join(map(str, args.seeds))} "
           f"--grad-tokens {' '.join(map(str, args.grad_tokens))}")
    (args.results / f"{stem}.md").write_text(f"# Damage-model noise per tensor: {args.model}\n\n`{cmd}`\n\n{text}\n")


if __name__ == "__main__":
    main()
