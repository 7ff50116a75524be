"""Role responses: the measured KL divergence of quantizing every tensor of one role at once.

The damage gradients (:mod:`dq.analysis.gradients`) predict each tensor's KLD to second order, one tensor at
a time. Against whole-role perturbations measured by llama.cpp on Qwen2.5-Coder-1.5B
(``bench/results/damage_model_qwen2.5-coder-1.5b.md``) that prediction is off by a factor that depends on
the role and moves with the error: at IQ2_XXS ffn_gate measured 0.71x its prediction, ffn_down 1.13x and
attn_q 1.17x, while at Q3_K every role sat near 0.75x. A knapsack on the raw predictions sends the wrong
tensors to 1.5 bits. This sweep measures, for every role and a few anchor types (:data:`ANCHORS`), the mean
KLD of the model with all of that role's tensors quantized, on calibration windows no other stage reads
(:attr:`dq.calibration.Purpose.PROBE`) and at the positions the damage gradients score; the planner turns
them into per-role, per-type response factors (:class:`dq.plan.damage.DamageModel`).

Streaming: one pass over the layers. Each block is loaded once and run for the base model and for every
block variant (role, type), with that variant's tensors replaced by ``Q(W)`` (llama.cpp's quantizer with the
analysis's imatrix, or dq's kernels on a GPU) and put back afterwards; the LM head's variants quantize the
head's rows as the scorer streams them. Cost: ``1 + variants`` forward passes of ``tokens`` tokens, and
about one quantization of the model per anchor type.

Covered: tensors that are a 2-D parameter of their own (attention and dense FFN projections, shared
experts, an untied LM head). Merged expert tensors, split ones (fused qkv, MLA's kv_b), the embedding and a
tied head have no response: their roles keep the raw prediction.

Example:
    >>> rs = measure_responses(sk, tensors, imatrix, ids, candidates)      # doctest: +SKIP
    >>> rs[0]                                                              # doctest: +SKIP
    RoleResponse(role='ffn_gate', type=<QuantFormat.IQ1_S: 'IQ1_S'>, kld=0.41, tensors=('blk.0.ffn_gate.weight', ...), tokens=1020)
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from dq.analysis.artifact import TensorMeasurement
from dq.analysis.gradients import scored_positions
from dq.analysis.loader import ModelSkeleton
from dq.analysis.measure import kernel_formats, measure_path, round_trip
from dq.analysis.roles import TensorRole
from dq.analysis.stream import embed, final_hidden, run_layer, variant_scores
from dq.quant.formats import FORMATS, QuantFormat, effective_format
from dq.quant.imatrix import ImatrixEntry

__all__ = ["ANCHORS", "RoleResponse", "response_tensors", "measure_responses"]

log = logging.getLogger(__name__)

# The types each role is measured at: the 1.5-bit floor of routed experts and FFNs, the 2-bit workhorse,
# and a 3.4-bit type, spanning where plans put tensors under a tight budget.
ANCHORS: tuple[QuantFormat, ...] = (QuantFormat.IQ1_S, QuantFormat.IQ2_XXS, QuantFormat.Q3_K)


# the embedding is a lookup (and a tied head's other half); vision is off the text path; norms and routers stay
# in their source type
_NOT_MEASURED = frozenset({TensorRole.EMBEDDING, TensorRole.VISION, TensorRole.PROJECTOR, TensorRole.NORM,
                           TensorRole.ROUTER})


@dataclass(frozen=True)
class RoleResponse:
    """The mean KLD (nats per scored token) of the model with every ``role`` tensor stored as ``type``."""

    role: str
    type: QuantFormat
    kld: float
    tensors: tuple[str, ...]  # the GGUF names quantized together
    tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"role": self.role, "type": self.type.value, "kld": self.kld, "tensors": list(self.tensors),
                "tokens": self.tokens}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoleResponse:
        return cls(str(d["role"]), QuantFormat(d["type"]), float(d["kld"]), tuple(d["tensors"]), int(d["tokens"]))


def response_tensors(sk: ModelSkeleton, tensors: Sequence[TensorMeasurement]) -> dict[str, list[TensorMeasurement]]:
    """role -> its tensors that are a 2-D parameter of their own (see the module docstring)."""
    uses = Counter(t.hf_name for t in tensors)
    head = f"{sk.output_head_path()}.weight" if not sk.tied_output() else None
    groups: dict[str, list[TensorMeasurement]] = {}
    for t in tensors:
        if (len(t.shape) != 2 or uses[t.hf_name] > 1 or t.role in _NOT_MEASURED
                or (t.layer is None and t.hf_name != head) or not t.errors):
            continue
        groups.setdefault(t.role.value, []).append(t)
    return groups


def _quantizer(device: str, n_threads: int | None):
    """``f(w [rows, n] float tensor, fmt, importance) -> Q(W)`` as float32 on ``w``'s device."""
    on_kernels = measure_path(device, announce=False) == "kernels"

    def fake_quant(w: torch.Tensor, fmt: QuantFormat, importance: np.ndarray | None) -> torch.Tensor:
        stored = effective_format(fmt, tuple(w.shape))
        if on_kernels and stored in kernel_formats():
            from dq.kernels.api import quant_error

            im = None if importance is None else torch.from_numpy(importance).to(w.device)
            return quant_error(w.float(), stored, im, imatrix_quantizer=im is not None, return_dequantized=True)["deq"]
        q = round_trip(np.ascontiguousarray(w.float().cpu().numpy()), stored, importance, n_threads)
        return torch.from_numpy(q).to(w.device)

    return fake_quant


def _importance(entry: ImatrixEntry | None) -> np.ndarray | None:
    if entry is None or entry.counts.sum() == 0:
        return None
    return np.ascontiguousarray(entry.weights()[0], dtype=np.float32)


def measure_responses(
    sk: ModelSkeleton,
    tensors: Sequence[TensorMeasurement],
    imatrix: Mapping[str, ImatrixEntry],
    input_ids: torch.Tensor,
    candidates: Sequence[QuantFormat],
    *,
    device: str = "cpu",
    n_threads: int | None = None,
    anchors: Sequence[QuantFormat] = ANCHORS,
) -> list[RoleResponse]:
    """Measure every role's response at every anchor type among ``candidates`` (see the module docstring).

    Args:
        sk: the model, streamed block by block.
        tensors: the analysis's measurements (role, layer, parameter name, shape of every tensor).
        imatrix: GGUF name -> imatrix entry (the quantizers' importance weights, as llama.cpp would use them).
        input_ids: ``[n_seq, S]`` calibration tokens; positions ``S/2 .. S-2`` are scored.
        candidates: the analysis's candidate types (anchors outside them are skipped).
        device: where blocks run (``cuda``: and where they are quantized, by dq's kernels).
        n_threads: libggml threads.

    Returns:
        One :class:`RoleResponse` per (role, anchor), roles in the order met.
    """
    groups = response_tensors(sk, tensors)
    types = [f for f in anchors if f in candidates and not FORMATS[f].is_float]
    variants = [(role, f) for role in groups for f in types]
    if not variants:
        return []
    head_role = TensorRole.OUTPUT.value
    fake_quant = _quantizer(device, n_threads)
    log.info("role responses: %d roles x %d types on %d tokens", len(groups), len(types), input_ids.numel())
    hidden, args = embed(sk, input_ids)
    hs: dict = {None: hidden}
    block = [v for v in variants if v[0] != head_role]
    for v in block:
        hs[v] = hidden
    for i in range(sk.n_layers):
        prefix = sk.layer_prefix(i)
        sk.load(prefix)
        try:
            mine = {role: [t for t in ts if t.layer == i] for role, ts in groups.items()}
            out = {None: run_layer(sk, i, hs[None], args)}
            for role, fmt in block:
                here = mine[role]
                if not here and hs[(role, fmt)] is hs[None]:
                    out[(role, fmt)] = out[None]  # not modified yet: the same states as the base
                    continue
                saved = []
                with torch.no_grad():
                    for t in here:
                        p = sk.module_param(t.hf_name)
                        saved.append((p, p.detach().clone()))
                        p.copy_(fake_quant(p.detach(), fmt, _importance(imatrix.get(t.name))).to(p.dtype))
                try:
                    out[(role, fmt)] = run_layer(sk, i, hs[(role, fmt)], args)
                finally:
                    with torch.no_grad():
                        for p, orig in saved:
                            p.copy_(orig)
            hs = out
        finally:
            sk.free(prefix)
        log.info("role responses: layer %d/%d", i + 1, sk.n_layers)
    normed = {k: final_hidden(sk, h) for k, h in hs.items()}
    transforms = {}
    if head_role in groups:
        head_t = groups[head_role][0]
        im = _importance(imatrix.get(head_t.name))
        for fmt in types:
            normed[(head_role, fmt)] = normed[None]
            transforms[(head_role, fmt)] = (lambda w, r0, fmt=fmt: fake_quant(w, fmt, im).to(w.dtype))
    pos = scored_positions(int(input_ids.shape[1]))
    _, kld = variant_scores(sk, normed, input_ids, positions=pos, head_transforms=transforms)
    n_scored = int(input_ids.shape[0]) * len(range(*pos.indices(int(input_ids.shape[1]))))
    return [RoleResponse(role, fmt, float(kld[(role, fmt)]), tuple(t.name for t in groups[role]), n_scored)
            for role, fmt in variants]
