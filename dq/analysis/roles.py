"""Tensor roles from GGUF tensor names (gguf-py's ``MODEL_TENSOR`` naming, as llama.cpp writes them).

The planner's policy (attention above routed experts, embeddings and output floors, vision towers kept
high, norms and routers in F32) is expressed per role, so every GGUF tensor name maps to exactly one.
"""

from __future__ import annotations

import re
from enum import Enum

__all__ = ["TensorRole", "classify", "layer_index"]


class TensorRole(str, Enum):
    EMBEDDING = "embedding"
    OUTPUT = "output"
    NORM = "norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_OUTPUT = "attn_output"
    FFN_GATE = "ffn_gate"
    FFN_UP = "ffn_up"
    FFN_DOWN = "ffn_down"
    EXPERT_GATE = "expert_gate"
    EXPERT_UP = "expert_up"
    EXPERT_DOWN = "expert_down"
    SHARED_GATE = "shared_gate"
    SHARED_UP = "shared_up"
    SHARED_DOWN = "shared_down"
    ROUTER = "router"
    VISION = "vision"
    PROJECTOR = "projector"
    OTHER = "other"

    def __str__(self) -> str:
        return self.value


# Checked in order; first match wins. Patterns are on GGUF names (blk.N.<suffix>).
_RULES: tuple[tuple[str, TensorRole], ...] = (
    (r"^(v\.|vision_tower|visual\.|vit\.)", TensorRole.VISION),
    (r"^(mm\.|mm_|multi_modal_projector|mmproj)", TensorRole.PROJECTOR),
    (r"(^|\.)(token_embd|per_layer_token_embd|token_types|position_embd)\.", TensorRole.EMBEDDING),
    (r"^output\.weight$", TensorRole.OUTPUT),
    (r"_norm(\.|_)|\.norm\.|layer_norm|_ln\b", TensorRole.NORM),
    (r"\.ffn_gate_inp(_shexp)?\.|\.ffn_gate_inp\b|exp_probs_b", TensorRole.ROUTER),
    (r"\.ffn_gate_exps\.", TensorRole.EXPERT_GATE),
    (r"\.ffn_up_exps\.", TensorRole.EXPERT_UP),
    (r"\.ffn_down_exps\.", TensorRole.EXPERT_DOWN),
    (r"\.ffn_gate_shexp\.", TensorRole.SHARED_GATE),
    (r"\.ffn_up_shexp\.", TensorRole.SHARED_UP),
    (r"\.ffn_down_shexp\.", TensorRole.SHARED_DOWN),
    (r"\.attn_qkv\.", TensorRole.ATTN_QKV),
    (r"\.attn_q\.", TensorRole.ATTN_Q),
    (r"\.attn_k\.", TensorRole.ATTN_K),
    (r"\.attn_v\.", TensorRole.ATTN_V),
    (r"\.attn_output\.", TensorRole.ATTN_OUTPUT),
    (r"\.ffn_gate\.", TensorRole.FFN_GATE),
    (r"\.ffn_up\.", TensorRole.FFN_UP),
    (r"\.ffn_down\.", TensorRole.FFN_DOWN),
)
_COMPILED = tuple((re.compile(p), role) for p, role in _RULES)
_LAYER = re.compile(r"(?:^|\.)blk\.(\d+)\.")


def classify(gguf_name: str) -> TensorRole:
    """Role of a GGUF tensor.

    Example:
        >>> classify("blk.3.ffn_down_exps.weight")
        <TensorRole.EXPERT_DOWN: 'expert_down'>
    """
    for rx, role in _COMPILED:
        if rx.search(gguf_name):
            return role
    return TensorRole.OTHER


def layer_index(gguf_name: str) -> int | None:
    """Decoder block index of a tensor (``blk.N.``), or None for global tensors."""
    m = _LAYER.search(gguf_name)
    return int(m.group(1)) if m else None
