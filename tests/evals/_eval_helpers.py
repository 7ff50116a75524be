"""Test material for dq eval: a quick torch imatrix and a deliberately broken GGUF."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np

# HF module path -> GGUF tensor name (llama layout)
_HF_TO_GGUF = [
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.q_proj$"), "blk.{}.attn_q.weight"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.k_proj$"), "blk.{}.attn_k.weight"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.v_proj$"), "blk.{}.attn_v.weight"),
    (re.compile(r"model\.layers\.(\d+)\.self_attn\.o_proj$"), "blk.{}.attn_output.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.gate_proj$"), "blk.{}.ffn_gate.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.up_proj$"), "blk.{}.ffn_up.weight"),
    (re.compile(r"model\.layers\.(\d+)\.mlp\.down_proj$"), "blk.{}.ffn_down.weight"),
]


def torch_imatrix(model_dir: Path, text: str, n_tokens: int = 512, chunk: int = 256):
    """Sum of x^2 per input column of every linear layer over ``n_tokens`` of ``text``, keyed by GGUF
    names (what llama-imatrix collects), as a :class:`dq.quant.imatrix.Imatrix`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dq.quant.imatrix import Imatrix, ImatrixEntry

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = tok(text[: n_tokens * 8], add_special_tokens=False).input_ids[:n_tokens]
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for name, mod in model.named_modules():
        if not isinstance(mod, torch.nn.Linear):
            continue
        for rx, fmt in _HF_TO_GGUF:
            m = rx.match(name)
            if m:
                gname = fmt.format(m.group(1))

                def hook(_mod, inp, _out, gname=gname):
                    x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                    sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
                    counts[gname] = counts.get(gname, 0) + x.shape[0]

                hooks.append(mod.register_forward_hook(hook))
    with torch.inference_mode():
        for i in range(0, len(ids), chunk):
            model(torch.tensor([ids[i:i + chunk]]))
    for h in hooks:
        h.remove()
    entries = {n: ImatrixEntry(sums[n].float().numpy()[None, :], np.array([counts[n]], dtype=np.float32))
               for n in sorted(sums)}
    return Imatrix(entries, datasets=("c4",), chunk_count=(len(ids) + chunk - 1) // chunk, chunk_size=chunk)


def zero_super_weights(src_bf16_gguf: Path, dst: Path, layers: tuple[int, ...] = (1, 2)) -> list[tuple[str, tuple, float]]:
    """Copy a BF16 GGUF and zero the largest-magnitude weight of ``ffn_down`` in ``layers`` (SmolLM2's super
    weights sit in hidden channel 507 of the early down projections). Returns what was zeroed."""
    import gguf

    shutil.copyfile(src_bf16_gguf, dst)
    reader = gguf.GGUFReader(dst, "r+")
    zeroed = []
    wanted = {f"blk.{i}.ffn_down.weight" for i in layers}
    for t in reader.tensors:
        if t.name in wanted:
            assert t.tensor_type == gguf.GGMLQuantizationType.BF16, t.tensor_type
            w16 = t.data.view(np.uint16)
            w = (w16.astype(np.uint32) << 16).view(np.float32)
            idx = np.unravel_index(int(np.abs(w).argmax()), w.shape)
            zeroed.append((t.name, tuple(int(i) for i in idx), float(w[idx])))
            w16[idx] = 0
    reader.data.flush()
    del reader
    return zeroed
