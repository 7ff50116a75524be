"""Bit allocation under a byte budget: a multiple-choice knapsack solved exactly with HiGHS (scipy).

Each quantizable tensor picks one type from its allowed candidates (``Policy``). Its cost is the exact
number of bytes it adds to the GGUF (stored bytes after llama.cpp's block-size fallback, padded to the
file's alignment); its damage is the damage model's predicted KLD of that tensor at that type
(:mod:`dq.plan.damage`), so the objective is the plan's predicted mean KLD. Header and non-quantizable
tensors are fixed bytes. The MILP

    minimise  sum_t sum_k damage[t,k] x[t,k]
    s.t.      sum_k x[t,k] = 1            for every tensor t
              sum_t sum_k bytes[t,k] x[t,k] <= budget - fixed
              x binary

is solved to optimality (HiGHS branch and bound), so the plan is the best under the damage model.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from dq.analysis.artifact import Analysis
from dq.analysis.roles import TensorRole, classify, layer_index
from dq.errors import BudgetError, PlanError
from dq.plan.artifact import PlanTensor, QuantPlan, tensor_fingerprint
from dq.plan.damage import DamageModel
from dq.plan.policy import Policy
from dq.quant.assign import SourceTensor
from dq.quant.formats import FORMATS, QuantFormat, effective_format, tensor_nbytes
from dq.quant.gguf_writer import DEFAULT_ALIGNMENT, padded_size

__all__ = ["Option", "Item", "build_items", "solve", "allocate", "plan_from_picks"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Option:
    fmt: QuantFormat  # requested (what the plan says)
    stored: QuantFormat
    nbytes: int  # padded to the file alignment
    damage: float


@dataclass(frozen=True)
class Item:
    name: str
    role: TensorRole
    options: tuple[Option, ...]
    floor_reason: str


def build_items(
    analysis: Analysis,
    sources: Sequence[SourceTensor],
    policy: Policy,
    damage: DamageModel,
    alignment: int = DEFAULT_ALIGNMENT,
    imatrix_names: frozenset[str] | None = None,
) -> tuple[list[Item], list[SourceTensor]]:
    """Knapsack items for the quantizable tensors, and the tensors kept as they are.

    With ``imatrix_names`` (the tensors the imatrix covers), types that need an imatrix are offered only to
    those tensors: llama.cpp refuses to write them without one (the embedding, MLA's attn_k_b/attn_v_b).
    """
    super_tensors = {s.tensor for s in analysis.super_weights
                     if s.ablation_ppl_ratio is None or s.ablation_ppl_ratio >= policy.super_weight_min_ppl_ratio}
    # a confirmed super expert protects its layer's merged expert tensors (one type holds every expert)
    super_layers = {e["layer"] for e in analysis.extra.get("super_experts", ())
                    if (e.get("ablation_kld") or 0.0) >= policy.super_expert_min_kld}
    items, kept = [], []
    moe_layers = sorted({layer_index(s.name) for s in sources if classify(s.name) is TensorRole.EXPERT_DOWN})
    for src in sources:
        role = classify(src.name)
        # llama.cpp quantizes only 2-D and 3-D tensors whose name ends in "weight" (expert biases stay)
        if len(src.shape) < 2 or not src.name.endswith("weight") or Policy.kept(role):
            kept.append(src)
            continue
        layer_of = layer_index(src.name)
        holds_sw = src.name in super_tensors or (
            role in (TensorRole.EXPERT_GATE, TensorRole.EXPERT_UP, TensorRole.EXPERT_DOWN) and layer_of in super_layers)
        layer = layer_index(src.name)
        moe_layer = moe_layers.index(layer) if layer in moe_layers else None
        allowed = policy.allowed(role, layer, holds_sw, analysis.candidates, moe_layer)
        opts = []
        for fmt in allowed:
            stored = fmt if FORMATS[fmt].is_float else effective_format(fmt, src.shape)
            if imatrix_names is not None and FORMATS[stored].needs_imatrix and src.name not in imatrix_names:
                continue
            if FORMATS[fmt].is_float:
                d = 0.0
            else:
                d = damage.damage(src.name, fmt)
                if d is None:
                    continue
            opts.append(Option(fmt, stored, padded_size(tensor_nbytes(stored, src.shape), alignment), d))
        if not opts:
            kept.append(src)  # nothing measured and no float option: leave it as it is
            log.warning("no measured candidate for %s: kept in %s", src.name, src.fmt)
            continue
        floor = policy.floor_for(role, layer, holds_sw, moe_layer)
        reason = f"policy floor {floor}"
        if holds_sw and policy.protect_super_weights:
            reason = "super weight" if src.name in super_tensors else "super expert"
        items.append(Item(src.name, role, tuple(opts), reason))
    return items, kept


def solve(items: Sequence[Item], capacity: int) -> list[int]:
    """Exact multiple-choice knapsack; returns the chosen option index per item.

    Raises:
        BudgetError: even the smallest option of every item exceeds ``capacity``.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    min_bytes = sum(min(o.nbytes for o in it.options) for it in items)
    if min_bytes > capacity:
        raise BudgetError(f"the budget leaves {capacity:,} bytes for weights but the smallest allowed types need "
                          f"{min_bytes:,}")
    n = sum(len(it.options) for it in items)
    cost = np.empty(n)
    size = np.empty(n)
    rows, cols = [], []
    k = 0
    for i, it in enumerate(items):
        for o in it.options:
            cost[k], size[k] = o.damage, o.nbytes
            rows.append(i)
            cols.append(k)
            k += 1
    scale = cost.max() if cost.max() > 0 else 1.0
    onehot = np.zeros((len(items), n))
    onehot[rows, cols] = 1.0
    constraints = [LinearConstraint(onehot, 1, 1), LinearConstraint(size[None, :], 0, capacity)]
    res = milp(cost / scale, constraints=constraints, integrality=np.ones(n), bounds=Bounds(0, 1),
               options={"mip_rel_gap": 1e-9, "time_limit": 120})
    if res.x is None:
        raise BudgetError(f"the allocation could not be solved ({res.message})")
    if res.status != 0:
        log.warning("HiGHS stopped early (%s); using its best plan", res.message)
    x = res.x.round().astype(int)
    choice, k = [], 0
    for it in items:
        sel = x[k : k + len(it.options)]
        choice.append(int(np.argmax(sel)))
        k += len(it.options)
    return choice


def allocate(
    analysis: Analysis,
    sources: Sequence[SourceTensor],
    budget_bytes: int,
    *,
    header_bytes: int,
    policy: Policy | None = None,
    damage: DamageModel | None = None,
    alignment: int = DEFAULT_ALIGNMENT,
    analysis_path: str | None = None,
    imatrix_names: frozenset[str] | None = None,
    mmproj_names: frozenset[str] = frozenset(),
) -> QuantPlan:
    """Choose every tensor's type so the whole GGUF is at most ``budget_bytes`` and predicted KLD is least.

    Args:
        analysis: measurements from ``dq analyze``.
        sources: the unquantized GGUF's tensors (all of them; fixed ones are priced as they are).
        budget_bytes: the whole file's size limit.
        header_bytes: exact size of the GGUF header (see ``dq.quant.layout.header_size``).
        policy: per-role floors (default :class:`Policy`).
        damage: the damage model (default: the analysis's own, :meth:`DamageModel.from_analysis`).
        imatrix_names: tensors the imatrix covers (None: offer every type to every tensor).
        mmproj_names: ``sources`` that live in a vision-language model's mmproj GGUF (the budget covers both
            files; the plan records which tensors go there).

    Raises:
        BudgetError: the budget is below the smallest achievable file; the message states that size.
    """
    policy = policy or Policy()
    damage = damage or DamageModel.from_analysis(analysis)
    items, kept = build_items(analysis, sources, policy, damage, alignment, imatrix_names)
    fixed = header_bytes + sum(padded_size(tensor_nbytes(s.fmt, s.shape), alignment) for s in kept)
    smallest = fixed + sum(min(o.nbytes for o in it.options) for it in items)
    if budget_bytes < smallest:
        raise BudgetError(
            f"budget {budget_bytes:,} bytes is below the smallest achievable file for this model and policy: "
            f"{smallest:,} bytes ({smallest / 1e6:.2f} MB); raise --target-size/--target-bpw or lower the "
            f"policy floors"
        )
    choice = solve(items, budget_bytes - fixed)
    return plan_from_picks(analysis, sources, items, {it.name: it.options[c] for it, c in zip(items, choice)},
                           budget_bytes, header_bytes=header_bytes, policy=policy, alignment=alignment,
                           analysis_path=analysis_path, damage_model=damage.info, mmproj_names=mmproj_names)


def plan_from_picks(
    analysis: Analysis,
    sources: Sequence[SourceTensor],
    items: Sequence[Item],
    picks: Mapping[str, Option],
    budget_bytes: int,
    *,
    header_bytes: int,
    policy: Policy,
    alignment: int = DEFAULT_ALIGNMENT,
    analysis_path: str | None = None,
    damage_model: Mapping[str, Any] | None = None,
    mmproj_names: frozenset[str] = frozenset(),
) -> QuantPlan:
    """The :class:`QuantPlan` that takes option ``picks[name]`` for every item (explicit choices, and
    :func:`allocate`'s solution); tensors that are not items are kept as they are.

    Raises:
        PlanError: the picks exceed the budget (callers check before).
    """
    by_name = {it.name: (it, picks[it.name]) for it in items}
    tensors: dict[str, PlanTensor] = {}
    damage = 0.0
    for src in sources:
        if src.name in by_name:
            it, o = by_name[src.name]
            lowest = min(it.options, key=lambda x: x.nbytes)
            reason = it.floor_reason if (o is lowest and len(it.options) > 1) else "optimiser"
            if it.floor_reason in ("super weight", "super expert"):
                reason = it.floor_reason
            tensors[src.name] = PlanTensor(o.fmt, it.role.value, o.nbytes, o.damage, reason)
            damage += o.damage
        else:
            tensors[src.name] = PlanTensor(src.fmt, classify(src.name).value,
                                           padded_size(tensor_nbytes(src.fmt, src.shape), alignment), 0.0, "kept")
    total = header_bytes + sum(t.bytes for t in tensors.values())
    if total > budget_bytes:
        raise PlanError(f"the chosen types take {total:,} bytes, over the budget of {budget_bytes:,}")
    return QuantPlan(
        model=analysis.model,
        fingerprint=tensor_fingerprint((s.name, s.shape) for s in sources),
        budget_bytes=budget_bytes,
        total_bytes=total,
        predicted_damage=damage,
        tensors=tensors,
        policy=policy.to_dict(),
        analysis=analysis_path,
        damage_model=dict(damage_model or {}),
        mmproj=tuple(s.name for s in sources if s.name in mmproj_names),
    )
