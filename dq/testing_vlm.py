"""A small LLaVA-style vision-language test model: random SigLIP vision tower + a real text model.

No pretrained VLM ships in any package (``shared/models.md``): the vision tower and projector are random
(seeded) and small; the language model's weights are copied from a dense llama-architecture checkpoint
(SmolLM2), optionally truncated to a few layers. Saved with transformers' ``save_pretrained``.

Example:
    >>> tiny_llava(materialize("smollm2-135m"), tmp / "llava", layers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["tiny_llava"]

_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja")


def tiny_llava(
    text_dir: str | Path,
    out_dir: str | Path,
    *,
    layers: int | None = None,
    vision_hidden: int = 256,
    vision_layers: int = 2,
    image_size: int = 64,
    patch_size: int = 16,
    seed: int = 0,
) -> Path:
    """Write a ``LlavaForConditionalGeneration`` whose text model is the model in ``text_dir``.

    Args:
        text_dir: dense llama-architecture Hugging Face directory (e.g. SmolLM2).
        out_dir: output directory.
        layers: keep the first ``layers`` text decoder layers (default: all).
        vision_hidden, vision_layers, image_size, patch_size: the random SigLIP tower's shape.
        seed: seed of the random vision tower and projector.
    """
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, LlavaConfig, LlavaForConditionalGeneration, SiglipVisionConfig

    text_dir, out_dir = Path(text_dir), Path(out_dir)
    text_cfg = AutoConfig.from_pretrained(text_dir)
    n_layers = layers or text_cfg.num_hidden_layers
    text_cfg.num_hidden_layers = n_layers
    vision = SiglipVisionConfig(hidden_size=vision_hidden, intermediate_size=4 * vision_hidden,
                                num_hidden_layers=vision_layers, num_attention_heads=4, image_size=image_size,
                                patch_size=patch_size)
    cfg = LlavaConfig(vision_config=vision, text_config=text_cfg, image_token_index=text_cfg.vocab_size - 1,
                      vision_feature_layer=-1, vision_feature_select_strategy="full",
                      tie_word_embeddings=text_cfg.tie_word_embeddings)
    cfg.architectures = ["LlavaForConditionalGeneration"]
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(cfg)
    sd = {}
    for f in sorted(text_dir.glob("*.safetensors")):
        for k, v in load_file(f).items():
            parts = k.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= n_layers:
                continue
            if k.startswith("model."):
                sd["model.language_model." + k[len("model."):]] = v.float()
            else:
                sd[k] = v.float()
    missing, unexpected = model.load_state_dict(sd, strict=False)
    text_missing = [k for k in missing if "language_model" in k]
    if text_missing or unexpected:
        raise RuntimeError(f"text weights did not fit the LLaVA model: {text_missing[:3]} {unexpected[:3]}")
    model = model.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in _TOKENIZER_FILES:
        if (text_dir / f).exists():
            shutil.copy(text_dir / f, out_dir / f)
    return out_dir
