"""MoE under a 1.58-bit-class budget: dq plans vs llama.cpp's uniform IQ1_S on upcycled MoE models.

Models (no pretrained MoE ships in a package, so both are sparse-upcycled, see dq.testing_moe):
- `tiny-mixtral`: the 256-aligned tiny Llama upcycled to 16 experts (every 256-block type applies);
- `smollm2-qwen2moe`: SmolLM2-135M's real MLPs upcycled to a Qwen2-MoE with a shared expert, first
  `--layers` layers. Its 576-wide expert rows cannot hold 256-blocks, so gate/up experts fall back to
  IQ4_NL (llama.cpp's rule): the planner states the smallest achievable size when 1.8 bpw is below it.
For each: stock IQ1_S (llama_model_quantize, same imatrix), dq at the IQ1_S file's size, dq at 1.8 bpw;
mean KLD and same-top rate against the BF16 GGUF on held-out text, and the routed/other bits.

    python bench/moe_plan.py
Prints a table and writes bench/results/moe_plan.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
from pathlib import Path

import numpy as np


def _bits(plan_types: dict, shapes: dict) -> tuple[float, float]:
    from dq.quant.formats import FORMATS, effective_format, tensor_nbytes

    def stored(k):  # plans name the requested type; llama.cpp stores the block-size fallback
        f = plan_types[k]
        return f if FORMATS[f].is_float else effective_format(f, shapes[k])

    def avg(pred):
        n = sum(int(np.prod(shapes[k])) for k in plan_types if pred(k))
        b = sum(tensor_nbytes(stored(k), shapes[k]) for k in plan_types if pred(k))
        return 8 * b / n if n else float("nan")

    quantizable = {k for k in plan_types if len(shapes[k]) >= 2}
    return avg(lambda k: "_exps" in k), avg(lambda k: k in quantizable and "_exps" not in k and "gate_inp" not in k)


def run(name: str, model: Path, adir: Path, work: Path, ctx: int, chunks: int) -> list[dict]:
    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.errors import BudgetError
    from dq.evals.kld import KLDConfig, run_kld
    from dq.export.gguf_quantize import quantize_gguf
    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan
    from dq.quant.assign import assign_types, read_source_tensors
    from dq.quant.llama_quantize import llama_quantize

    if not (adir / "analysis.json").is_file():
        analyze(model, adir, AnalyzeOptions(n_tokens=2048, seq_len=256, ablation_tokens=256, plots=False), resume=True)
    inputs = load_plan_inputs(adir)
    sources = read_source_tensors(inputs.source_gguf)
    shapes = {s.name: s.shape for s in sources}
    n = sum(int(np.prod(s.shape)) for s in sources)
    cfg = KLDConfig(ctx=ctx, chunks=chunks)
    stock = work / f"{name}-IQ1_S.gguf"
    res = llama_quantize(inputs.source_gguf, stock, "IQ1_S", imatrix=inputs.imatrix.flat_weights())
    rows = []

    def measure(label, path, types):
        r = run_kld(path, inputs.source_gguf, cfg)
        routed, other = _bits(types, shapes)
        rows.append({"model": name, "file": label, "bytes": path.stat().st_size, "bpw": 8 * path.stat().st_size / n,
                     "routed_bpw": routed, "other_bpw": other, "kld_mean": r.kld_mean, "same_top": r.same_top})

    measure("stock IQ1_S", stock, res.types)
    for label, budget in (("dq @ IQ1_S size", stock.stat().st_size), ("dq @ 1.8 bpw", budget_bytes(None, 1.8, n))):
        try:
            plan = make_plan(inputs, budget)
        except BudgetError as exc:
            rows.append({"model": name, "file": label, "error": str(exc)})
            continue
        out = work / f"{name}-{label.replace(' ', '_').replace('@', 'at')}.gguf"
        quantize_gguf(inputs.source_gguf, out, assign_types(sources, explicit=plan.explicit_types()),
                      imatrix=inputs.imatrix, imatrix_name=inputs.imatrix_path.name)
        measure(label, out, plan.explicit_types())
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--chunks", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    from dq.models import materialize
    from dq.testing import tiny_llama
    from dq.testing_moe import upcycle_moe

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        tiny = tiny_llama(work / "tiny", layers=args.layers)
        models = {
            "tiny-mixtral": upcycle_moe(tiny, work / "tiny-mixtral", kind="mixtral", n_experts=16, top_k=2),
            "smollm2-qwen2moe": upcycle_moe(materialize("smollm2-135m"), work / "smollm2-qwen2moe", kind="qwen2_moe",
                                            n_experts=8, top_k=2, layers=args.layers),
        }
        for name, model in models.items():
            try:
                rows += run(name, model, work / f"analysis-{name}", work, args.ctx, args.chunks)
            except Exception as exc:  # report the model that failed, keep the others
                logging.exception("%s failed", name)
                rows.append({"model": name, "file": "-", "error": f"{type(exc).__name__}: {exc}"})
    text = table(rows)
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "moe_plan.json").write_text(json.dumps(rows, indent=1))
    (args.out / "moe_plan.md").write_text(
        f"# MoE plans vs uniform IQ1_S (upcycled MoE models)\n\n`python bench/moe_plan.py --layers {args.layers} "
        f"--ctx {args.ctx} --chunks {args.chunks}` (KLD on held-out text against the BF16 GGUF; the same imatrix "
        f"for every file)\n\n{text}\n")


def table(rows: list[dict]) -> str:
    lines = ["| model | file | bytes | bpw | routed bpw | other bpw | mean KLD | same top |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['file']} | infeasible: {r['error']} | | | | | |")
            continue
        lines.append(f"| {r['model']} | {r['file']} | {r['bytes']:,} | {r['bpw']:.2f} | {r['routed_bpw']:.2f} | "
                     f"{r['other_bpw']:.2f} | {r['kld_mean']:.4f} | {100 * r['same_top']:.1f}% |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
