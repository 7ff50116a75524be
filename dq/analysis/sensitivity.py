"""Calibrating the damage model: how much one tensor's quantization error moves the final logits.

The analysis measures each tensor's *local* error (relative activation error of ``X W^T``). The planner
needs *global* damage: the KL divergence of the model's next-token distribution. For each tensor ``t``
we quantize only ``t`` to a probe type (the measured candidate nearest 2.6 bits that needs no imatrix;
Q2_K by default), run the model on calibration text (never the held-out evaluation text) and measure
the mean KLD against the unperturbed model. The tensor's gain is

    gain[t] = KLD(t quantized to probe) / err[t, probe]

and the planner predicts ``damage[t, q] = gain[t] * err[t, q]``, assuming damage adds across tensors
and scales linearly with the local error (first-order; checked by the quality-vs-size bench).
Tensors that cannot be perturbed one by one (merged MoE experts) get the median gain of their layer.

The model is held in memory in fp32 for this pass: fine for the models this machine can hold; a
streaming version (one block at a time, as ``dq analyze`` streams) is future work.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from dq.analysis.allocate import _err
from dq.analysis.artifact import Analysis
from dq.quant import libggml
from dq.quant.formats import FORMATS, QuantFormat, effective_format

__all__ = ["pick_probe", "calibrate_gains", "load_or_calibrate_gains"]

log = logging.getLogger(__name__)


def pick_probe(analysis: Analysis) -> QuantFormat:
    """The measured candidate nearest 2.6 bits per weight that needs no imatrix."""
    pool = [f for f in analysis.candidates if not FORMATS[f].needs_imatrix and not FORMATS[f].is_float]
    if not pool:
        raise ValueError("the analysis measured no candidate that works without an imatrix")
    return min(pool, key=lambda f: abs(FORMATS[f].bits_per_weight - 2.6))


def _kld(base_logp, logits) -> float:
    import torch

    logq = torch.log_softmax(logits.float(), -1)
    return float((base_logp.exp() * (base_logp - logq)).sum(-1).mean())


def calibrate_gains(
    model_dir: str | Path,
    analysis: Analysis,
    *,
    text: str | None = None,
    n_tokens: int = 512,
    probe: QuantFormat | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> dict[str, float]:
    """Measure every tensor's gain (see module docstring). Returns GGUF name -> gain."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from dq.data import calibration_text

    probe = probe or pick_probe(analysis)
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    text = text if text is not None else calibration_text()[-200_000:]
    ids = tok(text, return_tensors="pt").input_ids[:, :n_tokens]
    params = dict(model.named_parameters())
    with torch.no_grad():
        base_logp = torch.log_softmax(model(ids).logits[0].float(), -1)
    gains: dict[str, float] = {}
    targets = [t for t in analysis.tensors if t.hf_name in params and len(t.shape) == 2
               and tuple(params[t.hf_name].shape) == tuple(t.shape) and _err(t, probe)]
    for i, t in enumerate(targets):
        p = params[t.hf_name]
        original = p.data.clone()
        w = original.numpy()
        stored = effective_format(probe, w.shape)  # probe needs no imatrix, nor do its fallbacks
        q = libggml.dequantize(libggml.quantize(w, stored), stored, w.shape)
        with torch.no_grad():
            p.data.copy_(torch.from_numpy(q))
            kld = _kld(base_logp, model(ids).logits[0])
            p.data.copy_(original)
        gains[t.name] = max(kld, 0.0) / float(_err(t, probe))
        if (i + 1) % 25 == 0 or i + 1 == len(targets):
            log.info("calibrating damage gains: %d/%d tensors probed at %s", i + 1, len(targets), probe)
        if progress is not None:
            progress(i + 1, len(targets))
    # tensors not perturbed one by one: median gain of their layer (else of all)
    by_layer: dict[int | None, list[float]] = {}
    for t in analysis.tensors:
        if t.name in gains:
            by_layer.setdefault(t.layer, []).append(gains[t.name])
    overall = float(np.median(list(gains.values()))) if gains else 1.0
    for t in analysis.tensors:
        if t.name not in gains:
            vals = by_layer.get(t.layer)
            gains[t.name] = float(np.median(vals)) if vals else overall
    return gains


def load_or_calibrate_gains(model_dir: str | Path, analysis: Analysis, cache_file: str | Path,
                            **kw) -> Mapping[str, float]:
    """Gains from ``cache_file`` if it was made for this analysis, else calibrate and store them."""
    cache_file = Path(cache_file)
    key = {"model": analysis.model, "n_tensors": len(analysis.tensors), "probe": (kw.get("probe") or pick_probe(analysis)).value}
    if cache_file.is_file():
        data = json.loads(cache_file.read_text())
        if data.get("key") == key:
            return data["gains"]
    gains = calibrate_gains(model_dir, analysis, **kw)
    from dq.export.atomic import atomic_path

    with atomic_path(cache_file) as tmp:
        tmp.write_text(json.dumps({"key": key, "gains": gains}, indent=1))
    return gains
