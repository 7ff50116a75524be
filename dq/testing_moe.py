"""MoE test models by sparse upcycling of a dense Llama-family checkpoint (SmolLM2's real MLP weights).

No pretrained MoE ships in any package (``shared/models.md``), so the experts of each MoE layer are the
dense layer's MLP plus small seeded noise (so they differ), the router is random (seeded), and every
other tensor is copied. Two shapes: Mixtral (routed experts only, converted by llama.cpp as ``llama``)
and Qwen2-MoE (routed experts plus a gated shared expert). The result is saved with transformers'
``save_pretrained``, i.e. in the per-expert checkpoint layout that transformers 5 fuses at load time.

Example:
    >>> upcycle_moe(materialize("smollm2-135m"), tmp / "mixtral", kind="mixtral", layers=2)  # doctest: +SKIP
"""

from __future__ import annotations

import shutil
from pathlib import Path

__all__ = ["upcycle_moe", "MOE_KINDS"]

MOE_KINDS = ("mixtral", "qwen2_moe")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                    "generation_config.json", "chat_template.jinja")


def _dense_state(model_dir: Path, layers: int) -> dict:
    from safetensors.torch import load_file

    sd = {}
    for f in sorted(model_dir.glob("*.safetensors")):
        for k, v in load_file(f).items():
            parts = k.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= layers:
                continue
            sd[k] = v.float()
    return sd


def upcycle_moe(
    dense_dir: str | Path,
    out_dir: str | Path,
    *,
    kind: str = "mixtral",
    n_experts: int = 4,
    top_k: int = 2,
    layers: int | None = None,
    noise: float = 0.01,
    seed: int = 0,
) -> Path:
    """Write an MoE model upcycled from the dense Llama-family model in ``dense_dir``.

    Args:
        dense_dir: Hugging Face directory of a dense llama-architecture model (e.g. SmolLM2).
        out_dir: where to write the MoE model (safetensors + tokenizer).
        kind: ``mixtral`` or ``qwen2_moe`` (adds a shared expert with a sigmoid gate).
        n_experts: routed experts per layer.
        top_k: experts per token.
        layers: keep only the first ``layers`` decoder layers (default: all).
        noise: relative std of the noise added to each expert's copy of the dense MLP.
        seed: seed of noise and routers.
    """
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, MixtralConfig, Qwen2MoeConfig

    if kind not in MOE_KINDS:
        raise ValueError(f"unknown MoE kind {kind!r}; choose one of {MOE_KINDS}")
    dense_dir, out_dir = Path(dense_dir), Path(out_dir)
    dense = AutoConfig.from_pretrained(dense_dir)
    n_layers = layers or dense.num_hidden_layers
    common = dict(
        vocab_size=dense.vocab_size, hidden_size=dense.hidden_size, num_hidden_layers=n_layers,
        num_attention_heads=dense.num_attention_heads, num_key_value_heads=dense.num_key_value_heads,
        max_position_embeddings=dense.max_position_embeddings, rms_norm_eps=dense.rms_norm_eps,
        rope_parameters=getattr(dense, "rope_parameters", None),
        # llama.cpp's qwen2moe graph needs its own output.weight: untie (the head copies the embedding)
        tie_word_embeddings=dense.tie_word_embeddings and kind == "mixtral",
        bos_token_id=dense.bos_token_id, eos_token_id=dense.eos_token_id, hidden_act=dense.hidden_act,
        num_experts_per_tok=top_k,
    )
    if kind == "mixtral":
        cfg = MixtralConfig(intermediate_size=dense.intermediate_size, num_local_experts=n_experts,
                            head_dim=dense.hidden_size // dense.num_attention_heads, **common)
        cfg.architectures = ["MixtralForCausalLM"]
    else:
        cfg = Qwen2MoeConfig(intermediate_size=dense.intermediate_size, moe_intermediate_size=dense.intermediate_size,
                             shared_expert_intermediate_size=dense.intermediate_size, num_experts=n_experts,
                             decoder_sparse_step=1, norm_topk_prob=True, **common)
        cfg.architectures = ["Qwen2MoeForCausalLM"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    sd = _dense_state(dense_dir, n_layers)
    g = torch.Generator().manual_seed(seed)
    own = model.state_dict()
    new = {}
    for k in own:
        if k in sd:
            new[k] = sd[k]
        elif k == "lm_head.weight" and "model.embed_tokens.weight" in sd:
            new[k] = sd["model.embed_tokens.weight"].clone()  # a tied dense model, untied here
        elif k.endswith("_proj.bias"):
            new[k] = torch.zeros_like(own[k])  # Qwen2's q/k/v biases: the dense model has none
    for i in range(n_layers):
        pre = f"model.layers.{i}.mlp."
        gate, up, down = (sd[pre + f"{n}_proj.weight"] for n in ("gate", "up", "down"))

        def jitter(w):
            return w + noise * w.std() * torch.randn(w.shape, generator=g)

        new[pre + "experts.gate_up_proj"] = torch.stack([torch.cat([jitter(gate), jitter(up)]) for _ in range(n_experts)])
        new[pre + "experts.down_proj"] = torch.stack([jitter(down) for _ in range(n_experts)])
        new[pre + "gate.weight"] = 0.02 * torch.randn(own[pre + "gate.weight"].shape, generator=g)
        if kind == "qwen2_moe":
            for n, w in (("gate", gate), ("up", up), ("down", down)):
                new[pre + f"shared_expert.{n}_proj.weight"] = w.clone()
            new[pre + "shared_expert_gate.weight"] = 0.02 * torch.randn(own[pre + "shared_expert_gate.weight"].shape,
                                                                         generator=g)
    missing = [k for k in own if k not in new and not (k == "lm_head.weight" and cfg.tie_word_embeddings)]
    if missing:
        raise RuntimeError(f"upcycling left parameters unset: {missing[:5]}")
    model.load_state_dict(new, strict=False)
    model = model.to(torch.bfloat16)
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    for f in _TOKENIZER_FILES:
        if (dense_dir / f).exists():
            shutil.copy(dense_dir / f, out_dir / f)
    return out_dir
