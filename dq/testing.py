"""Tiny real models for fast tests (torchao's ``ToySingleLinearModel`` idea, as full HF checkpoints).

Widths are multiples of 256 so every K- and IQ-type applies without block-size fallback. The tokenizer
is a SentencePiece model trained at call time (well under a second) on packaged text, so llama.cpp's
converter takes its SentencePiece path and no pre-tokenizer hash is involved. Weights are random but
seeded: outputs are deterministic.
"""

from __future__ import annotations

import json
from pathlib import Path

__all__ = ["train_sentencepiece", "tiny_llama"]

_FALLBACK_TEXT = (
    "The quick brown fox jumps over the lazy dog. A model is quantized to fewer bits per weight. "
    "Calibration text flows through every layer, and the importance of each input column is measured. "
)


def _training_text() -> str:
    try:
        from dq.data import text_file

        return text_file("tiny").read_text(encoding="utf-8")[:200_000]
    except Exception:  # the data package is optional for this helper
        return _FALLBACK_TEXT * 200


def train_sentencepiece(out_dir: str | Path, vocab_size: int = 512) -> Path:
    """Train a small SentencePiece BPE model into ``out_dir/tokenizer.model``."""
    import io

    import sentencepiece as spm

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    lines = [ln for ln in _training_text().splitlines() if ln.strip()]
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=buf, vocab_size=vocab_size, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        num_threads=1, minloglevel=2,
    )
    path = out_dir / "tokenizer.model"
    path.write_bytes(buf.getvalue())
    return path


def tiny_llama(
    out_dir: str | Path,
    *,
    hidden: int = 256,
    intermediate: int = 512,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    vocab_size: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
) -> Path:
    """Write a tiny random LlamaForCausalLM (bf16 safetensors + SentencePiece tokenizer) to ``out_dir``."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out_dir = Path(out_dir)
    train_sentencepiece(out_dir, vocab_size)
    config = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie_word_embeddings,
    )
    config.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out_dir)
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False, "legacy": False,
    }))
    return out_dir
