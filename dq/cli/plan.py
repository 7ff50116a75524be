"""``dq plan``: choose a GGML type per tensor under a byte budget, from a ``dq analyze`` directory.

Examples:
    dq plan out/smollm2 --target-size 80MB -o plan.yaml
    dq plan out/smollm2 --target-bpw 2.5 -o plan.yaml --policy policy.yaml
    dq quantize smollm2-135m --plan plan.yaml -o m.gguf
    dq plan --dry-run --config deepseek-r1/config.json --tokenizer DIR --policy unsloth-iq1_s   # size only
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

from dq.plan.artifact import QuantPlan


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("plan", help="allocate types under a size budget", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("analysis", type=Path, nargs="?", default=None,
                   help="directory (or analysis.json) written by `dq analyze`")
    add_budget_args(p)
    p.add_argument("--dry-run", action="store_true",
                   help="with --config: a size-only plan (every tensor at its policy floor), no weights needed")
    p.add_argument("--config", type=Path, default=None,
                   help="with --dry-run: the model's config.json (tensors from llama.cpp's converter, no weights)")
    p.add_argument("--tokenizer", type=Path, default=None,
                   help="with --config: a directory holding a tokenizer the converter accepts (default: SmolLM2's)")
    p.add_argument("-o", "--output", type=Path, default=Path("plan.yaml"), help="plan file (.yaml or .json)")
    p.add_argument("--json", action="store_true", help="print the plan as JSON on stdout")
    p.set_defaults(func=run)


def add_budget_args(p: argparse.ArgumentParser) -> None:
    """Budget and policy options shared with `dq quantize --plan auto`."""
    p.add_argument("--target-size", default=None, help="whole-file budget, e.g. 80MB, 1.5GB, 700MiB")
    p.add_argument("--target-bpw", type=float, default=None, help="budget in bits per weight over all tensors")
    p.add_argument("--policy", default=None,
                   help="a policy preset (default, unsloth-moe, unsloth-iq1_s, unsloth-iq1_m, unsloth-iq2_xxs, "
                        "unsloth-q2_k_xl) or a YAML file of overrides (role_floors, ...)")


def load_policy(path: Path | str | None):
    """``--policy``: a preset name (``unsloth-moe``, ...) or a YAML file of overrides; default: the default."""
    import yaml

    from dq.errors import PlanError
    from dq.plan.policy import PRESETS, Policy

    if path is None:
        return Policy()
    if str(path) in PRESETS:
        return Policy.named(str(path))
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"policy {str(path)!r} is neither a preset ({', '.join(PRESETS)}) nor an existing YAML file")
    return Policy.from_dict(yaml.safe_load(path.read_text()) or {})


def build_plan(analysis_path: Path, args: argparse.Namespace):
    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan
    from dq.quant.assign import read_source_tensors

    inputs = load_plan_inputs(analysis_path)
    n = sum(math.prod(s.shape) for s in read_source_tensors(inputs.source_gguf))
    budget = budget_bytes(args.target_size, args.target_bpw, n)
    plan = make_plan(inputs, budget, policy=load_policy(args.policy))
    return inputs, plan


def print_summary(plan: QuantPlan, file=None) -> None:
    file = file or sys.stdout
    by_type: Counter[str] = Counter()
    bytes_by_type: Counter[str] = Counter()
    for t in plan.tensors.values():
        by_type[t.type.value] += 1
        bytes_by_type[t.type.value] += t.bytes
    print(f"model: {plan.model}", file=file)
    print(f"file size: {plan.total_bytes:,} bytes (budget {plan.budget_bytes:,}); predicted mean KLD "
          f"{plan.predicted_damage:.4g}", file=file)
    print(f"{'type':>8}  {'tensors':>7}  {'bytes':>14}", file=file)
    for fmt, n in sorted(by_type.items(), key=lambda kv: -bytes_by_type[kv[0]]):
        print(f"{fmt:>8}  {n:>7}  {bytes_by_type[fmt]:>14,}", file=file)
    print("\nllama-quantize equivalent (per-tensor, anchored):", file=file)
    print("llama-quantize --imatrix imatrix.gguf \\", file=file)
    for line in plan.llama_quantize_args():
        print(f"  {line} \\", file=file)
    print("  model-bf16.gguf out.gguf Q8_0", file=file)


def _size_only(args: argparse.Namespace) -> int:
    from dq.convert.shapes import tensors_from_config
    from dq.errors import PlanError
    from dq.models import materialize
    from dq.plan.sizes import floor_plan

    if args.config is None or not args.config.is_file():
        raise PlanError("--dry-run needs --config CONFIG.json (a size-only plan from the model's config)")
    tensors = tensors_from_config(args.config, args.tokenizer or materialize("smollm2-135m"))
    fp = floor_plan(tensors, load_policy(args.policy))
    if args.json:
        json.dump({"tensor_bytes": fp.tensor_bytes, "bits_per_weight": fp.bits_per_weight,
                   "by_role": fp.by_role, "types": {k: v.value for k, v in fp.types.items()}}, sys.stdout, indent=1)
        print()
        return 0
    print(f"{len(tensors)} tensors, {fp.n_weights / 1e9:.1f} B weights; policy {args.policy or 'default'}: "
          f"{fp.tensor_bytes / 1e9:.1f} GB ({fp.tensor_bytes / 2**30:.1f} GiB), {fp.bits_per_weight:.3f} bits/weight")
    print(f"{'role':>14}  {'weights':>10}  {'GB':>8}  {'bits':>6}")
    for role, (w, b) in sorted(fp.by_role.items(), key=lambda kv: -kv[1][1]):
        print(f"{role:>14}  {w / 1e9:>9.2f}B  {b / 1e9:>8.2f}  {8 * b / w:>6.2f}")
    return 0


def run(args: argparse.Namespace) -> int:
    from dq.atomic import check_writable
    from dq.errors import PlanError

    if args.dry_run:
        return _size_only(args)
    if args.analysis is None:
        raise PlanError("dq plan needs an analysis directory (from `dq analyze`), or --dry-run --config for sizes")

    check_writable(args.output)
    _, plan = build_plan(args.analysis, args)
    plan.save(args.output)
    if args.json:
        json.dump(plan.to_dict(), sys.stdout, indent=1)
        print()
    else:
        print_summary(plan)
        print(f"\nwrote {args.output}")
    return 0
