"""``dq quantize``: write a GGUF with a llama.cpp preset, per-tensor overrides and an imatrix.

Examples:
    dq quantize                                   # the packaged SmolLM2-135M, Q4_K_M
    dq quantize MODEL_DIR -o m.gguf --type IQ2_XXS --imatrix m.imatrix.gguf \\
        --tensor-type 'attn_=Q8_0' --tensor-type '^output\\.weight=Q6_K'
    dq quantize MODEL_DIR --type Q4_K_M --dry-run --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dq.atomic import check_writable
from dq.convert.source import source_gguf
from dq.errors import BudgetError
from dq.export.gguf_quantize import quantize_gguf
from dq.models import resolve_model
from dq.quant.assign import TypeAssignment, assign_preset, parse_tensor_type
from dq.quant.gguf_header import GGUFHeader, read_gguf_header
from dq.quant.imatrix import read_imatrix
from dq.quant.layout import predict_size
from dq.quant.llama_quantize import PRESETS, parse_preset

log = logging.getLogger("dq.cli.quantize")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("quantize", help="quantize a model to GGUF", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", nargs="?", default=None,
                   help="HF model directory, unquantized .gguf, or packaged model name (default: smollm2-135m)")
    p.add_argument("-o", "--output", type=Path, default=None, help="output .gguf (default: ./<model>-<TYPE>.gguf)")
    p.add_argument("--type", default="Q4_K_M", help=f"llama.cpp preset mix (default Q4_K_M): {', '.join(PRESETS)}")
    p.add_argument("--tensor-type", action="append", default=[], metavar="REGEX=TYPE",
                   help="per-tensor override, as llama-quantize's (regex search on GGUF names, first match wins)")
    p.add_argument("--imatrix", type=Path, default=None, help="importance matrix (llama.cpp GGUF imatrix format)")
    p.add_argument("--plan", default=None, metavar="PLAN.yaml|auto",
                   help="per-tensor types from a `dq plan` file, or `auto` to analyse and plan under "
                        "--target-size/--target-bpw (overrides --type)")
    p.add_argument("--analysis", type=Path, default=None,
                   help="with --plan auto: reuse this `dq analyze` directory (default: analyse into the cache)")
    from dq.cli.plan import add_budget_args

    add_budget_args(p)
    p.add_argument("--split-max-size", default=None, metavar="SIZE",
                   help="write llama.cpp's split layout with shards of at most SIZE (e.g. 50G); default: split into "
                        "48G shards only when the file would exceed the Hub's 50 GB limit; 0 = never split")
    p.add_argument("--dry-run", action="store_true", help="print every tensor's type and the exact file size; write nothing")
    p.add_argument("--threads", type=int, default=None, help="quantizer threads (default: all cores)")
    p.add_argument("--device", default="cpu",
                   help="cpu (llama.cpp's quantizers) or cuda / cuda:N (dq's GPU kernels, the same bytes)")
    p.add_argument("--format", choices=("gguf", "safetensors"), default="gguf",
                   help="gguf (llama.cpp) or safetensors (bitsandbytes NF4, dynamic; output is a directory)")
    from dq.cli.quantize_safetensors import add_safetensors_arguments

    add_safetensors_arguments(p)
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")
    p.set_defaults(func=run)


def _summary(assignment: TypeAssignment, size: int) -> dict:
    n = sum(c.n_elements for c in assignment.choices)
    return {
        "preset": assignment.preset,
        "size_bytes": size,
        "bits_per_weight": 8.0 * size / n,
        "tensors": [
            {"name": c.name, "shape": list(c.shape), "requested": c.requested.value, "type": c.stored.value,
             "bytes": c.nbytes, "origin": c.origin}
            for c in assignment.choices
        ],
        "fallbacks": [c.name for c in assignment.fallbacks],
        "unmatched_patterns": list(assignment.unmatched_patterns),
    }


def _print_table(assignment: TypeAssignment, size: int) -> None:
    w = max(len(c.name) for c in assignment.choices)
    print(f"{'tensor':<{w}}  {'shape':>16}  {'type':>8}  {'bytes':>12}  origin")
    for c in assignment.choices:
        t = c.stored.value if not c.fell_back else f"{c.stored.value}*"
        print(f"{c.name:<{w}}  {'x'.join(map(str, c.shape)):>16}  {t:>8}  {c.nbytes:>12,}  {c.origin}")
    n = sum(c.n_elements for c in assignment.choices)
    print(f"total: {size:,} bytes ({size / 2**20:.2f} MiB, {8.0 * size / n:.3f} bits per weight)")
    if assignment.fallbacks:
        print("* block-size fallback: the requested type cannot hold these rows (see the log)")


def _report_fallbacks(assignment: TypeAssignment) -> None:
    for pattern in assignment.unmatched_patterns:
        log.warning("warning: --tensor-type pattern %r matched no tensor", pattern)
    fb = assignment.fallbacks
    if fb:
        pairs = sorted({(c.requested.value, c.stored.value) for c in fb})
        desc = ", ".join(f"{a} -> {b}" for a, b in pairs)
        log.warning("warning: %d tensor(s) use a block-size fallback (%s): their row length is not a multiple "
                    "of the requested type's block; e.g. %s", len(fb), desc, fb[0].name)


def _split_bytes(arg: str | None, size: int) -> int:
    """Shard size for ``--split-max-size`` (0: one file); by default only files over the Hub's limit split."""
    from dq.quant.gguf_split import DEFAULT_SPLIT_BYTES, HUB_MAX_FILE_BYTES, parse_split_size

    if arg is not None:
        return parse_split_size(arg)
    if size > HUB_MAX_FILE_BYTES:
        log.info("the file would have %s bytes, over the Hub's 50 GB per file: writing 48 GB shards "
                 "(--split-max-size 0 writes one file)", f"{size:,}")
        return DEFAULT_SPLIT_BYTES
    return 0


def _auto_plan(args: argparse.Namespace, model: Path, output: Path) -> Path:
    """Analyse (or reuse an analysis), plan under the budget, save the plan beside the output."""
    from dq.analysis.analyze import analyze
    from dq.cache import cache_dir, files_key
    from dq.cli.plan import build_plan, print_summary

    if args.target_size is None and args.target_bpw is None:
        raise BudgetError("--plan auto needs a budget: --target-size (e.g. 80MB) or --target-bpw (e.g. 2.5)")
    adir = args.analysis
    if adir is None:
        adir = cache_dir() / "analysis" / f"{model.name}-{files_key(model)}"
        if not (adir / "analysis.json").is_file():
            log.info("analysing %s into %s (reused next time)", model, adir)
            analyze(model, adir, resume=True)
    _, plan = build_plan(adir, args)
    plan_path = output.with_name(output.stem + ".plan.yaml")
    if not args.dry_run:
        plan.save(plan_path)
        log.info("wrote the plan to %s", plan_path)
    print_summary(plan, file=sys.stderr)
    return plan_path if not args.dry_run else plan


def _plan_assignment(args, model: Path, output: Path, src: GGUFHeader, overrides):
    from dq.analysis.artifact import imatrix_beside
    from dq.convert.source import mmproj_gguf
    from dq.plan.artifact import QuantPlan
    from dq.quant.assign import assign_types, read_source_tensors

    plan = _auto_plan(args, model, output) if args.plan == "auto" else Path(args.plan)
    plan = plan if isinstance(plan, QuantPlan) else QuantPlan.load(plan)
    sources = read_source_tensors(src)
    mm = mmproj_gguf(model) if plan.mmproj and model.is_dir() else None
    plan.check_model((s.name, s.shape) for s in [*sources, *(read_source_tensors(mm) if mm else [])])
    imatrix_path = args.imatrix or imatrix_beside(plan.analysis)
    return assign_types(sources, explicit=plan.explicit_types(mmproj=False), overrides=overrides), imatrix_path, plan, mm


def run(args: argparse.Namespace) -> int:
    if args.format == "safetensors":
        from dq.cli.quantize_safetensors import run_safetensors

        return run_safetensors(args)
    preset = parse_preset(args.type)
    overrides = [parse_tensor_type(s) for s in args.tensor_type]
    model = resolve_model(args.model)
    tag = "dq" if args.plan else preset
    output = args.output or Path(f"{model.stem if model.is_file() else model.name}-{tag}.gguf")
    if not args.dry_run:
        check_writable(output)
    # parsed once: the plan check or preset, the size prediction and the writer share it
    src = read_gguf_header(source_gguf(model))
    imatrix_path = args.imatrix
    plan = mm = None
    if args.plan:
        assignment, imatrix_path, plan, mm = _plan_assignment(args, model, output, src, overrides)
        preset_ftype = None
    else:
        assignment = assign_preset(src, preset, overrides, has_imatrix=imatrix_path is not None)
        preset_ftype = PRESETS[preset]
    imatrix = read_imatrix(imatrix_path) if imatrix_path else None
    _report_fallbacks(assignment)
    kw = dict(imatrix=imatrix, imatrix_name=imatrix_path.name if imatrix_path else None, preset_ftype=preset_ftype)
    split = _split_bytes(args.split_max_size, predict_size(src, assignment, **kw))
    if args.dry_run:
        size = predict_size(src, assignment, split_max_bytes=split, **kw)
        if args.json:
            json.dump(_summary(assignment, size), sys.stdout, indent=1)
            print()
        else:
            _print_table(assignment, size)
        return 0
    from tqdm import tqdm

    total = sum(c.nbytes for c in assignment.choices)
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"quantizing {output.name}", file=sys.stderr,
              disable=None) as bar:
        if plan is not None:
            from dq.export.plan_files import write_plan_files

            results = write_plan_files(plan, src, mm, output, imatrix=kw["imatrix"], imatrix_name=kw["imatrix_name"],
                                       overrides=overrides, n_threads=args.threads,
                                       progress=lambda c, n: bar.update(n), split_max_bytes=split,
                                       device=args.device)
            result = results[0]
            for extra in results[1:]:
                log.info("wrote %s (%s bytes): the vision tower and projector", extra.path, f"{extra.size:,}")
        else:
            result = quantize_gguf(src, output, assignment, n_threads=args.threads,
                                   progress=lambda c, n: bar.update(n), split_max_bytes=split, device=args.device,
                                   **kw)
    if len(result.files) > 1:
        log.info("split into %d shards (llama.cpp loads them from %s)", len(result.files), result.files[0].name)
    log.info("wrote %s (%s bytes, %.3f bits per weight)", result.path, f"{result.size:,}",
             8.0 * result.size / sum(c.n_elements for c in assignment.choices))
    if args.json:
        json.dump(_summary(assignment, result.size) | {"path": str(result.path)}, sys.stdout, indent=1)
        print()
    return 0
