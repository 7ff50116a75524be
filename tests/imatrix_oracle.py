"""A deliberately plain importance matrix for tests: hooks on every nn.Linear, sum of x^2 per input
column and token counts, keyed by GGUF names. It is the hand computation analysis results are held to."""

from __future__ import annotations

import numpy as np
import torch

from dq.quant.imatrix import Imatrix, ImatrixEntry


def torch_imatrix(model_dir, text: str, n_tokens: int = 256, arch: str = "LLAMA") -> Imatrix:
    import gguf
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    names = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch), model.config.num_hidden_layers)
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    hooks = []
    for hf_name, mod in model.named_modules():
        if isinstance(mod, torch.nn.Linear):
            gname = names.get_name(hf_name + ".weight", try_suffixes=(".weight",))
            if gname is None:
                continue

            def hook(m, inp, out, gname=gname):
                x = inp[0].detach().reshape(-1, inp[0].shape[-1]).double()
                sums[gname] = sums.get(gname, 0) + (x * x).sum(0)
                counts[gname] = counts.get(gname, 0) + x.shape[0]

            hooks.append(mod.register_forward_hook(hook))
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    entries = {
        n: ImatrixEntry(sums[n].numpy().astype(np.float32)[None, :], np.array([counts[n]], np.float32)) for n in sums
    }
    return Imatrix(entries, datasets=("test",), chunk_count=1, chunk_size=n_tokens)
