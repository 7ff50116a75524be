"""`dq analyze` as 1 vs N processes (torch.distributed: gloo on CPUs, NCCL on GPUs): wall time, peak memory,
and whether the N-process analysis equals the one-process one.

Each run is `dq analyze MODEL --nproc N` in a fresh child process (which re-starts itself under torchrun),
on the same calibration settings; peak RSS is the largest of the run's processes (getrusage of the child's
children). The analyses are compared tensor by tensor (largest relative difference of the predicted KLD,
bytes equal) and by the plan each gives at one budget.

Usage:
    python bench/distributed.py --model smollm2-135m --nproc 1 2
    python bench/distributed.py --random-llama 2048,5632,16 --device cuda --nproc 1   # on the GPU machine
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).parent / "results"


def _child(argv: list[str]) -> None:
    """Run one analysis; print its wall time and the peak RSS of its processes as JSON (last line)."""
    t0 = time.time()
    r = subprocess.run([sys.executable, "-m", "dq", *argv])
    peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    print(json.dumps({"rc": r.returncode, "seconds": time.time() - t0, "peak_rss_gib": peak_kib / 2**20}))


def _run(model: str, out: Path, nproc: int, args: argparse.Namespace) -> dict:
    argv = ["analyze", model, "-o", str(out), "--nproc", str(nproc), "--device", args.device, "--tokens",
            str(args.tokens), "--grad-tokens", str(args.grad_tokens), "--no-plots"]
    if args.candidates:
        argv += ["--candidates", args.candidates]
    r = subprocess.run([sys.executable, __file__, "_child", *argv], capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-3000:])
    res = json.loads(r.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise SystemExit(f"dq analyze --nproc {nproc} failed:\n{r.stderr[-3000:]}")
    a = json.loads((out / "analysis.json").read_text())
    res["stage_seconds"] = a["extra"]["stage_seconds"]
    return res


def _compare(one: Path, other: Path, bpw: float) -> dict:
    from dq.analysis.artifact import Analysis
    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan

    a, b = Analysis.load(one / "analysis.json").by_name(), Analysis.load(other / "analysis.json").by_name()
    worst, bytes_equal = 0.0, True
    for name, t in a.items():
        for e1, e2 in zip(t.errors, b[name].errors):
            bytes_equal &= e1.nbytes == e2.nbytes
            if e1.kld is not None and e2.kld is not None and e1.kld > 0:
                worst = max(worst, abs(e2.kld - e1.kld) / e1.kld)
    plans = []
    for d in (one, other):
        inputs = load_plan_inputs(d)
        n = sum(int(np.prod(s.shape)) for s in inputs.sources)
        plans.append({k: v.type.value for k, v in make_plan(inputs, budget_bytes(None, bpw, n)).tensors.items()})
    return {"max_rel_kld_diff": worst, "bytes_equal": bytes_equal, "same_plan": plans[0] == plans[1],
            "plan_bpw": bpw}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        _child(sys.argv[2:])
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m", help="packaged name or HF directory")
    ap.add_argument("--random-llama", default=None, metavar="HIDDEN,FFN,LAYERS",
                    help="instead of --model: a random Llama of these widths (built once, e.g. on a GPU machine)")
    ap.add_argument("--nproc", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--grad-tokens", type=int, default=2048)
    ap.add_argument("--candidates", default=None, help="default: dq analyze's")
    ap.add_argument("--bpw", type=float, default=4.5, help="budget of the plan compared (bits per weight)")
    ap.add_argument("--name", default=None, help="results file stem (default: distributed_<model>_<device>)")
    args = ap.parse_args()

    import os

    import torch

    tmp = Path(tempfile.mkdtemp(prefix="dq-dist-"))
    model, label = args.model, Path(args.model).name
    if args.random_llama:
        from dq.testing import tiny_llama

        hidden, ffn, layers = (int(x) for x in args.random_llama.split(","))
        model = str(tiny_llama(tmp / "model", hidden=hidden, intermediate=ffn, layers=layers,
                               heads=max(1, hidden // 128), kv_heads=max(1, hidden // 512), vocab_size=4096))
        label = f"random-llama-{hidden}x{ffn}x{layers}"
    rows, outs = [], {}
    for n in args.nproc:
        outs[n] = tmp / f"n{n}"
        res = _run(model, outs[n], n, args)
        rows.append({"nproc": n, **res})
        print(f"nproc {n}: {res['seconds']:.0f} s", file=sys.stderr)
    base = rows[0]
    for row in rows:
        row["speedup"] = base["seconds"] / row["seconds"]
        row["vs_first"] = None if row is base else _compare(outs[base["nproc"]], outs[row["nproc"]], args.bpw)

    cpu = os.cpu_count()
    gpu = torch.cuda.get_device_name(0) if args.device.startswith("cuda") and torch.cuda.is_available() else None
    stages = sorted({k for r in rows for k in r["stage_seconds"]})
    lines = [f"# `dq analyze` over processes: {label} on {args.device}", "",
             f"`python bench/distributed.py {' '.join(sys.argv[1:])}` ({cpu} CPU cores{', ' + gpu if gpu else ''}; "
             f"{args.tokens} calibration tokens, {args.grad_tokens} probe tokens)", "",
             "| processes | wall s | speed-up | peak RSS GiB (largest process) | "
             + " | ".join(f"{s} s" for s in stages) + " | max rel. KLD diff vs first | bytes equal | same plan |",
             "|---|---|---|---|" + "---|" * len(stages) + "---|---|---|"]
    for r in rows:
        c = r["vs_first"] or {}
        lines.append(f"| {r['nproc']} | {r['seconds']:.0f} | {r['speedup']:.2f}x | {r['peak_rss_gib']:.2f} | "
                     + " | ".join(f"{r['stage_seconds'].get(s, 0):.0f}" for s in stages)
                     + f" | {c.get('max_rel_kld_diff', '-') if c else '-'} | {c.get('bytes_equal', '-')} | "
                       f"{c.get('same_plan', '-')} |")
    text = "\n".join(lines) + "\n"
    print(text)
    stem = args.name or f"distributed_{label}_{args.device.split(':')[0]}"
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{stem}.md").write_text(text)
    (RESULTS / f"{stem}.json").write_text(json.dumps({"argv": sys.argv[1:], "cpu_count": cpu, "gpu": gpu,
                                                      "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
