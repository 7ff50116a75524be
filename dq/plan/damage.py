"""The damage model: the predicted mean KL divergence of every tensor at every candidate type.

The analysis measures it directly (``kld`` per tensor and type, :mod:`dq.analysis.gradients`): the second
order of ``KL(base || quant)`` in the tensor's quantization error, from probe gradients drawn at the
logits with the softmax Hessian as covariance. Quantization errors of different tensors are independent,
so the cross terms vanish in expectation and the model's prediction for a whole plan is the sum over
tensors (``FORM``). ``bench/damage_model.py`` checks both choices against measured KLD of random mixed
plans and single-role perturbations (Spearman rho, median relative error) on every benchmark model.

Measured response factors: the analysis also measures, for every role and a few anchor types, the KLD of
the model with all of that role's tensors quantized at once (:mod:`dq.analysis.responses`). The ratio of
that measurement to the summed predictions of the same tensors is the role's response factor at that type;
between anchors it is interpolated in bits per weight (log-linear), beyond them held at the nearest anchor,
and every tensor of the role is priced at its prediction times the factor (``FORM``; the plan file records
the factors). On Qwen2.5-Coder-1.5B the raw second order under-prices ffn_down and attn_q against ffn_gate
by up to 1.6x at 2 bits; the factors correct the allocation for it.

Tensors no probe reached (a vision tower, under text calibration) have no ``kld``; they are priced from
their local error (activation error, else imatrix-weighted, else plain weight error) times the median
ratio of ``kld`` to that error over the tensors of the same role, or of all tensors where the role has
none. The policy keeps them high anyway.

Example:
    >>> dm = DamageModel.from_analysis(analysis)           # doctest: +SKIP
    >>> dm.damage("blk.0.ffn_down.weight", QuantFormat.Q2_K)   # doctest: +SKIP
    0.0123
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from dq.analysis.artifact import Analysis, TensorMeasurement
from dq.analysis.responses import RoleResponse
from dq.errors import PlanError
from dq.quant.formats import FORMATS, QuantFormat

__all__ = ["FORM", "FORM_RESPONSES", "DamageModel", "local_error", "response_factors", "factor_at"]

log = logging.getLogger(__name__)

FORM = "additive second-order KL: predicted mean KLD of a plan = sum over tensors of kld[tensor, type]"
FORM_RESPONSES = ("additive second-order KL with measured role responses: predicted mean KLD of a plan = sum over "
                  "tensors of kld[tensor, type] x factor[role, type], factor = measured KLD of the whole role "
                  "at an anchor type / its summed kld, log-linear in bits per weight between anchors")


def response_factors(responses: list[RoleResponse], kld: Mapping[str, Mapping[QuantFormat, float]]
                     ) -> dict[str, dict[QuantFormat, float]]:
    """role -> anchor type -> measured KLD / summed predicted KLD of the tensors the measurement quantized.

    Anchors whose measurement or prediction is not positive (or names a tensor without a prediction) are left
    out."""
    out: dict[str, dict[QuantFormat, float]] = {}
    for r in responses:
        pred = [kld.get(n, {}).get(r.type) for n in r.tensors]
        if not pred or any(p is None for p in pred) or sum(pred) <= 0 or r.kld <= 0:
            continue
        out.setdefault(r.role, {})[r.type] = r.kld / sum(pred)
    return out


def factor_at(anchors: Mapping[QuantFormat, float], fmt: QuantFormat) -> float:
    """The response factor at ``fmt``: log-linear in bits per weight between anchors, flat beyond them."""
    pts = sorted((FORMATS[a].bits_per_weight, np.log(f)) for a, f in anchors.items())
    b = FORMATS[fmt].bits_per_weight
    return float(np.exp(np.interp(b, [p[0] for p in pts], [p[1] for p in pts])))


def local_error(m: TensorMeasurement, fmt: QuantFormat) -> float | None:
    """The tensor's own error at ``fmt``: activation error, else imatrix-weighted, else weight error."""
    e = m.error_for(fmt)
    if e is None:
        return None
    for v in (e.act_err, e.weighted_err, e.weight_err):
        if v is not None:
            return float(v)
    return None


@dataclass(frozen=True)
class DamageModel:
    """Predicted KLD per (tensor, type), with the record of how it was made.

    Attributes:
        kld: GGUF name -> type -> predicted mean KLD (nats per token) of quantizing that tensor alone.
        estimated: names whose values are local error x a role's median ratio (no probe reached them).
        info: what the plan file records (form, probes, how estimated tensors were priced).
    """

    kld: Mapping[str, Mapping[QuantFormat, float]]
    estimated: frozenset[str] = frozenset()
    info: Mapping[str, Any] = field(default_factory=dict)

    def damage(self, name: str, fmt: QuantFormat) -> float | None:
        return self.kld.get(name, {}).get(fmt)

    @classmethod
    def from_analysis(cls, analysis: Analysis) -> DamageModel:
        """The damage model of one analysis.

        Raises:
            PlanError: the analysis holds no predicted KLD (it predates the damage gradients).
        """
        measured: dict[str, dict[QuantFormat, float]] = {}
        ratios: dict[str, list[float]] = {}
        for t in analysis.tensors:
            row = {e.requested: float(e.kld) for e in t.errors if e.kld is not None}
            if not row:
                continue
            measured[t.name] = row
            for fmt, k in row.items():
                err = local_error(t, fmt)
                if err and err > 0 and k > 0:
                    ratios.setdefault(t.role.value, []).append(k / err)
        if not measured:
            raise PlanError("the analysis holds no predicted KLD per tensor (made by an older dq?); re-run "
                            "`dq analyze` with this dq")
        every = [r for rs in ratios.values() for r in rs]
        overall = float(np.median(every)) if every else 1.0
        estimated = set()
        for t in analysis.tensors:
            if t.name in measured or not t.errors:
                continue
            gain = float(np.median(ratios[t.role.value])) if ratios.get(t.role.value) else overall
            row = {}
            for e in t.errors:
                err = local_error(t, e.requested)
                if err is not None:
                    row[e.requested] = gain * err
            if row:
                measured[t.name] = row
                estimated.add(t.name)
        if estimated:
            log.info("damage model: %d tensor(s) without probe gradients priced from their local error",
                     len(estimated))
        dm_extra = dict(analysis.extra.get("damage_model") or {})
        info = {"form": FORM, **{k: v for k, v in dm_extra.items() if k != "form"},
                "estimated_tensors": sorted(estimated),
                "estimated_from": "local error x median kld/local-error ratio of the same role"}
        responses = [RoleResponse.from_dict(d) for d in analysis.extra.get("responses") or ()]
        factors = response_factors(responses, measured) if responses else {}
        if factors:
            role_of = {t.name: t.role.value for t in analysis.tensors}
            measured = {n: ({f: k * factor_at(factors[role_of[n]], f) for f, k in row.items()}
                            if role_of.get(n) in factors else row) for n, row in measured.items()}
            info["form"] = FORM_RESPONSES
            info["response_factors"] = {role: {f.value: round(v, 4) for f, v in fs.items()}
                                        for role, fs in factors.items()}
            log.info("damage model: measured response factors for %d roles (%s)", len(factors),
                     ", ".join(f"{r} {min(fs.values()):.2f}-{max(fs.values()):.2f}" for r, fs in factors.items()))
        return cls(measured, frozenset(estimated), info)
