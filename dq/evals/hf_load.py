"""Load a Hugging Face causal LM for evaluation, optionally with its bitsandbytes 4-bit layers densified.

bitsandbytes' CPU path runs a 4-bit ``Linear4bit`` as dequantize-then-matmul, several times slower than a
plain ``nn.Linear``; lm-eval's MMLU on a dynamic NF4 checkpoint then takes seconds per request.
:func:`densify_4bit` swaps each ``Linear4bit`` for an ``nn.Linear`` holding exactly the weights
bitsandbytes would dequantize (``bitsandbytes.functional.dequantize_4bit``), so the model computes the
same function with the matmul in the model's dtype rather than bitsandbytes' compute dtype.

Example:
    >>> model = load_causal_lm("out/smollm2-dyn-nf4", "float32", dense_4bit=True)  # doctest: +SKIP
"""

from __future__ import annotations

import logging
from pathlib import Path

__all__ = ["densify_4bit", "load_causal_lm"]

log = logging.getLogger(__name__)


def densify_4bit(model, dtype=None) -> int:
    """Replace every ``bitsandbytes.nn.Linear4bit`` in ``model`` by an ``nn.Linear`` of its dequantized weight.

    Args:
        model: a ``torch.nn.Module`` (e.g. loaded from a bnb-4bit checkpoint).
        dtype: dtype of the new layers (default: the 4-bit layer's compute dtype, else float32).

    Returns:
        The number of layers replaced (0 when bitsandbytes is not installed or nothing is 4-bit).
    """
    import torch

    try:
        import bitsandbytes as bnb
    except ImportError:
        return 0
    n = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if not isinstance(child, bnb.nn.Linear4bit):
                continue
            w = bnb.functional.dequantize_4bit(child.weight.data, child.weight.quant_state)
            dt = dtype or getattr(child, "compute_dtype", None) or torch.float32
            dense = torch.nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                                    device=w.device, dtype=dt)
            with torch.no_grad():
                dense.weight.copy_(w.reshape(child.out_features, child.in_features).to(dt))
                if child.bias is not None:
                    dense.bias.copy_(child.bias.to(dt))
            setattr(parent, name, dense)
            n += 1
    return n


def load_causal_lm(path: str | Path, dtype: str = "float32", *, dense_4bit: bool = False):
    """``AutoModelForCausalLM.from_pretrained(path)`` in eval mode, densified when ``dense_4bit``."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, dtype)).eval()
    if dense_4bit:
        # a bnb checkpoint loads its 16-bit modules in the compute dtype whatever `dtype` says; once no
        # 4-bit layer is left the whole model can move to `dtype` (bf16 -> float32 is exact)
        n = densify_4bit(model)
        torch.nn.Module.to(model, getattr(torch, dtype))  # transformers' own .to refuses any bnb model
        log.info("densified %d bitsandbytes 4-bit layers of %s; running in %s", n, path, dtype)
    return model
