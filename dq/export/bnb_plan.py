"""Which modules of a dynamic 4-bit checkpoint stay in 16-bit: measurements, policy and the plan artifact.

Unsloth's dynamic 4-bit checkpoints quantize most ``nn.Linear`` modules with bitsandbytes NF4 and keep
the few that 4-bit breaks in 16-bit. dq decides from measurements, never from a hand-written list:

- ``act_err`` = ||X W^T - X Q(W)^T||^2 / ||X W^T||^2 of NF4 on calibration activations X (the same
  quantity ``dq analyze`` stores per GGUF type in ``Analysis``);
- super-weight modules (Yu et al. 2024, "The Super Weight in LLMs"): ``down_proj`` modules whose input
  carries a massive activation spike; a single weight there can decide the model's quality;
- vision towers and projectors (random-ish, small, and 4-bit hurts them most, as Unsloth found on Qwen2-VL);
- the output head (``lm_head``), which bitsandbytes loaders keep in 16-bit anyway.

The policy is a pure function, :func:`select_modules`, from measurements to a :class:`BnbPlan`; the plan
is a frozen, versioned artifact written next to the checkpoint as ``dq_plan.json``.
"""

from __future__ import annotations

import json
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from enum import Enum
from pathlib import Path
from typing import Any

from dq.analysis.roles import TensorRole, classify_module
from dq.errors import BudgetError, CorruptFileError, PlanError, reject_unknown_keys
from dq.plan.policy import Policy
from dq.quant.formats import FORMATS

__all__ = [
    "BNB_PLAN_VERSION",
    "PLAN_FILE",
    "Reason",
    "ModuleMeasurement",
    "ModuleChoice",
    "BnbPlan",
    "module_role",
    "select_modules",
    "measurements_from_analysis",
]

BNB_PLAN_VERSION = 1
PLAN_FILE = "dq_plan.json"

# Robust z-score (median/MAD of log10 act_err) above which a module's 4-bit error "stands out".
OUTLIER_Z = 3.0
# A down_proj is a super-weight module when the largest |input| it sees on calibration text exceeds the
# median over all down_proj modules by this factor (massive activations are 100-1000x, Sun et al. 2024).
SPIKE_FACTOR = 20.0
# bitsandbytes >= 0.49 on CPUs with AVX512-BF16: Linear4bit inference asserts unless out_features % 32 == 0.
CPU_OUT_ALIGN = 32

# Roles whose floor in dq's planning policy is above 4-bit stay 16-bit here (vision towers, projectors);
# routers and norms are kept by the policy; the output head is kept by bitsandbytes' loaders anyway.
_NF4_BITS = 4.5
_DOWN_ROLES = {TensorRole.FFN_DOWN, TensorRole.EXPERT_DOWN, TensorRole.SHARED_DOWN}


def module_role(name: str) -> str:
    """Role of a Hugging Face module name (``model.layers.3.mlp.down_proj`` -> ``ffn_down``): the planner's
    roles (:func:`dq.analysis.roles.classify_module`)."""
    return classify_module(name).value


def _always_kept(role: TensorRole, policy: Policy) -> Reason | None:
    if role is TensorRole.OUTPUT:
        return Reason.OUTPUT
    if Policy.kept(role):
        return Reason.ROUTER
    if FORMATS[policy.floor_for(role, None, False)].bits_per_weight > _NF4_BITS:
        return Reason.VISION
    return None


class Reason(str, Enum):
    """Why a module is stored the way it is."""

    NF4 = "nf4"  # quantized
    OUTPUT = "output"  # output head: bitsandbytes loaders keep it 16-bit
    VISION = "vision"  # vision tower / projector
    ROUTER = "router"  # MoE router: tiny and decides every token's experts
    SUPER_WEIGHT = "super_weight"  # down_proj behind a massive activation
    OUTLIER = "outlier"  # 4-bit activation error stands out (robust z > OUTLIER_Z)
    BUDGET = "budget"  # next-largest error, kept to fill --keep-fraction
    USER = "user"  # named by the caller
    CPU_SHAPE = "cpu_shape"  # out_features % 32 != 0: bitsandbytes' AVX512-BF16 CPU path cannot run it

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class ModuleMeasurement:
    """What was measured about one ``nn.Linear`` (``act_err``/``input_spike`` are None when not measured)."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    act_err: float | None = None
    weight_err: float | None = None
    max_abs_weight: float | None = None
    input_spike: float | None = None  # max |x| seen at the module's input on calibration text

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    @property
    def role(self) -> str:
        return module_role(self.name)


@dataclass(frozen=True)
class ModuleChoice:
    """One module's decision, with the measurement it was made from."""

    name: str
    role: str
    shape: tuple[int, int]
    quantize: bool
    reason: Reason
    act_err: float | None = None
    weight_err: float | None = None
    max_abs_weight: float | None = None
    input_spike: float | None = None

    @property
    def n_params(self) -> int:
        return self.shape[0] * self.shape[1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"], d["reason"] = list(self.shape), self.reason.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ModuleChoice:
        _check_keys(cls, d)
        return cls(**{**d, "shape": tuple(d["shape"]), "reason": Reason(d["reason"])})


def _check_keys(cls: type, d: Mapping[str, Any]) -> None:
    reject_unknown_keys(f"{cls.__name__} (written by a newer dq?)", d, (f.name for f in fields(cls)))


@dataclass(frozen=True)
class BnbPlan:
    """The per-module plan of a bitsandbytes checkpoint (``dq_plan.json``).

    Attributes:
        model: the source model (path or packaged name).
        source: where the decision came from: ``measured`` (dq's own NF4 hook pass), ``analysis``
            (an ``Analysis`` from ``dq analyze``) or ``user`` (an explicit keep set).
        keep_fraction: the requested budget (fraction of linear-layer parameters kept 16-bit) or None
            for "only what stands out".
    """

    model: str
    source: str
    modules: tuple[ModuleChoice, ...]
    quant_type: str = "nf4"
    blocksize: int = 64
    double_quant: bool = True
    compute_dtype: str = "bfloat16"
    keep_fraction: float | None = None
    n_tokens: int = 0
    fused_experts: tuple[str, ...] = ()  # 3-D expert parameters bitsandbytes cannot quantize: kept 16-bit
    version: int = BNB_PLAN_VERSION

    @property
    def kept(self) -> tuple[ModuleChoice, ...]:
        return tuple(m for m in self.modules if not m.quantize)

    @property
    def quantized(self) -> tuple[ModuleChoice, ...]:
        return tuple(m for m in self.modules if m.quantize)

    @property
    def kept_param_fraction(self) -> float:
        """Fraction of linear-layer parameters (output head excluded) stored in 16-bit."""
        body = [m for m in self.modules if m.reason is not Reason.OUTPUT]
        total = sum(m.n_params for m in body)
        return sum(m.n_params for m in body if not m.quantize) / total if total else 0.0

    def skip_modules(self) -> list[str]:
        """``llm_int8_skip_modules`` for ``quantization_config``: every 16-bit linear, by exact name."""
        return sorted(m.name for m in self.kept)

    def summary(self) -> dict[str, Any]:
        """Counts by reason and role, for logs and the model card."""
        by_reason: dict[str, int] = {}
        for m in self.kept:
            by_reason[m.reason.value] = by_reason.get(m.reason.value, 0) + 1
        return {
            "quant_type": self.quant_type, "blocksize": self.blocksize, "double_quant": self.double_quant,
            "source": self.source, "n_modules": len(self.modules), "n_quantized": len(self.quantized),
            "n_kept": len(self.kept), "kept_param_fraction": round(self.kept_param_fraction, 5),
            "kept_by_reason": dict(sorted(by_reason.items())),
            "fused_experts_kept_16bit": len(self.fused_experts),
        }

    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "modules"}
        return {**d, "summary": self.summary(), "modules": [m.to_dict() for m in self.modules]}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> BnbPlan:
        d = {k: v for k, v in d.items() if k != "summary"}
        _check_keys(cls, d)
        if d.get("version") != BNB_PLAN_VERSION:
            raise CorruptFileError(f"bnb plan version {d.get('version')!r} is not {BNB_PLAN_VERSION}; re-run dq quantize")
        return cls(**{**d, "modules": tuple(ModuleChoice.from_dict(m) for m in d["modules"]),
                      "fused_experts": tuple(d.get("fused_experts", ()))})

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> BnbPlan:
        path = Path(path)
        if path.is_dir():
            path = path / PLAN_FILE
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except FileNotFoundError as exc:
            raise CorruptFileError(f"no {PLAN_FILE} at {path}; it is written by `dq quantize --format safetensors`") from exc
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{path} is not a dq bnb plan ({exc})") from exc


def _robust_z(values: Sequence[float]) -> list[float]:
    logs = [math.log10(max(v, 1e-12)) for v in values]
    med = statistics.median(logs)
    mad = statistics.median(abs(v - med) for v in logs) * 1.4826 or 1e-9
    return [(v - med) / mad for v in logs]


def super_weight_modules(measurements: Iterable[ModuleMeasurement], spike_factor: float = SPIKE_FACTOR) -> set[str]:
    """``down_proj`` modules whose largest input activation is ``spike_factor`` x the median of their kind."""
    downs = [m for m in measurements if TensorRole(m.role) in _DOWN_ROLES and m.input_spike is not None]
    if len(downs) < 3:
        return set()
    med = statistics.median(m.input_spike for m in downs) or 1e-12
    return {m.name for m in downs if m.input_spike > spike_factor * med}


def select_modules(
    measurements: Sequence[ModuleMeasurement],
    *,
    model: str,
    source: str = "measured",
    keep: Iterable[str] | None = None,
    keep_fraction: float | None = None,
    super_weights: Iterable[str] | None = None,
    outlier_z: float = OUTLIER_Z,
    cpu_safe: bool = True,
    n_tokens: int = 0,
    double_quant: bool = True,
    policy: Policy | None = None,
) -> BnbPlan:
    """Decide NF4 or 16-bit for every linear module.

    Order: output head, vision, routers (always kept); CPU-incompatible shapes (``cpu_safe``); the
    caller's ``keep`` set if given (then nothing else is added); super-weight modules; modules whose
    NF4 ``act_err`` stands out (robust z-score of log error > ``outlier_z``); then, if ``keep_fraction``
    is given, further modules by descending ``act_err`` while the kept linear parameters fit the fraction.

    Args:
        measurements: one per ``nn.Linear`` of the model.
        keep: exact module names to keep in 16-bit (disables the measured policy).
        keep_fraction: budget, as a fraction of linear-layer parameters, in [0, 1).
        super_weights: module names known to hold super weights (from an ``Analysis``); default:
            detected from ``input_spike``.
        policy: the planner's policy (:class:`dq.plan.policy.Policy`): roles it keeps in their source type
            and roles whose floor is above 4 bits stay 16-bit here.

    Returns:
        The :class:`BnbPlan`.

    Example:
        >>> ms = [ModuleMeasurement(f"model.layers.{i}.mlp.down_proj", (64, 256), act_err=e)
        ...       for i, e in enumerate([.01, .011, .012, .009, .5])]
        >>> [m.name for m in select_modules(ms, model="m").kept]
        ['model.layers.4.mlp.down_proj']
    """
    if keep_fraction is not None and not (0.0 <= keep_fraction < 1.0):
        raise BudgetError(f"keep_fraction {keep_fraction!r} is outside [0, 1); e.g. 0.1 keeps ~10% of linear weights in 16-bit")
    names = {m.name for m in measurements}
    if len(names) != len(measurements):
        raise PlanError("duplicate module names in measurements")
    policy = policy or Policy()
    decided: dict[str, Reason] = {}
    for m in measurements:
        kept = _always_kept(TensorRole(m.role), policy)
        if kept is not None:
            decided[m.name] = kept
        elif cpu_safe and m.shape[0] % CPU_OUT_ALIGN:
            decided[m.name] = Reason.CPU_SHAPE
    if keep is not None:
        keep = set(keep)
        unknown = sorted(keep - names)
        if unknown:
            example = ", ".join(sorted(names)[:3])
            raise PlanError(f"keep names {unknown[:5]} are not linear modules of {model}; use full module names, e.g. {example}")
        for name in sorted(keep):
            decided.setdefault(name, Reason.USER)
        source = "user"
    else:
        sw = set(super_weights) if super_weights is not None else super_weight_modules(measurements)
        for name in sorted(sw & names):
            decided.setdefault(name, Reason.SUPER_WEIGHT)
        scored = [m for m in measurements if m.act_err is not None and m.name not in decided]
        if len(scored) >= 3:
            for m, z in zip(scored, _robust_z([m.act_err for m in scored])):
                if z > outlier_z:
                    decided[m.name] = Reason.OUTLIER
        if keep_fraction is not None:
            total = sum(m.n_params for m in measurements if m.role != "output")
            budget = keep_fraction * total
            used = sum(m.n_params for m in measurements if m.name in decided and decided[m.name] is not Reason.OUTPUT)
            if used > budget:
                raise BudgetError(
                    f"the modules that must stay 16-bit already hold {used / total:.1%} of linear weights, "
                    f"more than --keep-fraction {keep_fraction}; raise it to at least {math.ceil(used / total * 100) / 100}"
                )
            for m in sorted(scored, key=lambda m: -m.act_err):
                if m.name not in decided and used + m.n_params <= budget:
                    decided[m.name] = Reason.BUDGET
                    used += m.n_params
    choices = tuple(
        ModuleChoice(
            name=m.name, role=m.role, shape=tuple(m.shape), quantize=m.name not in decided,
            reason=decided.get(m.name, Reason.NF4), act_err=m.act_err, weight_err=m.weight_err,
            max_abs_weight=m.max_abs_weight, input_spike=m.input_spike,
        )
        for m in sorted(measurements, key=lambda m: _natural_key(m.name))
    )
    return BnbPlan(model=model, source=source, modules=choices, keep_fraction=keep_fraction, n_tokens=n_tokens,
                   double_quant=double_quant)


def _natural_key(name: str) -> list:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


# 4-bit GGUF types closest to NF4 (non-linear or 32-block 4-bit), in order of preference.
_NF4_PROXIES = ("IQ4_NL", "Q4_0", "IQ4_XS", "Q4_1", "Q4_K")


def measurements_from_analysis(analysis, shapes: Mapping[str, tuple[int, int]], policy: Policy | None = None,
                               ) -> tuple[list[ModuleMeasurement], set[str]]:
    """Turn a ``dq.analysis.Analysis`` into per-module measurements and super-weight module names.

    ``act_err`` comes from the candidate 4-bit type closest to NF4 (IQ4_NL, else Q4_0, ...). ``shapes``
    maps every linear module name to (out, in); modules the analysis does not cover get no error.
    """
    by_module = {}
    for t in analysis.tensors:
        if t.hf_name.endswith(".weight"):
            by_module[t.hf_name[: -len(".weight")]] = t
    if not set(by_module) & set(shapes):
        raise PlanError(
            f"the analysis of {analysis.model!r} names none of this model's modules; "
            f"analyze the same model (`dq analyze MODEL`) or omit --analysis"
        )
    out = []
    for name, shape in shapes.items():
        t = by_module.get(name)
        err = None
        if t is not None:
            for fmt in _NF4_PROXIES:
                e = next((e for e in t.errors if e.requested.value == fmt), None)
                if e is not None:
                    err = e.act_err if e.act_err is not None else e.weighted_err if e.weighted_err is not None else e.weight_err
                    break
        out.append(ModuleMeasurement(name=name, shape=shape, act_err=err,
                                     max_abs_weight=t.max_abs if t is not None else None))
    gguf_to_module = {t.name: t.hf_name[: -len(".weight")] for t in analysis.tensors if t.hf_name.endswith(".weight")}
    ratio = (policy or Policy()).super_weight_min_ppl_ratio  # the planner's rule for a confirmed super weight
    sw = {gguf_to_module[s.tensor] for s in analysis.super_weights if s.tensor in gguf_to_module
          and (s.ablation_ppl_ratio is None or s.ablation_ppl_ratio >= ratio)}
    return out, sw
