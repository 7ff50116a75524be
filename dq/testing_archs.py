"""Tiny random models of the architectures users quantize, built from transformers' own config classes.

No checkpoint of these architectures can be downloaded here, so each is built at tiny size with random,
seeded weights and widths that keep K- and IQ-types unpadded (multiples of 256), saved with
``save_pretrained`` and a tokenizer llama.cpp's converter accepts: the SentencePiece model of
:mod:`dq.testing` where the converter tries SentencePiece first, else a real BPE tokenizer (SmolLM2's,
whose pre-tokenizer llama.cpp recognises). ``tests/test_architectures.py`` carries each through convert
-> analyze -> plan -> quantize -> llama.cpp.

Example:
    >>> tiny_arch("qwen3_moe", tmp / "m", bpe_tokenizer_dir=materialize("smollm2-135m"))  # doctest: +SKIP
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["ARCHITECTURES", "BPE_ONLY", "tiny_arch"]

_H, _I, _HEADS, _KV = 256, 512, 4, 2
_COMMON = dict(hidden_size=_H, num_hidden_layers=2, num_attention_heads=_HEADS, num_key_value_heads=_KV,
               max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False)


def _llama(vocab: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=vocab, intermediate_size=_I, rms_norm_eps=1e-5, **_COMMON), "LlamaForCausalLM"


def _qwen2(vocab: int):
    from transformers import Qwen2Config

    return Qwen2Config(vocab_size=vocab, intermediate_size=_I, **_COMMON), "Qwen2ForCausalLM"


def _qwen3(vocab: int):
    from transformers import Qwen3Config

    return Qwen3Config(vocab_size=vocab, intermediate_size=_I, head_dim=64, **_COMMON), "Qwen3ForCausalLM"


def _gemma3(vocab: int):
    from transformers import Gemma3TextConfig

    return (Gemma3TextConfig(vocab_size=vocab, intermediate_size=_I, head_dim=64, sliding_window=128,
                             query_pre_attn_scalar=64, **{**_COMMON, "tie_word_embeddings": True}),
            "Gemma3ForCausalLM")


def _mixtral(vocab: int):
    from transformers import MixtralConfig

    return (MixtralConfig(vocab_size=vocab, intermediate_size=_I, num_local_experts=4, num_experts_per_tok=2,
                          head_dim=64, **_COMMON), "MixtralForCausalLM")


def _qwen2_moe(vocab: int):
    from transformers import Qwen2MoeConfig

    return (Qwen2MoeConfig(vocab_size=vocab, intermediate_size=_I, moe_intermediate_size=_I,
                           shared_expert_intermediate_size=_I, num_experts=4, num_experts_per_tok=2,
                           decoder_sparse_step=1, norm_topk_prob=False, **_COMMON), "Qwen2MoeForCausalLM")


def _qwen3_moe(vocab: int):
    from transformers import Qwen3MoeConfig

    return (Qwen3MoeConfig(vocab_size=vocab, intermediate_size=_I, moe_intermediate_size=_I, num_experts=4,
                           num_experts_per_tok=2, decoder_sparse_step=1, norm_topk_prob=True, head_dim=64,
                           **_COMMON), "Qwen3MoeForCausalLM")


def _deepseek_v3(vocab: int):
    from transformers import DeepseekV3Config

    # DeepSeek-V3/R1's structure at tiny widths: MLA (q/kv LoRA, rope + nope heads), one leading dense
    # layer, a shared expert, noaux_tc routing with its score-correction bias
    cfg = DeepseekV3Config(
        vocab_size=vocab, hidden_size=_H, intermediate_size=_I, moe_intermediate_size=_H, num_hidden_layers=2,
        num_attention_heads=_HEADS, num_key_value_heads=_HEADS, n_routed_experts=4, n_shared_experts=1,
        num_experts_per_tok=2, n_group=1, topk_group=1, first_k_dense_replace=1, q_lora_rank=256,
        kv_lora_rank=256, qk_nope_head_dim=64, qk_rope_head_dim=64, v_head_dim=64,
        max_position_embeddings=1024, bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},  # no YaRN at this length
    )
    return cfg, "DeepseekV3ForCausalLM"


def _gpt_oss(vocab: int):
    from transformers import GptOssConfig

    cfg = GptOssConfig(vocab_size=vocab, hidden_size=_H, intermediate_size=_H, num_hidden_layers=2,
                       num_attention_heads=_HEADS, num_key_value_heads=_KV, head_dim=64, num_local_experts=4,
                       num_experts_per_tok=2, sliding_window=128, max_position_embeddings=1024,
                       layer_types=["sliding_attention", "full_attention"], bos_token_id=1, eos_token_id=2,
                       tie_word_embeddings=False, rope_parameters={"rope_type": "default", "rope_theta": 150000.0})
    return cfg, "GptOssForCausalLM"


def _qwen2_vl(vocab: int):
    from transformers import Qwen2VLConfig

    # a vision-language model: a Qwen2 text model (M-RoPE) and a ViT tower + merger, which llama.cpp runs
    # from two files (text GGUF + mmproj GGUF); vision depth >= 3 so the converter's merger map applies
    cfg = Qwen2VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=_H, intermediate_size=_I, num_hidden_layers=2,
                         num_attention_heads=_HEADS, num_key_value_heads=_KV, max_position_embeddings=1024,
                         rope_parameters={"rope_type": "default", "mrope_section": [8, 12, 12], "rope_theta": 1e4},
                         tie_word_embeddings=False, bos_token_id=1, eos_token_id=2),
        vision_config=dict(depth=3, embed_dim=_H, hidden_size=_H, num_heads=_HEADS, mlp_ratio=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=vocab - 1, video_token_id=vocab - 2, vision_start_token_id=vocab - 3,
        vision_end_token_id=vocab - 4, tie_word_embeddings=False)
    return cfg, "Qwen2VLForConditionalGeneration"


ARCHITECTURES: dict[str, Callable[[int], tuple[Any, str]]] = {
    "llama": _llama, "qwen2": _qwen2, "qwen3": _qwen3, "gemma3": _gemma3, "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe, "qwen3_moe": _qwen3_moe, "deepseek_v3": _deepseek_v3, "gpt_oss": _gpt_oss,
    "qwen2_vl": _qwen2_vl,
}
# llama.cpp's converter reads these only as BPE (gpt2) vocabularies with a pre-tokenizer it knows
BPE_ONLY = frozenset({"qwen2_moe", "qwen3_moe", "deepseek_v3", "gpt_oss", "qwen2_vl"})
# Qwen2-VL's image processor settings, which the mmproj converter records
_QWEN2_VL_PREPROCESSOR = {
    "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711],
    "patch_size": 14, "merge_size": 2, "temporal_patch_size": 2, "min_pixels": 3136, "max_pixels": 12845056,
    "image_processor_type": "Qwen2VLImageProcessor",
}

_BPE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def tiny_arch(arch: str, out_dir: str | Path, *, bpe_tokenizer_dir: str | Path | None = None, seed: int = 0,
              config: Mapping[str, Any] | None = None) -> Path:
    """Write a tiny random ``arch`` model (bf16 safetensors + tokenizer) to ``out_dir``.

    Args:
        arch: a key of :data:`ARCHITECTURES`.
        out_dir: output directory.
        bpe_tokenizer_dir: a model directory whose BPE tokenizer to copy (required for :data:`BPE_ONLY`,
            used for every architecture when given).
        seed: weights seed.
        config: config attributes to change (of the text config for a vision-language model), e.g.
            ``{"num_hidden_layers": 16, "num_local_experts": 8}``.

    Raises:
        ValueError: unknown ``arch``, or a BPE-only one without ``bpe_tokenizer_dir``.
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    from dq.testing import train_sentencepiece

    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if bpe_tokenizer_dir is not None:
        for f in _BPE_FILES:
            if (Path(bpe_tokenizer_dir) / f).exists():
                shutil.copy(Path(bpe_tokenizer_dir) / f, out_dir / f)
        vocab = len(json.loads((out_dir / "tokenizer.json").read_text())["model"]["vocab"])
    elif arch in BPE_ONLY:
        raise ValueError(f"{arch}: llama.cpp's converter needs a BPE tokenizer it knows; pass bpe_tokenizer_dir")
    else:
        train_sentencepiece(out_dir, 512)
        vocab = 512
        (out_dir / "tokenizer_config.json").write_text(json.dumps({
            "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
            "add_bos_token": True, "add_eos_token": False, "legacy": False,
        }))
    cfg, architecture = ARCHITECTURES[arch](vocab)
    cfg.architectures = [architecture]
    text = getattr(cfg, "text_config", None) or cfg
    for key, value in (config or {}).items():
        setattr(text, key, value)
        if key == "num_hidden_layers" and getattr(text, "layer_types", None):
            text.layer_types = [text.layer_types[i % len(text.layer_types)] for i in range(value)]
    torch.manual_seed(seed)
    auto = AutoModelForImageTextToText if arch == "qwen2_vl" else AutoModelForCausalLM
    model = auto.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, 0.02)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.02)
    model.to(torch.bfloat16).save_pretrained(out_dir)
    if arch == "qwen2_vl":
        (out_dir / "preprocessor_config.json").write_text(json.dumps(_QWEN2_VL_PREPROCESSOR))
    return out_dir
