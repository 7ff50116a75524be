"""NF4 quantization of linear weights with bitsandbytes, and the activation error it causes.

One forward pass over calibration text with a hook on every ``nn.Linear`` measures, for the NF4 weights
that will actually be written (same bitsandbytes call, same blocksize and double quantization):

- ``act_err``   = ||X W^T - X Q(W)^T||^2 / ||X W^T||^2 (the quantity ``dq analyze`` stores as ``act_err``),
- ``weight_err`` = ||W - Q(W)||^2 / ||W||^2,
- ``input_spike`` = max |x| over the module's inputs (massive activations mark super-weight down_proj).

Each module's error is measured in isolation (the model runs unquantized), as llama.cpp's imatrix and
``dq analyze`` do, so errors of different modules do not mask each other.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from dq.errors import DQError

__all__ = [
    "BitsAndBytesMissingError",
    "NF4Weight",
    "require_bitsandbytes",
    "quantize_nf4",
    "dequantize_nf4",
    "measure_nf4",
]

log = logging.getLogger(__name__)

BLOCKSIZE = 64  # bitsandbytes' default for 4-bit (and Unsloth's / QLoRA's)


class BitsAndBytesMissingError(DQError, ImportError):
    """bitsandbytes (needed for safetensors NF4 output) is not installed or too old."""


def require_bitsandbytes():
    """Import bitsandbytes or raise :class:`BitsAndBytesMissingError` naming the fix."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise BitsAndBytesMissingError(
            "--format safetensors needs bitsandbytes >= 0.47 (NF4 on CPU); install it with "
            "`pip install 'bitsandbytes>=0.47'` or `pip install 'dq[train]'`"
        ) from exc
    major, minor = (int(p) for p in bnb.__version__.split(".")[:2])
    if (major, minor) < (0, 47):
        raise BitsAndBytesMissingError(
            f"bitsandbytes {bnb.__version__} cannot quantize to NF4 on CPU; upgrade: `pip install -U 'bitsandbytes>=0.47'`"
        )
    return bnb


@dataclass(frozen=True)
class NF4Weight:
    """A bitsandbytes-quantized weight: packed uint8 codes plus its ``QuantState``."""

    packed: object  # torch.Tensor, uint8, shape (out*in/2, 1)
    state: object  # bitsandbytes.functional.QuantState

    def serialized(self, prefix: str) -> dict:
        """State-dict entries exactly as ``bnb.nn.Linear4bit`` saves them (``prefix`` = ``<module>.weight``)."""
        out = {prefix: self.packed.contiguous()}
        for k, v in self.state.as_dict(packed=True).items():
            out[f"{prefix}.{k}"] = v.contiguous()
        return out


def quantize_nf4(weight, *, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> NF4Weight:
    """Quantize one 2-D weight to NF4 with bitsandbytes (the reference: this is what Linear4bit does)."""
    bnb = require_bitsandbytes()
    packed, state = bnb.functional.quantize_4bit(
        weight.detach().contiguous(), blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4"
    )
    return NF4Weight(packed, state)


def dequantize_nf4(q: NF4Weight):
    bnb = require_bitsandbytes()
    return bnb.functional.dequantize_4bit(q.packed, q.state)


def measure_nf4(
    model,
    batches,
    quantized: Mapping[str, NF4Weight],
    *,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, dict[str, float]]:
    """Run ``batches`` through ``model`` (unquantized) and measure NF4 damage on every module in ``quantized``.

    Returns:
        module name -> {"act_err", "weight_err", "input_spike"}.
    """
    import torch

    modules = dict(model.named_modules())
    acc: dict[str, list[float]] = {name: [0.0, 0.0, 0.0] for name in quantized}
    weight_err: dict[str, float] = {}
    deltas = {}
    for name, q in quantized.items():
        w = modules[name].weight.detach().float()
        d = w - dequantize_nf4(q).float()
        deltas[name] = d.to(modules[name].weight.dtype)
        weight_err[name] = float(d.square().sum() / w.square().sum().clamp(min=1e-30))

    def make_hook(name: str):
        def hook(mod, inp, out):
            x = inp[0].detach().reshape(-1, mod.in_features).float()
            y = out.detach().reshape(-1, mod.out_features).float()
            e = x @ deltas[name].float().T
            a = acc[name]
            a[0] += float(e.square().sum())
            a[1] += float(y.square().sum())
            a[2] = max(a[2], float(x.abs().max()))

        return hook

    # Skip the output head: it is kept 16-bit and a vocabulary-wide matmul would dominate the pass.
    body = getattr(model, model.base_model_prefix, model)
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in quantized]
    try:
        with torch.inference_mode():
            for i, batch in enumerate(batches):
                body(input_ids=batch.unsqueeze(0), use_cache=False)
                if progress:
                    progress(i + 1, len(batches))
    finally:
        for h in handles:
            h.remove()
    return {
        name: {"act_err": a[0] / max(a[1], 1e-30), "weight_err": weight_err[name], "input_spike": a[2]}
        for name, a in acc.items()
    }
