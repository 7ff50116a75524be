"""Allocation policy: which types each tensor role may take. Data, stored in every plan, overridable.

Defaults follow the Unsloth dynamic-quant recipe, with floors low enough for the measured damage model to
decide. On Qwen2.5-Coder-1.5B at the stock IQ1_M file's size, the earlier floors (output head Q3_K, early
down_proj and super-weight tensors Q4_K) were binding and cost measured KLD: lowering them to Q2_K and
IQ3_XXS took dq's plan from 0.70 to 0.59 mean KLD (0.53x -> 0.44x the stock mix;
docs/results/policy_floors_qwen.md). The head and the protected tensors still never go below ~2.6 and
~3 bits, above every FFN floor:
- norms, routers and 1-D tensors stay in their source float type (never in the knapsack);
- embeddings and the output head never go below a floor;
- attention and shared experts never go below ~2.5 bits, while routed experts may go to 1.58-bit
  (IQ1_S, IQ1_M, TQ1_0) — so attention and shared experts always sit above the routed experts'
  floor;
- the first ``first_down_layers`` dense (and shared-expert) down_proj tensors and every dense tensor
  holding a super weight are kept at ``protected_floor`` (IQ3_XXS) or above. A routed-expert tensor holding
  a super weight is raised to ``protected_expert_floor`` (IQ2_XXS, as Unsloth keeps DeepSeek's
  down_exps at 2.06 bits) instead: GGUF merges all experts of a layer into one tensor, so Q8_0 there
  would cost as much as the rest of the layer;
- vision towers and projectors are BF16 or Q8_0.
A role's allowed set is every candidate type whose bits per weight is at least the role's floor.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from dq.analysis.roles import TensorRole
from dq.errors import PlanError
from dq.quant.formats import FORMATS, QuantFormat, parse_format

__all__ = ["Policy", "DEFAULT_ROLE_FLOORS"]

_R = TensorRole
_Q = QuantFormat
DEFAULT_ROLE_FLOORS: dict[TensorRole, QuantFormat] = {
    _R.EMBEDDING: _Q.Q2_K,
    _R.OUTPUT: _Q.Q2_K,
    _R.ATTN_Q: _Q.IQ2_XXS,
    _R.ATTN_K: _Q.IQ2_XXS,
    _R.ATTN_V: _Q.Q2_K,
    _R.ATTN_QKV: _Q.Q2_K,
    _R.ATTN_OUTPUT: _Q.IQ2_XXS,
    # MLA: small, and every head's keys and values pass through them (Unsloth keeps them at 4-6 bits)
    _R.ATTN_Q_A: _Q.Q4_K,
    _R.ATTN_Q_B: _Q.Q4_K,
    _R.ATTN_KV_A: _Q.Q4_K,
    _R.ATTN_K_B: _Q.Q4_K,
    _R.ATTN_V_B: _Q.Q4_K,
    _R.FFN_GATE: _Q.IQ1_S,
    _R.FFN_UP: _Q.IQ1_S,
    _R.FFN_DOWN: _Q.IQ1_S,
    _R.EXPERT_GATE: _Q.IQ1_S,
    _R.EXPERT_UP: _Q.IQ1_S,
    _R.EXPERT_DOWN: _Q.IQ1_S,
    _R.SHARED_GATE: _Q.Q2_K,
    _R.SHARED_UP: _Q.Q2_K,
    _R.SHARED_DOWN: _Q.Q2_K,
    _R.VISION: _Q.Q8_0,
    _R.PROJECTOR: _Q.Q8_0,
    _R.OTHER: _Q.Q4_K,
}
# Roles never quantized (kept in their source type).
_KEPT_ROLES = frozenset({TensorRole.NORM, TensorRole.ROUTER})


@dataclass(frozen=True)
class Policy:
    """Per-role floors and protection rules.

    Attributes:
        role_floors: role -> lowest type allowed (by bits per weight).
        protected_floor: floor for super-weight tensors and the first down_proj layers.
        protected_expert_floor: floor for a merged routed-expert tensor holding a super weight.
        first_down_layers: how many leading layers' dense/shared down_proj are protected.
        protect_super_weights: raise tensors holding a detected super weight to ``protected_floor``.
        super_weight_min_ppl_ratio: a candidate counts as a super weight only if zeroing it raised held-out
            perplexity by at least this factor (candidates without an ablation count).
        float_types: extra types allowed for vision/projector roles (BF16 keeps them unquantized).
        super_expert_min_kld: a super expert (a routed expert behind its layer's massive activation) counts
            when zeroing it moved held-out next-token distributions by at least this mean KLD (nats); its
            layer's merged expert tensors then take ``protected_expert_floor``.
        early_expert_down_layers: how many of the first MoE layers get ``early_expert_down_floor`` on their
            merged down_exps (Unsloth keeps DeepSeek-R1's first down_exps at 2.06 bits in its 1.58-bit quant).
        early_expert_down_floor: that floor.
    """

    role_floors: Mapping[TensorRole, QuantFormat] = field(default_factory=lambda: dict(DEFAULT_ROLE_FLOORS))
    protected_floor: QuantFormat = QuantFormat.IQ3_XXS
    protected_expert_floor: QuantFormat = QuantFormat.IQ2_XXS
    first_down_layers: int = 2
    protect_super_weights: bool = True
    super_weight_min_ppl_ratio: float = 1.1
    float_types: tuple[QuantFormat, ...] = (QuantFormat.BF16,)
    early_expert_down_layers: int = 0
    early_expert_down_floor: QuantFormat = QuantFormat.IQ2_XXS
    super_expert_min_kld: float = 0.02

    def __post_init__(self) -> None:
        if self.first_down_layers < 0 or self.early_expert_down_layers < 0:
            raise PlanError(f"first_down_layers and early_expert_down_layers must be >= 0, got "
                            f"{self.first_down_layers} and {self.early_expert_down_layers}")

    @staticmethod
    def kept(role: TensorRole) -> bool:
        """Roles that stay in their source type."""
        return role in _KEPT_ROLES

    def floor_for(self, role: TensorRole, layer: int | None, holds_super_weight: bool,
                  moe_layer: int | None = None) -> QuantFormat:
        """The lowest type a tensor may take; ``moe_layer`` is its layer's index among the MoE layers."""
        floor = self.role_floors.get(role, self.role_floors.get(TensorRole.OTHER, QuantFormat.Q4_K))
        if (role is TensorRole.EXPERT_DOWN and moe_layer is not None and moe_layer < self.early_expert_down_layers
                and FORMATS[self.early_expert_down_floor].bits_per_weight > FORMATS[floor].bits_per_weight):
            floor = self.early_expert_down_floor
        routed = role in (TensorRole.EXPERT_GATE, TensorRole.EXPERT_UP, TensorRole.EXPERT_DOWN)
        protected = (holds_super_weight and self.protect_super_weights) or (
            role in (TensorRole.FFN_DOWN, TensorRole.SHARED_DOWN) and layer is not None and layer < self.first_down_layers
        )
        raised = self.protected_expert_floor if routed else self.protected_floor
        if protected and FORMATS[raised].bits_per_weight > FORMATS[floor].bits_per_weight:
            floor = raised
        return floor

    def allowed(self, role: TensorRole, layer: int | None, holds_super_weight: bool,
                candidates: tuple[QuantFormat, ...], moe_layer: int | None = None) -> tuple[QuantFormat, ...]:
        """Candidate types this tensor may take, highest bits first."""
        floor_bits = FORMATS[self.floor_for(role, layer, holds_super_weight, moe_layer)].bits_per_weight
        pool = set(candidates)
        if role in (TensorRole.VISION, TensorRole.PROJECTOR):
            pool |= set(self.float_types)
        ok = [f for f in pool if FORMATS[f].bits_per_weight >= floor_bits - 1e-9]
        return tuple(sorted(ok, key=lambda f: -FORMATS[f].bits_per_weight))

    def to_dict(self) -> dict[str, Any]:
        return {
            "role_floors": {r.value: f.value for r, f in self.role_floors.items()},
            "protected_floor": self.protected_floor.value,
            "protected_expert_floor": self.protected_expert_floor.value,
            "first_down_layers": self.first_down_layers,
            "protect_super_weights": self.protect_super_weights,
            "super_weight_min_ppl_ratio": self.super_weight_min_ppl_ratio,
            "float_types": [f.value for f in self.float_types],
            "early_expert_down_layers": self.early_expert_down_layers,
            "early_expert_down_floor": self.early_expert_down_floor.value,
            "super_expert_min_kld": self.super_expert_min_kld,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Policy:
        allowed = {f.name for f in fields(cls)}
        unknown = set(d) - allowed
        if unknown:
            raise PlanError(f"policy: unknown keys {sorted(unknown)}; allowed: {sorted(allowed)}")
        floors = dict(DEFAULT_ROLE_FLOORS)
        for role, fmt in (d.get("role_floors") or {}).items():
            try:
                floors[TensorRole(role)] = parse_format(fmt)
            except ValueError:
                raise PlanError(f"policy.role_floors: unknown role {role!r}; roles: {[r.value for r in TensorRole]}") from None
        return cls(
            role_floors=floors,
            protected_floor=parse_format(d.get("protected_floor", QuantFormat.IQ3_XXS.value)),
            protected_expert_floor=parse_format(d.get("protected_expert_floor", QuantFormat.IQ2_XXS.value)),
            first_down_layers=int(d.get("first_down_layers", 2)),
            protect_super_weights=bool(d.get("protect_super_weights", True)),
            super_weight_min_ppl_ratio=float(d.get("super_weight_min_ppl_ratio", 1.1)),
            float_types=tuple(parse_format(f) for f in d.get("float_types", ["BF16"])),
            early_expert_down_layers=int(d.get("early_expert_down_layers", 0)),
            early_expert_down_floor=parse_format(d.get("early_expert_down_floor", QuantFormat.IQ2_XXS.value)),
            super_expert_min_kld=float(d.get("super_expert_min_kld", 0.02)),
        )

    @classmethod
    def named(cls, name: str) -> Policy:
        """A preset of :data:`PRESETS` (``default``, ``unsloth-moe``, ``unsloth-iq1_s``, ...).

        Raises:
            PlanError: unknown name (the message lists them).
        """
        if name not in PRESETS:
            raise PlanError(f"unknown policy {name!r}; presets: {', '.join(PRESETS)}, or a YAML file with overrides")
        return cls.from_dict(PRESETS[name])


# Unsloth's dynamic recipe for DeepSeek-R1-class MoE (their "1.58-bit R1" write-up): leading dense layers
# and attention at 4 bits, shared experts at 6, embedding 4, output head 6, routers and norms F32, routed
# experts at the ladder's type with the down_exps of the first MoE layers one step up. As floors: the
# planner spends any budget above them by measured damage; a size-only plan (no weights) takes the floors.
_UNSLOTH = {
    "role_floors": {
        "attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q4_K", "attn_output": "Q4_K", "attn_q_a": "Q4_K",
        "attn_q_b": "Q4_K", "attn_kv_a": "Q4_K", "attn_k_b": "Q4_K", "attn_v_b": "Q4_K",
        "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q4_K",
        "shared_gate": "Q6_K", "shared_up": "Q6_K", "shared_down": "Q6_K",
        "embedding": "Q4_K", "output": "Q6_K",
    },
    "first_down_layers": 0, "early_expert_down_layers": 3,
}


def _ladder(gate_up: str, down: str, early_down: str) -> dict:
    floors = {**_UNSLOTH["role_floors"], "expert_gate": gate_up, "expert_up": gate_up, "expert_down": down}
    return {**_UNSLOTH, "role_floors": floors, "early_expert_down_floor": early_down}


PRESETS: dict[str, dict] = {
    "default": {},
    # the recipe with routed experts allowed down to 1.58-bit: the planner decides above the floors
    "unsloth-moe": _ladder("IQ1_S", "IQ1_S", "IQ2_XXS"),
    # Unsloth's DeepSeek-R1 ladders (routed gate/up, down, the first MoE layers' down)
    "unsloth-iq1_s": _ladder("IQ1_S", "IQ1_S", "IQ2_XXS"),  # "1.58-bit", down 2.06/1.56
    "unsloth-iq1_m": _ladder("IQ1_M", "IQ2_XXS", "IQ2_XXS"),  # "1.73-bit", down 2.06
    "unsloth-iq2_xxs": _ladder("IQ2_XXS", "IQ2_XXS", "IQ2_S"),  # "2.22-bit", down 2.5/2.06
    "unsloth-q2_k_xl": _ladder("Q2_K", "IQ2_S", "Q3_K"),  # "2.51-bit", down 3.5/2.5
}
