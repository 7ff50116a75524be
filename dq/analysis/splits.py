"""GGUF tensors llama.cpp's converter makes from one Hugging Face tensor by a reshape, so they are measured
as the GGUF holds them.

DeepSeek-V2/V3 (MLA): ``convert_hf_to_gguf.py`` (``DeepseekV2Model.modify_tensors``) splits
``kv_b_proj.weight`` ``[H * (nope + v), L]`` into ``attn_k_b`` = ``view(H, nope + v, L)[:, :nope].transpose``
``[H, L, nope]`` and ``attn_v_b`` = ``[:, nope:]`` ``[H, v, L]``, with ``H`` = ``num_key_value_heads``,
``nope`` = ``qk_nope_head_dim``, ``v`` = ``v_head_dim``, ``L`` = ``kv_lora_rank``: llama.cpp absorbs the key
up-projection into the query, so each of the ``H`` matrices is quantized on its own rows. The same
reshape applies to the weight, to every probe gradient and to nothing else (there is no calibration
activation for these layouts: llama.cpp's inputs to them do not exist in the Hugging Face forward).

Example:
    >>> parts = split_of("deepseek2", "blk.3.attn_kv_b.weight", config)      # doctest: +SKIP
    >>> [p.name for p in parts]                                                # doctest: +SKIP
    ['blk.3.attn_k_b.weight', 'blk.3.attn_v_b.weight']
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

__all__ = ["SplitPart", "split_of"]


@dataclass(frozen=True)
class SplitPart:
    """One GGUF tensor cut from a Hugging Face matrix: its name, GGUF (numpy) shape and the reshape."""

    name: str
    shape: tuple[int, ...]  # [matrices, rows, cols]; () for a part that is one 2-D matrix
    take: Callable[[np.ndarray], np.ndarray]  # HF [out, in] -> [matrices, rows, cols]


def _mla_kv_b(name: str, config) -> list[SplitPart]:
    h = int(getattr(config, "num_key_value_heads", None) or config.num_attention_heads)
    nope, v, lora = int(config.qk_nope_head_dim), int(config.v_head_dim), int(config.kv_lora_rank)

    def k_b(w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.reshape(h, nope + v, lora)[:, :nope].transpose(0, 2, 1))

    def v_b(w: np.ndarray) -> np.ndarray:
        return np.ascontiguousarray(w.reshape(h, nope + v, lora)[:, nope:])

    return [SplitPart(name.replace("attn_kv_b", "attn_k_b"), (h, lora, nope), k_b),
            SplitPart(name.replace("attn_kv_b", "attn_v_b"), (h, v, lora), v_b)]


def _vision_qkv(name: str, config) -> list[SplitPart] | None:
    # mmproj converters (Qwen2-VL's, ``QwenVLModel.modify_tensors``) split a fused vision qkv into thirds
    def part(i: int, tag: str) -> SplitPart:
        def take(w: np.ndarray) -> np.ndarray:
            c = w.shape[0] // 3
            return np.ascontiguousarray(w[i * c : (i + 1) * c])[None]
        return SplitPart(name.replace("attn_qkv", tag), (), take)

    return [part(0, "attn_q"), part(1, "attn_k"), part(2, "attn_v")]


_SPLITS: dict[tuple[str | None, str], Callable] = {
    ("deepseek2", "attn_kv_b"): _mla_kv_b,
    (None, "attn_qkv"): _vision_qkv,  # vision towers (v.*), any architecture
}


def split_of(arch_name: str, gguf_name: str, config) -> list[SplitPart] | None:
    """The GGUF tensors ``gguf_name`` (dq's name of a Hugging Face weight) becomes, or None if it stays one."""
    for (arch, key), fn in _SPLITS.items():
        vision = arch is None and gguf_name.startswith("v.")
        if (arch_name == arch or vision) and f".{key}." in gguf_name and gguf_name.endswith(".weight"):
            return fn(gguf_name, config)
    return None
