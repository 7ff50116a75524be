"""Tensor roles from GGUF tensor names (gguf-py's ``MODEL_TENSOR`` naming, as llama.cpp writes them).

The planner's policy (attention above routed experts, embeddings and output floors, vision towers kept
high, norms and routers in F32) is expressed per role, so every GGUF tensor name maps to exactly one.
"""

from __future__ import annotations

import re
from enum import Enum

__all__ = ["TensorRole", "classify", "classify_module", "layer_index"]


class TensorRole(str, Enum):
    EMBEDDING = "embedding"
    OUTPUT = "output"
    NORM = "norm"
    ATTN_Q = "attn_q"
    ATTN_K = "attn_k"
    ATTN_V = "attn_v"
    ATTN_QKV = "attn_qkv"
    ATTN_OUTPUT = "attn_output"
    ATTN_Q_A = "attn_q_a"  # MLA (DeepSeek-V2/V3): low-rank query down-projection
    ATTN_Q_B = "attn_q_b"  # MLA: query up-projection
    ATTN_KV_A = "attn_kv_a"  # MLA: joint key/value down-projection (with the rope key)
    ATTN_K_B = "attn_k_b"  # MLA: per-head key up-projection (absorbed into the query in llama.cpp)
    ATTN_V_B = "attn_v_b"  # MLA: per-head value up-projection
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
    (r"\.attn_q_a\.", TensorRole.ATTN_Q_A),
    (r"\.attn_q_b\.", TensorRole.ATTN_Q_B),
    (r"\.attn_kv_a_mqa\.", TensorRole.ATTN_KV_A),
    (r"\.attn_k_b\.", TensorRole.ATTN_K_B),
    (r"\.attn_v_b\.", TensorRole.ATTN_V_B),
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


# Hugging Face module names -> role, for exporters that work on transformers modules rather than GGUF names
# (the NF4 safetensors path). First match wins.
_MODULE_RULES: tuple[tuple[str, TensorRole], ...] = (
    (r"(^|\.)(vision_tower|vision_model|visual|vision_encoder|vit|image_encoder)(\.|$)", TensorRole.VISION),
    (r"(^|\.)(multi_modal_projector|mm_projector|merger|connector)(\.|$)", TensorRole.PROJECTOR),
    (r"(^|\.)(lm_head|output|embed_out)$", TensorRole.OUTPUT),
    (r"(^|\.)(embed_tokens|wte|word_embeddings)$", TensorRole.EMBEDDING),
    (r"\.experts(\.\d+)?\.(gate_proj|w1)$", TensorRole.EXPERT_GATE),
    (r"\.experts(\.\d+)?\.(up_proj|w3)$", TensorRole.EXPERT_UP),
    (r"\.experts(\.\d+)?\.(down_proj|w2)$", TensorRole.EXPERT_DOWN),
    (r"\.experts\.gate_up_proj$", TensorRole.EXPERT_GATE),
    (r"\.shared_experts?\.gate_proj$", TensorRole.SHARED_GATE),
    (r"\.shared_experts?\.up_proj$", TensorRole.SHARED_UP),
    (r"\.shared_experts?\.down_proj$", TensorRole.SHARED_DOWN),
    (r"\.(gate|router)$", TensorRole.ROUTER),
    (r"\.(qkv_proj|query_key_value|c_attn)$", TensorRole.ATTN_QKV),
    (r"\.q_a_proj$", TensorRole.ATTN_Q_A),
    (r"\.q_b_proj$", TensorRole.ATTN_Q_B),
    (r"\.kv_a_proj_with_mqa$", TensorRole.ATTN_KV_A),
    (r"\.q_proj$", TensorRole.ATTN_Q),
    (r"\.k_proj$", TensorRole.ATTN_K),
    (r"\.v_proj$", TensorRole.ATTN_V),
    (r"\.(o_proj|dense|out_proj)$", TensorRole.ATTN_OUTPUT),
    (r"\.(gate_proj|w1)$", TensorRole.FFN_GATE),
    (r"\.(up_proj|w3)$", TensorRole.FFN_UP),
    (r"\.(down_proj|w2|fc2)$", TensorRole.FFN_DOWN),
)
_MODULE_COMPILED = tuple((re.compile(p), role) for p, role in _MODULE_RULES)


def classify_module(module_name: str) -> TensorRole:
    """Role of a Hugging Face module (``model.layers.3.mlp.down_proj`` -> ``ffn_down``).

    Example:
        >>> classify_module("model.layers.0.self_attn.q_proj")
        <TensorRole.ATTN_Q: 'attn_q'>
    """
    for rx, role in _MODULE_COMPILED:
        if rx.search(module_name):
            return role
    return TensorRole.OTHER
