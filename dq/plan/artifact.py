"""``QuantPlan``: the readable, editable file ``dq plan`` writes and ``dq quantize --plan`` reads.

YAML (or JSON) with a ``version``; unknown keys are rejected at every level. The plan's ``predicted_damage``
is the damage model's predicted mean KLD (nats per token) and ``damage_model`` records that model's form.
Per tensor: the type, its role, stored bytes, predicted KLD and the reason (``optimiser``, ``policy floor``, ``super weight``,
``kept``). The plan records the model's tensor list fingerprint, so a plan made for another model is
refused, and can be turned into llama-quantize ``--tensor-type`` lines that reproduce the same file
with stock llama.cpp.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from dq.errors import CorruptFileError, PlanError, reject_unknown_keys
from dq.quant.formats import QuantFormat, parse_format

__all__ = ["PLAN_VERSION", "PlanTensor", "QuantPlan", "tensor_fingerprint"]

PLAN_VERSION = 2  # 2: damage_model is a mapping (form, probes, ...); predicted_damage is the predicted mean KLD
_READABLE_VERSIONS = (1, 2)


def tensor_fingerprint(tensors: Iterable[tuple[str, Sequence[int]]]) -> str:
    """A short hash of a model's tensor names and shapes: identifies the model a plan was made for."""
    h = hashlib.sha256()
    for name, shape in sorted((n, tuple(int(d) for d in s)) for n, s in tensors):
        h.update(f"{name}:{'x'.join(map(str, shape))};".encode())
    return h.hexdigest()[:16]


def _reject_unknown(where: str, d: Mapping[str, Any], allowed: Iterable[str]) -> None:
    reject_unknown_keys(where, d, allowed, PlanError)


def _damage_model(v: Any) -> dict[str, Any]:
    if not v:
        return {}
    return dict(v) if isinstance(v, Mapping) else {"form": str(v)}  # version 1 wrote a sentence


@dataclass(frozen=True)
class PlanTensor:
    """One tensor's decision."""

    type: QuantFormat
    role: str
    bytes: int
    damage: float
    reason: str

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.type.value, "role": self.role, "bytes": self.bytes,
                "damage": float(f"{self.damage:.6g}"), "reason": self.reason}

    @classmethod
    def from_dict(cls, name: str, d: Mapping[str, Any]) -> PlanTensor:
        _reject_unknown(f"plan tensor {name}", d, [f.name for f in fields(cls)])
        return cls(type=parse_format(d["type"]), role=str(d.get("role", "other")), bytes=int(d.get("bytes", 0)),
                   damage=float(d.get("damage", 0.0)), reason=str(d.get("reason", "edited")))


@dataclass(frozen=True)
class QuantPlan:
    """A type for every tensor of one model, with the budget and policy it was made under."""

    model: str
    fingerprint: str
    budget_bytes: int
    total_bytes: int
    predicted_damage: float
    tensors: Mapping[str, PlanTensor]
    policy: Mapping[str, Any] = field(default_factory=dict)
    analysis: str | None = None
    damage_model: Mapping[str, Any] = field(default_factory=dict)
    mmproj: tuple[str, ...] = ()  # tensors of a vision-language model's mmproj GGUF (the rest: the text GGUF)
    version: int = PLAN_VERSION

    def explicit_types(self, *, mmproj: bool | None = None) -> dict[str, QuantFormat]:
        """name -> type; ``mmproj=False``/``True``: only the text GGUF's / only the mmproj GGUF's tensors."""
        mm = set(self.mmproj)
        return {name: t.type for name, t in self.tensors.items() if mmproj is None or (name in mm) == mmproj}

    def check_model(self, tensors: Iterable[tuple[str, Sequence[int]]]) -> None:
        """Raise unless this plan was made for a model with exactly these tensors."""
        tensors = list(tensors)
        names = {n for n, _ in tensors}
        unknown = sorted(set(self.tensors) - names)
        if unknown:
            raise PlanError(
                f"the plan names {len(unknown)} tensor(s) this model does not have (e.g. {unknown[:3]}); "
                f"it was made for {self.model!r}: re-run `dq plan` on this model's analysis"
            )
        fp = tensor_fingerprint(tensors)
        if fp != self.fingerprint:
            raise PlanError(
                f"the plan was made for another model ({self.model!r}, fingerprint {self.fingerprint}, "
                f"this model's is {fp}); re-run `dq plan` on this model's analysis"
            )

    def llama_quantize_args(self) -> list[str]:
        """``--tensor-type`` arguments that make stock llama-quantize write the same types.

        Every tensor gets its own anchored rule, so no preset counter can shift; the base type given to
        llama-quantize does not matter then (use ``--allow-requantize`` only if the input is quantized).
        """
        return [f"--tensor-type '^{re.escape(name)}$={t.type.value.lower()}'" for name, t in self.tensors.items()
                if t.reason != "kept"]

    def to_dict(self) -> dict[str, Any]:
        n_bytes = sum(t.bytes for t in self.tensors.values())
        return {
            "version": self.version, "model": self.model, "fingerprint": self.fingerprint,
            "analysis": self.analysis, "budget_bytes": self.budget_bytes, "total_bytes": self.total_bytes,
            "tensor_bytes": n_bytes, "predicted_damage": float(f"{self.predicted_damage:.6g}"),
            "damage_model": dict(self.damage_model), "policy": dict(self.policy),
            **({"mmproj": list(self.mmproj)} if self.mmproj else {}),
            "tensors": {name: t.to_dict() for name, t in self.tensors.items()},
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> QuantPlan:
        allowed = [f.name for f in fields(cls)] + ["tensor_bytes"]
        _reject_unknown("plan", d, allowed)
        if d.get("version") not in _READABLE_VERSIONS:
            raise PlanError(f"plan version {d.get('version')!r} is not one of {_READABLE_VERSIONS}; re-run `dq plan`")
        if not isinstance(d.get("tensors"), Mapping) or not d["tensors"]:
            raise PlanError("plan has no `tensors` mapping")
        return cls(
            model=str(d["model"]), fingerprint=str(d["fingerprint"]), budget_bytes=int(d.get("budget_bytes", 0)),
            total_bytes=int(d.get("total_bytes", 0)), predicted_damage=float(d.get("predicted_damage", 0.0)),
            tensors={n: PlanTensor.from_dict(n, t) for n, t in d["tensors"].items()},
            policy=d.get("policy") or {}, analysis=d.get("analysis"), damage_model=_damage_model(d.get("damage_model")),
            mmproj=tuple(d.get("mmproj") or ()),
        )

    def save(self, path: str | Path) -> Path:
        import yaml

        from dq.atomic import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            if path.suffix == ".json":
                tmp.write_text(json.dumps(self.to_dict(), indent=1))
            else:
                tmp.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False, width=120))
        return path

    @classmethod
    def load(cls, path: str | Path) -> QuantPlan:
        import yaml

        path = Path(path)
        if not path.is_file():
            raise PlanError(f"plan file {str(path)!r} does not exist; write one with `dq plan ANALYSIS -o plan.yaml`")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            raise CorruptFileError(f"{path} is not valid YAML/JSON ({exc})") from exc
        if not isinstance(data, Mapping):
            raise CorruptFileError(f"{path} is not a dq plan (expected a mapping at the top level)")
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError) as exc:
            if isinstance(exc, PlanError):
                raise
            raise PlanError(f"{path} is not a valid dq plan ({exc})") from exc
