"""``dq eval``: measure a quant against its base model (KLD, PPL, lm-eval tasks), compare reports,
check regression thresholds.

Examples:
    dq eval m-Q4_K_M.gguf --base smollm2-135m --tasks kld,ppl            # llama-perplexity's KLD report
    dq eval m-Q4_K_M.gguf --base MODEL_DIR --tasks kld,mmlu --limit 10 -o q4.json
    dq eval MODEL_DIR --tasks ppl                                       # perplexity only
    dq eval --compare q4.json q2.json
    dq eval --check evals/thresholds.yaml                               # exit 1 names what regressed
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger("dq.cli.eval")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="KLD/PPL/MMLU of a quant against its base; compare reports; check thresholds",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("quant", nargs="?", default=None, help="quantized model: .gguf file or HF directory")
    p.add_argument("--base", default=None, help="the model it was made from: HF directory, .gguf or packaged name")
    p.add_argument("--tasks", default="kld,ppl",
                   help="comma list of kld, ppl, mmlu, arc_easy, arc_challenge, piqa, hellaswag (default kld,ppl)")
    g = p.add_argument_group("KLD/PPL")
    g.add_argument("--ctx", type=int, default=512, help="tokens per chunk; the second half is scored (default 512)")
    g.add_argument("--chunks", type=int, default=16, help="number of chunks (default 16)")
    g.add_argument("--topk", type=int, default=256, help="base log-probs cached exactly per token (default 256)")
    g.add_argument("--tail-samples", type=int, default=256,
                   help="tail token ids cached per token for the tail quadrature (default 256)")
    g.add_argument("--text", default="wiki", help="evaluation text: 'wiki' (packaged held-out) or a UTF-8 file")
    g = p.add_argument_group("lm-eval")
    g.add_argument("--limit", type=int, default=None, help="questions per task / per MMLU subject (default all)")
    g.add_argument("--mmlu-subjects", default="all", help="all, quick (5 subjects) or a comma list")
    g.add_argument("--num-fewshot", type=int, default=5, help="MMLU shots from the dev split (default 5)")
    g.add_argument("--max-length", type=int, default=2048, help="lm-eval context window in tokens (default 2048)")
    g = p.add_argument_group("backends")
    g.add_argument("--threads", type=int, default=None, help="CPU threads (default: DQ_THREADS or all)")
    g.add_argument("--device", default="cpu",
                   help="cpu (GGUFs through llama.cpp) or cuda: GGUFs dequantized by dq's kernels into the base's "
                        "transformers model, HF models on the GPU (needs an HF --base; default cpu)")
    g.add_argument("--hf-dtype", default="float32", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype of HF models (default float32)")
    g.add_argument("--dense-4bit", action="store_true",
                   help="lm-eval tasks run a bitsandbytes 4-bit checkpoint with its 4-bit layers replaced by dense "
                        "layers of the same dequantized weights (same model, several times faster on CPU)")
    g = p.add_argument_group("output")
    g.add_argument("-o", "--output", type=Path, default=None, help="write the JSON report here")
    g.add_argument("--label", default=None, help="name stored in the report")
    g.add_argument("--json", action="store_true", help="JSON on stdout instead of a table")
    g = p.add_argument_group("other modes")
    g.add_argument("--compare", nargs=2, type=Path, metavar=("A.json", "B.json"), help="compare two reports")
    g.add_argument("--check", type=Path, metavar="THRESHOLDS.yaml",
                   help="evaluate every entry of a thresholds file; exit 1 naming each violated bound")
    p.set_defaults(func=run)


def _progress():
    from tqdm import tqdm

    bars: dict[str, tqdm] = {}

    def cb(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=f"{stage} pass", unit="chunk", file=sys.stderr, disable=None)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return cb


def _run_compare(args: argparse.Namespace) -> int:
    from dq.evals.report import compare_reports, format_compare, read_report

    a, b = read_report(args.compare[0]), read_report(args.compare[1])
    rows = compare_reports(a, b)
    if args.json:
        json.dump({"a": str(args.compare[0]), "b": str(args.compare[1]), "rows": rows}, sys.stdout, indent=1)
        print()
    else:
        print(format_compare(a, b, rows))
    return 0


def _run_check(args: argparse.Namespace) -> int:
    from dq.evals.thresholds import load_thresholds, run_check

    th = load_thresholds(args.check)
    if args.threads:
        from dataclasses import replace

        th = replace(th, kld=replace(th.kld, n_threads=args.threads), lm=replace(th.lm, n_threads=args.threads))
    res = run_check(th, progress=_progress())
    if args.output:
        from dq.evals.report import write_report

        args.output.mkdir(parents=True, exist_ok=True)
        for i, (label, rep) in enumerate(res.reports.items()):
            write_report(args.output / f"{i:02d}-{label.replace(' ', '_').replace('/', '_')}.json", rep)
    if args.json:
        json.dump({"ok": res.ok, "rows": [r.to_dict() for r in res.rows],
                   "reports": {k: v.to_dict() for k, v in res.reports.items()}}, sys.stdout, indent=1)
        print()
    else:
        w = max([len(r.entry) for r in res.rows] + [5])
        m = max([len(r.metric) for r in res.rows] + [6])
        print(f"{'entry':<{w}}  {'metric':<{m}}  {'value':>12}  {'bound':<20}  status")
        for r in res.rows:
            v = "-" if r.value is None else f"{r.value:.6g}"
            print(f"{r.entry:<{w}}  {r.metric:<{m}}  {v:>12}  {r.bound:<20}  {'ok' if r.ok else 'REGRESSED'}")
    for r in res.failures:
        print(f"dq eval: regression: {r.entry}: {r.metric} {r.why} ({args.check})", file=sys.stderr)
    return 0 if res.ok else 1


def run(args: argparse.Namespace) -> int:
    from dq.evals.errors import EvalConfigError

    modes = sum(x is not None for x in (args.quant, args.compare, args.check))
    if modes != 1:
        raise EvalConfigError("give exactly one of: QUANT (with --base), --compare A.json B.json, --check THRESHOLDS.yaml")
    if args.compare:
        return _run_compare(args)
    if args.check:
        return _run_check(args)

    from dq.evals.kld import KLDConfig
    from dq.evals.lmeval import LMEvalConfig, parse_subjects
    from dq.evals.report import format_table, write_report
    from dq.evals.runner import evaluate, parse_tasks

    tasks = parse_tasks(args.tasks)
    if args.output is not None:
        from dq.atomic import check_writable

        check_writable(args.output)
    kcfg = KLDConfig(ctx=args.ctx, chunks=args.chunks, topk=args.topk, tail_samples=args.tail_samples,
                     text=args.text, n_threads=args.threads, hf_dtype=args.hf_dtype, device=args.device)
    lcfg = LMEvalConfig(limit=args.limit, mmlu_subjects=parse_subjects(args.mmlu_subjects),
                        num_fewshot=args.num_fewshot, max_length=args.max_length, n_threads=args.threads,
                        hf_dtype=args.hf_dtype, dense_4bit=args.dense_4bit, device=args.device)
    report = evaluate(args.quant, args.base, tasks, kld_cfg=kcfg, lm_cfg=lcfg, label=args.label,
                      progress=_progress())
    if args.output is not None:
        write_report(args.output, report)
        log.info("wrote %s", args.output)
    if args.json:
        json.dump(report.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print(format_table(report))
    return 0
