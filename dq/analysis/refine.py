"""``--refine``: correct the damage model with measured KL divergence, within the same budget.

The first plan rests on a first-order model (single-tensor gains, additive damage). Refinement
measures instead of predicting, in the spirit of exllamav3's measured ΔKLD per byte:

1. quantize the current plan and measure its real mean KLD against the base model (llama.cpp, on
   calibration text — never the held-out evaluation text);
2. for each tensor role group (attn_q, attn_v, ffn_down, ...), raise every tensor of the group one step
   and measure the real ΔKLD; the ratio of measured to predicted ΔKLD corrects that group's gains;
3. re-solve the knapsack with the corrected gains under the same budget; keep the new plan only if
   its measured KLD is lower, else stop;
4. measured swaps (exllamav3's method): for every role group, measure raising *and* lowering the whole
   group one step, whatever the model predicts (gain correction cannot fix a prediction of the wrong
   sign, e.g. on weights that came from a quantized file, where the original grid beats a larger type);
   then try the best single moves and raise+lower pairs that fit the budget, ranked by measured ΔKLD,
   and keep the first one whose measured KLD is lower.
Each probe costs one quantization and one KLD pass (2 per role group in step 4), so the default is
one round.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from dq.analysis.allocate import Item, Option, allocate, build_items, plan_from_picks
from dq.analysis.planning import PlanInputs
from dq.analysis.policy import Policy
from dq.quant.assign import assign_types, read_source_tensors
from dq.quant.plan import QuantPlan

__all__ = ["RefineStep", "refine_plan"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _Probe:
    role: str
    up: bool
    picks: dict[str, Option]
    dbytes: int
    gain: float  # measured KLD decrease; negative when the move hurts


def _current(it: Item, types: Mapping) -> Option | None:
    """The option of ``it`` that the plan's ``types`` chose (None if the plan holds another type)."""
    return next((o for o in it.options if o.fmt is types.get(it.name)), None)


def _step(it: Item, cur: Option, up: bool) -> Option | None:
    """``it``'s next option by bytes above (``up``) or below ``cur``, or None at the end of its ladder."""
    opts = [o for o in it.options if (o.nbytes > cur.nbytes if up else o.nbytes < cur.nbytes)]
    return (min if up else max)(opts, key=lambda o: o.nbytes) if opts else None


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
    swaps: bool = True,
    swap_tries: int = 2,
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
        measured: dict[tuple, float] = {}

        def measure(types: Mapping) -> float:
            # one quantization + KLD pass per distinct assignment (the swap probes repeat the raises above)
            key = tuple(sorted((n, f.value) for n, f in types.items()))
            if key not in measured:
                measured[key] = _measure(inputs, types, work, text_file, chunks, ctx)
            return measured[key]

        best, best_kld = plan, measure(plan.explicit_types())
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
                    cur = _current(it, types)
                    up = _step(it, cur, up=True) if cur is not None else None
                    if up is not None:
                        types[it.name] = up.fmt
                        predicted += cur.damage - up.damage
                if predicted <= 0:
                    continue
                delta = best_kld - measure(types)
                correction[role] = min(10.0, max(0.1, delta / predicted))
                log.info("refine: raising %s one step: measured ΔKLD %.4g vs predicted %.4g", role, delta, predicted)
            for it in items:
                gains[it.name] = gains.get(it.name, 1.0) * correction.get(it.role.value, 1.0)
            candidate = allocate(inputs.analysis, sources, plan.budget_bytes, header_bytes=header_bytes, policy=policy,
                                 gains=gains, analysis_path=plan.analysis,
                                 damage_model=plan.damage_model + "; gains corrected by measured KLD (--refine)")
            kld = measure(candidate.explicit_types())
            steps.append(RefineStep("re-solved with corrected gains", candidate.total_bytes, kld, candidate.predicted_damage))
            if kld >= best_kld:
                break
            best, best_kld = candidate, kld
        if swaps:
            items, _ = build_items(inputs.analysis, sources, policy, gains)

            def make(picks: Mapping[str, Option]) -> QuantPlan:
                return plan_from_picks(inputs.analysis, sources, items, picks, plan.budget_bytes,
                                       header_bytes=header_bytes, policy=policy, analysis_path=plan.analysis,
                                       damage_model=best.damage_model + "; measured swaps (--refine)")

            best, best_kld = _swap_round(best, best_kld, items, measure, make, steps, swap_tries)
    return best, steps


def _swap_round(best: QuantPlan, best_kld: float, items: list[Item], measure, make, steps: list[RefineStep],
                tries: int) -> tuple[QuantPlan, float]:
    """Step 4 of the module docstring: probe every role group one step up and down, then try moves."""
    types = best.explicit_types()
    cur = {it.name: o for it in items if (o := _current(it, types)) is not None}
    by_role: dict[str, list[Item]] = {}
    for it in items:
        if it.name in cur:
            by_role.setdefault(it.role.value, []).append(it)
    probes: list[_Probe] = []
    for role, group in by_role.items():
        for up in (True, False):
            picks = {it.name: o for it in group if (o := _step(it, cur[it.name], up)) is not None}
            if not picks:
                continue
            dbytes = sum(o.nbytes - cur[n].nbytes for n, o in picks.items())
            gain = best_kld - measure({**types, **{n: o.fmt for n, o in picks.items()}})
            probes.append(_Probe(role, up, picks, dbytes, gain))
            log.info("refine: %s %s one step: %+d bytes, measured ΔKLD %+.4g", "raising" if up else "lowering",
                     role, dbytes, -gain)
    slack = best.budget_bytes - best.total_bytes
    moves = [(p.gain, (p,)) for p in probes if p.dbytes <= slack and p.gain > 0]
    moves += [(a.gain + b.gain, (a, b)) for a in probes for b in probes
              if a.up and not b.up and a.role != b.role and a.dbytes + b.dbytes <= slack and a.gain + b.gain > 0]
    moves.sort(key=lambda m: -m[0])
    for _, combo in moves[:tries]:
        picks = dict(cur)
        for p in combo:
            picks.update(p.picks)
        candidate = make(picks)
        kld = measure(candidate.explicit_types())
        what = "measured swap: " + " + ".join(f"{'raise' if p.up else 'lower'} {p.role}" for p in combo)
        steps.append(RefineStep(what, candidate.total_bytes, kld, candidate.predicted_damage))
        if kld < best_kld:
            return candidate, kld
    return best, best_kld
