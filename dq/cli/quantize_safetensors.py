"""``dq quantize --format safetensors``: a dynamic 4-bit bitsandbytes (NF4) checkpoint.

Kept apart from ``dq.cli.quantize`` (GGUF); that module adds the options below to its parser and calls
:func:`run_safetensors` when ``--format safetensors`` is given. Options shared with the GGUF path keep
their names: ``model``, ``-o``, ``--plan`` (``auto``, an ``analysis.json``, or a ``dq_plan.json`` to reuse),
``--analysis``, ``--target-size``/``--target-bpw`` (size budget), ``--dry-run``, ``--json``.

Examples:
    dq quantize MODEL_DIR --format safetensors -o out/m-dyn-nf4                  # --plan auto: measure NF4 damage
    dq quantize MODEL_DIR --format safetensors --keep-fraction 0.1               # ~10% of linear weights 16-bit
    dq quantize MODEL_DIR --format safetensors --analysis analysis/ -o out/m-nf4 # from `dq analyze`
    dq quantize MODEL_DIR --format safetensors --target-size 120MB               # size budget
    dq quantize MODEL_DIR --format safetensors --keep model.layers.2.mlp.down_proj --dry-run --json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from dq.errors import PlanError

__all__ = ["add_safetensors_arguments", "run_safetensors"]

log = logging.getLogger("dq.cli.quantize")


def add_safetensors_arguments(p: argparse.ArgumentParser) -> None:
    """The options only ``--format safetensors`` uses (the shared ones are listed in the module docstring)."""
    g = p.add_argument_group("safetensors (bitsandbytes NF4) output, with --format safetensors")
    g.add_argument("--keep-fraction", type=float, default=None, metavar="F",
                   help="keep up to this fraction of linear weights in 16-bit, worst NF4 error first "
                        "(default: only modules that stand out, super weights, vision, lm_head)")
    g.add_argument("--keep", action="append", default=None, metavar="MODULE",
                   help="keep exactly these modules in 16-bit (full names, repeatable); overrides --plan")
    g.add_argument("--calib", type=Path, default=None, help="calibration text file for --plan auto")
    g.add_argument("--calib-tokens", type=int, default=2048, help="calibration tokens for --plan auto (default 2048)")
    g.add_argument("--no-double-quant", action="store_true", help="store NF4 block scales in fp32 (bigger, as QLoRA without DQ)")
    g.add_argument("--overwrite", action="store_true", help="replace an existing output directory")


def _plan_source(plan: str | None, analysis: Path | None):
    """(keep set, analysis) from ``--plan`` and ``--analysis``."""
    if analysis is not None:
        from dq.analysis.artifact import Analysis

        if plan not in (None, "auto"):
            raise PlanError("give --plan FILE or --analysis DIR, not both")
        return None, Analysis.load(analysis)
    if plan in (None, "auto"):
        return None, None
    path = Path(plan).expanduser()
    if not path.exists():
        raise PlanError(f"--plan {plan!r}: no such file; pass `auto`, an analysis.json from `dq analyze`, or a dq_plan.json")
    if path.is_dir():
        path = path / "dq_plan.json" if (path / "dq_plan.json").is_file() else path / "analysis.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise PlanError(f"--plan {str(path)!r} is not readable JSON ({exc}); pass `auto` or a dq analysis/plan file") from exc
    if isinstance(data, dict) and "modules" in data and "quant_type" in data:
        from dq.export.bnb_plan import BnbPlan

        return {m.name for m in BnbPlan.from_dict(data).kept if m.reason.value != "output"}, None
    if isinstance(data, dict) and "tensors" in data and "candidates" in data:
        from dq.analysis.artifact import Analysis

        return None, Analysis.from_dict(data)
    raise PlanError(f"--plan {str(path)!r} is neither a dq analysis (analysis.json) nor a dq_plan.json; GGUF plans "
                    f"from `dq plan` set GGML types and do not apply to --format safetensors")


def _target_bytes(model: Path, target_size: str | None, target_bpw: float | None) -> int | None:
    if target_size is None and target_bpw is None:
        return None
    import math

    from safetensors import safe_open

    from dq.plan.planner import budget_bytes

    n = 0
    for f in sorted(model.glob("*.safetensors")):
        with safe_open(f, "pt") as fh:
            n += sum(math.prod(fh.get_slice(k).get_shape()) for k in fh.keys())
    return budget_bytes(target_size, target_bpw, n)


def _print_plan(result) -> None:
    plan = result.plan
    w = max(len(m.name) for m in plan.modules)
    print(f"{'module':<{w}}  {'shape':>11}  {'stored':>6}  {'reason':<12}  {'NF4 act_err':>11}")
    for m in plan.modules:
        err = f"{m.act_err:.5f}" if m.act_err is not None else "-"
        print(f"{m.name:<{w}}  {'x'.join(map(str, m.shape)):>11}  {'NF4' if m.quantize else '16-bit':>6}  "
              f"{m.reason.value:<12}  {err:>11}")
    s = plan.summary()
    print(f"total: {result.size_bytes:,} bytes ({result.size_bytes / 2**20:.2f} MiB, {result.bits_per_weight:.3f} bits "
          f"per weight); {s['n_kept']} of {s['n_modules']} linear modules 16-bit "
          f"({100 * s['kept_param_fraction']:.1f}% of linear weights): {s['kept_by_reason']}")


def run_safetensors(args: argparse.Namespace) -> int:
    """``dq quantize --format safetensors``: returns the exit code."""
    from tqdm import tqdm

    from dq.export.safetensors_bnb import quantize_safetensors_bnb
    from dq.models import resolve_model

    model = resolve_model(args.model)
    if model.is_file():
        raise PlanError(f"--format safetensors needs a Hugging Face model directory, not {model.name}; "
                        f"pass the directory (or use the default GGUF format for .gguf input)")
    output = args.output or Path(f"{model.name}-nf4-dyn")
    keep, analysis = (set(args.keep), None) if args.keep else _plan_source(getattr(args, "plan", None),
                                                                           getattr(args, "analysis", None))
    target = _target_bytes(model, getattr(args, "target_size", None), getattr(args, "target_bpw", None))
    bars: dict[str, tqdm] = {}

    def progress(stage: str, done: int, total: int) -> None:
        bar = bars.get(stage)
        if bar is None:
            bar = bars[stage] = tqdm(total=total, desc=stage, file=sys.stderr, disable=None)
        bar.update(done - bar.n)

    try:
        result = quantize_safetensors_bnb(
            model, output, keep=keep, keep_fraction=args.keep_fraction, analysis=analysis, calib_file=args.calib,
            n_tokens=args.calib_tokens, double_quant=not args.no_double_quant, overwrite=args.overwrite,
            target_bytes=target, dry_run=args.dry_run, progress=progress)
    finally:
        for bar in bars.values():
            bar.close()
    if args.json:
        out = {"path": None if args.dry_run else str(result.path), "size_bytes": result.size_bytes,
               "bits_per_weight": result.bits_per_weight, "n_params": result.n_params,
               "plan": result.plan.to_dict()}
        json.dump(out, sys.stdout, indent=1)
        print()
    else:
        _print_plan(result)
        if not args.dry_run:
            print(f"wrote {result.path}")
    return 0
