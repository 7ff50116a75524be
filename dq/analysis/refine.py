"""``--refine``: correct the damage model with measured KL divergence, within the same budget.

The first plan rests on a first-order model (single-tensor gains, additive damage). Refinement
measures instead of predicting, in the spirit of exllamav3's measured ΔKLD per byte:

1. quantize the current plan and measure its real mean KLD against the base model (llama.cpp, on
   calibration text — never the held-out evaluation text);
2. for each tensor role group (attn_q, attn_v, ffn_down, ...), raise every tensor of the group one step
   and measure the real ΔKLD; the ratio of measured to predicted ΔKLD corrects that group's gains;
3. re-solve the knapsack with the corrected gains under the same budget; keep the new plan only if
   its measured KLD is lower, else stop.
Each probe costs one quantization and one KLD pass, so the default is one round.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dq.analysis.allocate import allocate, build_items
from dq.analysis.planning import PlanInputs
from dq.analysis.policy import Policy
from dq.quant.assign import assign_types, read_source_tensors
from dq.quant.plan import QuantPlan

__all__ = ["RefineStep", "refine_plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RefineStep:
    what: str
    bytes: int
    measured_kld: float
    predicted_damage: float


def _measure(inputs: PlanInputs, plan_types: Mapping, workdir: Path, text_file: Path, chunks: int, ctx: int) -> float:
    from dq.evals.kld import KLDConfig, run_kld
    from dq.export.gguf_quantize import quantize_gguf

    sources = read_source_tensors(inputs.source_gguf)
    out = workdir / "probe.gguf"
    quantize_gguf(inputs.source_gguf, out, assign_types(sources, explicit=dict(plan_types)), imatrix=inputs.imatrix,
                  imatrix_name=inputs.imatrix_path.name if inputs.imatrix_path else None)
    r = run_kld(out, inputs.source_gguf, KLDConfig(ctx=ctx, chunks=chunks, text=str(text_file)),
                cache_root=workdir / "cache")
    return float(r.kld_mean)


def refine_plan(
    inputs: PlanInputs,
    plan: QuantPlan,
    gains: Mapping[str, float],
    *,
    policy: Policy | None = None,
    header_bytes: int,
    rounds: int = 1,
    chunks: int = 4,
    ctx: int = 512,
) -> tuple[QuantPlan, list[RefineStep]]:
    """Improve ``plan`` by measured KLD (see module docstring); returns the best plan and the log."""
    from dq.data import calibration_text

    policy = policy or Policy()
    sources = read_source_tensors(inputs.source_gguf)
    steps: list[RefineStep] = []
    with tempfile.TemporaryDirectory(prefix="dq-refine-") as tmp:
        work = Path(tmp)
        text_file = work / "calib.txt"
        text_file.write_text(calibration_text()[-400_000:])
        best, best_kld = plan, _measure(inputs, plan.explicit_types(), work, text_file, chunks, ctx)
        steps.append(RefineStep("initial plan", plan.total_bytes, best_kld, plan.predicted_damage))
        gains = dict(gains)
        for _ in range(rounds):
            items, _ = build_items(inputs.analysis, sources, policy, gains)
            by_role: dict[str, list] = {}
            for it in items:
                by_role.setdefault(it.role.value, []).append(it)
            correction: dict[str, float] = {}
            for role, group in by_role.items():
                types = dict(best.explicit_types())
                predicted = 0.0
                for it in group:
                    cur = next((o for o in it.options if o.fmt is types[it.name]), None)
                    higher = [o for o in it.options if cur is not None and o.nbytes > cur.nbytes]
                    if higher:
                        up = min(higher, key=lambda o: o.nbytes)
                        types[it.name] = up.fmt
                        predicted += cur.damage - up.damage
                if predicted <= 0:
                    continue
                measured = best_kld - _measure(inputs, types, work, text_file, chunks, ctx)
                correction[role] = min(10.0, max(0.1, measured / predicted))
                log.info("refine: raising %s one step: measured ΔKLD %.4g vs predicted %.4g", role, measured, predicted)
            for it in items:
                gains[it.name] = gains.get(it.name, 1.0) * correction.get(it.role.value, 1.0)
            candidate = allocate(inputs.analysis, sources, plan.budget_bytes, header_bytes=header_bytes, policy=policy,
                                 gains=gains, analysis_path=plan.analysis,
                                 damage_model=plan.damage_model + "; gains corrected by measured KLD (--refine)")
            kld = _measure(inputs, candidate.explicit_types(), work, text_file, chunks, ctx)
            steps.append(RefineStep("re-solved with corrected gains", candidate.total_bytes, kld, candidate.predicted_damage))
            if kld >= best_kld:
                break
            best, best_kld = candidate, kld
    return best, steps
