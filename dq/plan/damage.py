"""The damage model: the predicted mean KL divergence of every tensor at every candidate type.

The analysis measures it directly (``kld`` per tensor and type, :mod:`dq.analysis.gradients`): the second
order of ``KL(base || quant)`` in the tensor's quantization error, from probe gradients drawn at the
logits with the softmax Hessian as covariance. Quantization errors of different tensors are independent,
so the cross terms vanish in expectation and the model's prediction for a whole plan is the sum over
tensors (``FORM``). ``bench/damage_model.py`` checks both choices against measured KLD of random mixed
plans and single-role perturbations (Spearman rho, median relative error) on every benchmark model.

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
from dq.errors import PlanError
from dq.quant.formats import QuantFormat

__all__ = ["FORM", "DamageModel", "local_error"]

log = logging.getLogger(__name__)

FORM = "additive second-order KL: predicted mean KLD of a plan = sum over tensors of kld[tensor, type]"


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
        return cls(measured, frozenset(estimated), info)
