"""Block-by-block forward passes through a :class:`~dq.analysis.loader.ModelSkeleton`.

The decoder loop is transformers' own: :func:`embed` runs the text model's forward once per sequence
with every decoder layer replaced by a stub that records the arguments the loop passes it (attention
masks and rotary embeddings, per layer, so Gemma-3's sliding/full layers each get theirs) and returns
its input. Each real layer is then run on its own, on all calibration sequences, with those arguments:
only one layer's weights are ever in memory. Sequences all have the same length and no padding, so one
sequence's arguments serve every sequence.

Whole-vocabulary matrices are never resident in float32: :func:`embed` gives the embedding module only
the rows of the tokens it will see (read in row chunks), and the LM head is applied in vocabulary chunks
(:func:`head_scores`).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from dq.analysis.loader import ModelSkeleton

__all__ = ["LayerArgs", "embed", "run_layer", "final_norm", "final_hidden", "head_logprobs", "softcap",
           "used_rows", "tokenize_calibration"]

log = logging.getLogger(__name__)


class _Capture(nn.Module):
    """Stands in for a decoder layer: records its call arguments and returns the hidden states."""

    def __init__(self, layer: nn.Module, sink: list) -> None:
        super().__init__()
        object.__setattr__(self, "_layer", layer)
        object.__setattr__(self, "_sink", sink)

    def __getattr__(self, name: str):  # layer attributes the loop reads (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_layer"), name)

    def forward(self, hidden_states, *args, **kwargs):
        self._sink.append((hidden_states, args, kwargs))
        return hidden_states


@dataclass
class LayerArgs:
    """What the decoder loop passes each layer besides the hidden states."""

    args: list[tuple]
    kwargs: list[dict[str, Any]]


def used_rows(sk: ModelSkeleton, name: str, ids: torch.Tensor, chunk_bytes: int = 32 << 20) -> torch.Tensor:
    """float32 rows ``ids`` (sorted, unique) of parameter ``name``, read in row chunks."""
    shape = sk.module_param(name).shape
    chunk = max(1, chunk_bytes // (4 * max(1, int(np.prod(shape[1:])))))
    parts = []
    for r0, rows in sk.iter_rows(name, chunk):
        sel = ids[(ids >= r0) & (ids < r0 + rows.shape[0])] - r0
        if sel.numel():
            parts.append(rows[sel].clone())
        del rows
    return torch.cat(parts)


def embed(sk: ModelSkeleton, input_ids: torch.Tensor) -> tuple[torch.Tensor, LayerArgs]:
    """Embed ``input_ids [n_seq, seq_len]`` and capture every layer's call arguments.

    The embedding module gets a float32 weight holding only the rows of the tokens in ``input_ids`` and
    sees their indices into it (the rows are the checkpoint's, so the hidden states are unchanged); its
    own forward (e.g. Gemma's scaling) still runs. The text model's other parameters outside the layers
    (norms) are loaded and freed.

    Returns:
        float32 hidden states ``[n_seq, seq_len, d]`` entering layer 0, and the per-layer arguments.
    """
    layers: nn.ModuleList = sk.module(sk.layers_path)
    originals = list(layers)
    sink: list = []
    emb = sk.model.get_input_embeddings()
    emb_path = next(n for n, m in sk.model.named_modules() if m is emb)
    meta_weight = emb.weight
    uniq = torch.unique(input_ids)
    local_ids = torch.searchsorted(uniq, input_ids)
    padding_idx = getattr(emb, "padding_idx", None)
    hidden = []
    layer_args: LayerArgs | None = None
    try:
        sk.load(sk.text_model_path, exclude=(sk.layers_path, emb_path))
        emb.weight = nn.Parameter(used_rows(sk, f"{emb_path}.weight", uniq).to(sk.device), requires_grad=False)
        if padding_idx is not None:  # only masks gradients, and the index may not exist in the small table
            emb.padding_idx = None
        for i in range(len(originals)):
            layers[i] = _Capture(originals[i], sink)
        with torch.no_grad():
            for s in range(input_ids.shape[0]):
                sink.clear()
                sk.text_model(input_ids=local_ids[s : s + 1].to(sk.device), use_cache=False)
                if len(sink) != len(originals):
                    raise RuntimeError(f"the decoder loop called {len(sink)} of {len(originals)} layers")
                hidden.append(sink[0][0].float().cpu())
                if layer_args is None:
                    layer_args = LayerArgs([a for _, a, _ in sink], [_detach(k) for _, _, k in sink])
    finally:
        for i, layer in enumerate(originals):
            layers[i] = layer
        emb.weight = meta_weight
        if padding_idx is not None:
            emb.padding_idx = padding_idx
        sk.free(sk.text_model_path)
    assert layer_args is not None
    return torch.cat(hidden), layer_args


def _detach(kwargs: dict[str, Any]) -> dict[str, Any]:
    out = dict(kwargs)
    out.pop("cache", None)
    out.pop("past_key_values", None)
    out.pop("past_key_value", None)
    return out


def run_layer(
    sk: ModelSkeleton,
    i: int,
    hidden: torch.Tensor,
    layer_args: LayerArgs,
    *,
    before_seq: Callable[[int], None] | None = None,
) -> torch.Tensor:
    """Run loaded layer ``i`` over every sequence of ``hidden [n_seq, S, d]``; returns its output."""
    layer = sk.module(sk.layer_prefix(i))
    out = torch.empty_like(hidden)
    args, kwargs = layer_args.args[i], layer_args.kwargs[i]
    with torch.no_grad():
        for s in range(hidden.shape[0]):
            if before_seq is not None:
                before_seq(s)
            y = layer(hidden[s : s + 1].to(sk.device), *args, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            out[s] = y[0].float().cpu()
    return out


def final_norm(sk: ModelSkeleton) -> tuple[nn.Module, str]:
    """The text model's final norm module and its module path."""
    tm = sk.text_model
    for name in ("norm", "final_layernorm", "final_layer_norm", "ln_f"):
        if hasattr(tm, name):
            norm = getattr(tm, name)
            return norm, next(n for n, m in sk.model.named_modules() if m is norm)
    raise RuntimeError(f"{type(tm).__name__} has no final norm module")


def final_hidden(sk: ModelSkeleton, hidden: torch.Tensor) -> torch.Tensor:
    """Apply the text model's final norm (loading and freeing it)."""
    norm, path = final_norm(sk)
    sk.load(path)
    try:
        with torch.no_grad():
            return torch.cat([norm(hidden[s : s + 1].to(sk.device)).float().cpu() for s in range(hidden.shape[0])])
    finally:
        sk.free(path)


def softcap(sk: ModelSkeleton) -> float | None:
    """Final logit soft-capping of the model (Gemma-2), or None."""
    v = getattr(sk.text_config, "final_logit_softcapping", None)
    return float(v) if v else None


def head_logprobs(sk: ModelSkeleton, normed: torch.Tensor, chunk: int = 256):
    """Yield ``(token slice, log-softmax logits)`` chunks of the LM head on ``normed [n_seq, S, d]``.

    The LM head must be loaded by the caller; chunks keep the ``[tokens, vocab]`` matrix small.
    """
    head = sk.model.get_output_embeddings()
    cap = softcap(sk)
    flat = normed.reshape(-1, normed.shape[-1])
    for t0 in range(0, flat.shape[0], chunk):
        # no_grad per chunk, never across a yield: a generator suspended inside the context would leave
        # autograd off in the caller (and for good, if the caller stops early)
        with torch.no_grad():
            logits = head(flat[t0 : t0 + chunk].to(sk.device)).float()
            if cap:
                logits = torch.tanh(logits / cap) * cap
            logp = torch.log_softmax(logits, -1).cpu()
        yield slice(t0, t0 + logp.shape[0]), logp


def tokenize_calibration(
    tokenizer, text: str, n_tokens: int, seq_len: int, *, chat_template: bool = False
) -> torch.Tensor:
    """Cut ``text`` into ``ceil(n_tokens / seq_len)`` sequences of ``seq_len`` tokens (fewer if short).

    Paragraphs (blank-line separated) are samples; with ``chat_template`` each is wrapped as a user turn
    in the tokenizer's chat template. Each sequence starts with BOS when the tokenizer adds one.
    """
    samples = [p.strip() for p in text.split("\n\n") if p.strip()]
    ids: list[int] = []
    n_seq = -(-n_tokens // seq_len)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", True) else None
    body = seq_len - (1 if bos is not None else 0)
    for sample in samples:
        if chat_template:
            piece = tokenizer.apply_chat_template([{"role": "user", "content": sample}], tokenize=False)
            toks = tokenizer(piece, add_special_tokens=False)["input_ids"]
        else:
            toks = tokenizer(sample + "\n\n", add_special_tokens=False)["input_ids"]
        ids.extend(toks)
        if len(ids) >= n_seq * body:
            break
    n_avail = min(n_seq, len(ids) // body)
    rows = []
    for s in range(n_avail):
        row = ids[s * body : (s + 1) * body]
        rows.append(([bos] if bos is not None else []) + row)
    return torch.tensor(np.array(rows, dtype=np.int64).reshape(n_avail, seq_len))


# [tokens x vocab-chunk] float32 logits of one variant stay under this many bytes.
_LOGIT_CHUNK_BYTES = 16 << 20
_TOKEN_CHUNK = 1024

HeadTransform = Callable[[torch.Tensor, int], torch.Tensor]


def variant_scores(
    sk: ModelSkeleton,
    normed: dict,
    input_ids: torch.Tensor,
    *,
    positions: slice | None = None,
    head_transforms: dict | None = None,
) -> tuple[dict, dict]:
    """Mean NLL of every variant in ``normed`` (key None = the unmodified model) and each one's mean KL
    divergence from None, over the LM head streamed in vocabulary chunks.

    NLL = LSE(z) - z[target]; KL(p_b || p_k) = sum_v p_b (z_b - z_k) - LSE(z_b) + LSE(z_k), each sum
    accumulated over vocabulary chunks with a running maximum (rescaled when it moves).

    Args:
        sk: the model (its LM head is read row chunk by row chunk).
        normed: variant key -> final hidden states ``[n_seq, S, d]`` after the final norm; None must be present.
        input_ids: ``[n_seq, S]`` token ids (the NLL's targets are the next tokens).
        positions: score only these positions of each sequence (default: all).
        head_transforms: variant key -> ``f(rows, r0)`` giving that variant's head rows ``r0..`` (e.g. the head
            quantized): the variant's logits use them instead of the checkpoint's.

    Returns:
        ``(nll, kld)``: dicts keyed like ``normed`` (``kld`` without None).
    """
    head = sk.output_head_path()
    head_mod = sk.module(head)
    has_bias = getattr(head_mod, "bias", None) is not None
    cap = softcap(sk)
    transforms = head_transforms or {}
    n_seq, seq = input_ids.shape
    targets = torch.cat([input_ids[:, 1:], torch.full((n_seq, 1), -1)], 1)
    keep = torch.zeros(seq, dtype=torch.bool)
    keep[positions if positions is not None else slice(None)] = True
    targets = targets[:, keep].reshape(-1)
    valid = targets >= 0
    flat = {k: v[:, keep].reshape(-1, v.shape[-1]) for k, v in normed.items()}
    keys = [None] + [k for k in flat if k is not None]
    nll = {k: 0.0 for k in keys}
    kld = {k: 0.0 for k in keys if k is not None}
    n_all = int(targets.numel())
    for t0 in range(0, n_all, _TOKEN_CHUNK):
        t1 = min(n_all, t0 + _TOKEN_CHUNK)
        tc = t1 - t0
        tg = targets[t0:t1]
        x = {k: flat[k][t0:t1].to(sk.device) for k in keys}
        m = {k: torch.full((tc,), -math.inf, dtype=torch.float64) for k in keys}
        ssum = {k: torch.zeros(tc, dtype=torch.float64) for k in keys}
        tgt = {k: torch.zeros(tc, dtype=torch.float64) for k in keys}
        cross = {k: torch.zeros(tc, dtype=torch.float64) for k in keys if k is not None}
        vchunk = max(1, _LOGIT_CHUNK_BYTES // (4 * tc))
        rows = sk.iter_rows(f"{head}.weight", vchunk)
        biases = sk.iter_rows(f"{head}.bias", vchunk) if has_bias else None
        with torch.no_grad():
            for r0, w in rows:
                w = w.to(sk.device)
                b = next(biases)[1].to(sk.device) if biases is not None else None
                r1 = r0 + w.shape[0]
                hit = ((tg >= r0) & (tg < r1)).nonzero().flatten()
                zb = eb = scale_b = None
                for k in keys:
                    wk = transforms[k](w, r0) if k in transforms else w
                    z = x[k] @ wk.T
                    if b is not None:
                        z = z + b
                    if cap:
                        z = torch.tanh(z / cap) * cap
                    m_new = torch.maximum(m[k], z.amax(1).double().cpu())
                    e = torch.exp(z - m_new.to(z.device, torch.float32)[:, None])
                    scale = torch.exp(m[k] - m_new)
                    ssum[k] = ssum[k] * scale + e.sum(1).double().cpu()
                    m[k] = m_new
                    if hit.numel():
                        tgt[k][hit] = z[hit.to(z.device), (tg[hit] - r0).to(z.device)].double().cpu()
                    if k is None:
                        zb, eb, scale_b = z, e, scale
                    else:
                        cross[k] = cross[k] * scale_b + (eb * (zb - z)).sum(1).double().cpu()
                    del z, e, wk
                del zb, eb, w
        lse = {k: m[k] + torch.log(ssum[k]) for k in keys}
        v = valid[t0:t1]
        for k in keys:
            nll[k] += float((lse[k] - tgt[k])[v].sum())
            if k is not None:
                kld[k] += float((cross[k] / ssum[None] - lse[None] + lse[k]).sum())
    n_tok = int(valid.sum())
    return {k: v / n_tok for k, v in nll.items()}, {k: v / n_all for k, v in kld.items()}
