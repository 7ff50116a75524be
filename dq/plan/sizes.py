"""Size-only plans: every tensor at its policy floor, from a tensor list alone (no weights, no analysis).

``dq plan --dry-run --config config.json --policy unsloth-iq1_s`` prices a checkpoint nobody here can
download: the tensor list comes from llama.cpp's converter on a sparse checkpoint
(:func:`dq.convert.shapes.tensors_from_config`), each quantizable tensor takes its role's floor (with
llama.cpp's block-size fallback), the rest stays in the converter's type. The GGUF header (tokenizer and
metadata, a few MB) is not counted.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from dq.analysis.roles import TensorRole, classify, layer_index
from dq.plan.policy import Policy
from dq.quant.assign import SourceTensor
from dq.quant.formats import FORMATS, QuantFormat, effective_format, tensor_nbytes
from dq.quant.gguf_writer import padded_size

__all__ = ["FloorPlan", "floor_plan"]


@dataclass(frozen=True)
class FloorPlan:
    """The types and bytes of a size-only plan."""

    types: dict[str, QuantFormat]
    tensor_bytes: int
    n_weights: int
    by_role: dict[str, tuple[int, int]]  # role -> (weights, bytes)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.tensor_bytes / self.n_weights


def floor_plan(sources: Sequence[SourceTensor], policy: Policy) -> FloorPlan:
    """Each tensor at its floor under ``policy`` (see the module docstring)."""
    moe_layers = sorted({layer_index(s.name) for s in sources if classify(s.name) is TensorRole.EXPERT_DOWN})
    types, by_role, total, n = {}, {}, 0, 0
    for s in sources:
        role = classify(s.name)
        layer = layer_index(s.name)
        quantizable = len(s.shape) >= 2 and s.name.endswith("weight") and not Policy.kept(role)
        if quantizable:
            floor = policy.floor_for(role, layer, False, moe_layers.index(layer) if layer in moe_layers else None)
            fmt = floor if FORMATS[floor].is_float else effective_format(floor, s.shape)
        else:
            fmt = s.fmt
        size = padded_size(tensor_nbytes(fmt, s.shape))
        types[s.name] = fmt
        w, b = by_role.get(role.value, (0, 0))
        count = 1
        for d in s.shape:
            count *= d
        by_role[role.value] = (w + count, b + size)
        total += size
        n += count
    return FloorPlan(types, total, n, by_role)
