"""Damage gradients: how a tensor's quantization error moves the model's KL divergence, in O(1) passes.

The planner needs, for every tensor ``t`` and type ``q``, the mean KL divergence ``KL(base || quant)``
of the next-token distribution when ``t`` is quantized to ``q``. At the base model the KL is zero with
zero gradient, so to second order it is a quadratic form in the weight error ``D = Q(W) - W``:

    KL ~= 1/2 vec(D)^T F vec(D),    F = E[grad_W s  grad_W s^T]   (the Fisher of the model's own outputs)

with ``s = v . z`` for logits ``z`` and a probe ``v`` whose covariance is the softmax Hessian
``H = diag(p) - p p^T``. We draw ``v = sqrt(p) * r - p (sqrt(p) . r)`` with Rademacher ``r`` (``E[v v^T] = H``),
one probe per calibration sequence over its scored positions, and scale it by ``1/sqrt(probes * scored)``
so the sum over probes is the mean over scored tokens. Quantization errors of different output rows are
independent (every row is quantized on its own), so the cross-row terms vanish in expectation and

    KL_t(q) ~= 1/2 sum_n sum_i (D_i . G_n,i)^2,     G_n = grad_W s_n = sum_tokens g_tok x_tok^T

is exact across positions and input columns and diagonal only across rows (:mod:`dq.analysis.measure`
evaluates it for every candidate). Errors of different tensors are independent too, so the predictions
add across tensors: this is the damage model of the planner. On SmolLM2 it predicted 40 measured mixed
plans (1.9-5 bits per weight) with Spearman 0.998 (``bench/damage_model.py`` measures it on every model).

Scored positions are llama-perplexity's: the second half of each sequence (``S/2 .. S-2``), where
``dq eval`` and llama.cpp measure KLD. ``G_n`` is only ever kept on the rows the measurement uses
(:func:`dq.analysis.measure.row_subsets`; for the LM head, rows drawn by their Fisher mass,
:func:`fisher_rows`), so the gradients of one block cost about ``probes x
max_elements`` floats per tensor.

Streaming: the analysis saves each block's input for the probe sequences on its forward sweep; the head
turns the final hidden states into probe gradients (:func:`head_probe`), and a backward sweep reloads one
block at a time, recomputes it from its saved input with autograd on, and backpropagates the gradient
arriving from the block above (:class:`BlockGradients` records ``G_n`` for each of its linear layers and
merged experts). Peak memory is one block plus one sequence's activations and the recorded gradients.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dq.analysis.collect import (
    BlockHooks,
    call_input,
    down_weight,
    expert_forward,
    gating,
    split_gate_up,
)
from dq.analysis.loader import ModelSkeleton
from dq.analysis.names import NameMapper

__all__ = ["scored_positions", "probe_scale", "ProbeSpec", "TensorGrads", "BlockGradients", "backward_block",
           "head_probe", "fisher_rows", "head_chunk_rows", "rademacher", "probe_signs", "norm_backward", "embedding_grads"]

_HEAD_CHUNK_BYTES = 32 << 20


def scored_positions(seq_len: int) -> slice:
    """Positions whose next-token distribution counts: llama-perplexity's second half, ``S/2 .. S-2``."""
    return slice(seq_len // 2, seq_len - 1)


def probe_scale(n_probes: int, seq_len: int) -> float:
    """Factor on each probe so that 1/2 the sum of squared projections over probes is a per-token mean."""
    sc = scored_positions(seq_len)
    return 1.0 / math.sqrt(n_probes * (sc.stop - sc.start))


@dataclass(frozen=True)
class ProbeSpec:
    """How the probes are drawn: their count (one per sequence), the sequence length and the seed."""

    n_probes: int
    seq_len: int
    seed: int = 0

    @property
    def scale(self) -> float:
        return probe_scale(self.n_probes, self.seq_len)


@dataclass
class TensorGrads:
    """Probe weight gradients of one GGUF tensor on its measured rows, and its activation samples.

    Attributes:
        name: GGUF name.
        rows: per matrix (expert), the measured row indices (None: all rows).
        grads: per matrix, one ``[measured rows, cols]`` float32 array per probe.
        samples: per matrix, the inputs of the sampled calibration tokens (``[t, cols]`` arrays).
    """

    name: str
    rows: list[np.ndarray | None]
    grads: list[list[np.ndarray]] = field(default_factory=list)
    samples: list[list[np.ndarray]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.grads = [[] for _ in self.rows]
        self.samples = [[] for _ in self.rows]

    def add_grad(self, e: int, g_out: torch.Tensor, x: torch.Tensor) -> None:
        """Record ``g_out[:, rows]^T x`` for matrix ``e`` (``g_out [t, out]``, ``x [t, in]``)."""
        rows = self.rows[e]
        g = g_out if rows is None else g_out[:, torch.from_numpy(rows).to(g_out.device)]
        self.grads[e].append((g.T.double() @ x.double()).float().cpu().numpy())

    @classmethod
    def join(cls, parts: list[TensorGrads]) -> TensorGrads:
        """One record from the records of several processes' probes, in their order (rows are seeded by the
        name, so every part measures the same rows)."""
        out = cls(parts[0].name, parts[0].rows)
        for part in parts:
            for e in range(len(out.rows)):
                out.grads[e].extend(part.grads[e])
                out.samples[e].extend(part.samples[e])
        return out

    def only(self, experts: range) -> TensorGrads:
        """A copy holding the gradients and samples of ``experts`` only (the others' lists empty)."""
        out = TensorGrads(self.name, self.rows)
        for e in experts:
            out.grads[e], out.samples[e] = self.grads[e], self.samples[e]
        return out

    def stacked(self, e: int) -> np.ndarray | None:
        """``[probes, measured rows, cols]`` of matrix ``e``; None if it saw no probe."""
        return np.stack(self.grads[e]) if self.grads[e] else None

    def sample_matrix(self, e: int) -> np.ndarray | None:
        return np.concatenate(self.samples[e]) if self.samples[e] else None


class BlockGradients(BlockHooks):
    """Hooks on one block that record every linear layer's (and merged expert's) probe weight gradient.

    Usage, per probe sequence: :meth:`sequence` with its token ids, the block's forward with autograd on,
    ``backward`` of its output with the gradient from above, then :meth:`finish`.

    Args:
        block: the decoder layer.
        block_path: its module path.
        mapper: HF -> GGUF names.
        subsets: ``(gguf name, n_mats, rows, cols) -> row subsets``: the measured rows of each matrix (None:
            all rows, e.g. for a tensor the converter reshapes, :mod:`dq.analysis.splits`).
        sampled: boolean mask over all probe tokens: whose inputs to keep for activation error.
    """

    def __init__(self, block: nn.Module, block_path: str, mapper: NameMapper,
                 subsets: Callable[[str, int, int, int], list[np.ndarray | None]], sampled: np.ndarray) -> None:
        self.block = block
        self.block_path = block_path
        self.mapper = mapper
        self._subsets = subsets
        self.sampled = sampled
        self.grads: dict[str, TensorGrads] = {}
        self._dense: list[tuple[TensorGrads, list]] = []  # (record, [x, g_out]) per call in this sequence
        self._experts: list[tuple[nn.Module, tuple[TensorGrads, TensorGrads, TensorGrads], list]] = []
        self._pending: list[Callable[[], None]] = []
        self._token_ids = np.zeros(0, dtype=np.int64)
        self._handles: list = []

    def sequence(self, token_ids: np.ndarray) -> None:
        self._token_ids = token_ids
        self._pending.clear()


    def _keep(self, n: int) -> torch.Tensor:
        if len(self._token_ids) != n:
            raise RuntimeError(f"hooked module saw {n} tokens, the runner announced {len(self._token_ids)}")
        return torch.from_numpy(self.sampled[self._token_ids])

    def _install_linear(self, path: str, mod: nn.Module) -> None:
        name = self.mapper.gguf_name(f"{path}.weight")
        out_f, in_f = (int(d) for d in mod.weight.shape)
        rec = TensorGrads(name, self._subsets(name, 1, out_f, in_f))
        self.grads[name] = rec

        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            if not y.requires_grad:
                return
            x = call_input(args, kwargs, "input").detach().reshape(-1, in_f).float()
            keep = self._keep(x.shape[0])
            if keep.any():
                rec.samples[0].append(x[keep.to(x.device)].cpu().numpy())
            box: list = []
            y.register_hook(lambda g: box.append(g.detach().reshape(-1, out_f).float()))
            self._pending.append(lambda: rec.add_grad(0, box[0], x) if box else None)

        self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))

    def _install_experts(self, path: str, mod: nn.Module, p: dict[str, torch.Tensor]) -> None:
        names = self.mapper.expert_names(path)
        n_exp = int(p["down_proj"].shape[0])
        g0, _ = split_gate_up(mod, p, 0)
        inter, hidden = (int(d) for d in g0.shape)
        out_f = int(down_weight(mod, p, 0).shape[0])
        gate = TensorGrads(names.gate, self._subsets(names.gate, n_exp, inter, hidden))
        up = TensorGrads(names.up, self._subsets(names.up, n_exp, inter, hidden))
        down = TensorGrads(names.down, self._subsets(names.down, n_exp, out_f, inter))
        self.grads.update({names.gate: gate, names.up: up, names.down: down})
        routed: list = []

        def pre_hook(module, args, kwargs):
            x = call_input(args, kwargs, "hidden_states")
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            w = args[2] if len(args) > 2 else kwargs["top_k_weights"]
            routed[:] = [x.detach().reshape(-1, x.shape[-1]).float(), idx.detach(), w.detach().float()]

        def hook(module, args, kwargs, output):
            y = output[0] if isinstance(output, tuple) else output
            if not y.requires_grad:
                return
            x, idx, w = routed
            keep = self._keep(x.shape[0])
            box: list = []
            y.register_hook(lambda g: box.append(g.detach().reshape(-1, y.shape[-1]).float()))
            self._pending.append(lambda: self._expert_grads(module, p, x, idx, w, keep, box[0],
                                                            (gate, up, down)) if box else None)

        self._handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))
        self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))

    @staticmethod
    def _expert_grads(mod, p, x, idx, w, keep, g_out, recs) -> None:
        """Each expert's gate/up/down weight gradients from the tokens routed to it.

        The experts module returns ``sum_k w_k down_e(act(gate_e x) * up_e x)`` over the token's chosen
        experts ``e``; its output gradient times the routing weight is the gradient at expert ``e``'s down
        output, and the local backward through ``act(a) * b`` gives those at its gate and up outputs.
        """
        gate, up, down = recs
        idx = idx.reshape(x.shape[0], -1)
        w = w.reshape(x.shape[0], -1)
        for e in range(int(p["down_proj"].shape[0])):
            hit = idx == e
            rows = hit.any(-1).nonzero().flatten()
            if rows.numel() == 0:
                continue
            xe = x[rows]
            we = (w[rows] * hit[rows]).sum(-1, keepdim=True)
            a, b, _, _ = expert_forward(mod, p, e, xe)
            wd = down_weight(mod, p, e).float()
            with torch.enable_grad():
                a, b = a.requires_grad_(True), b.requires_grad_(True)
                h = gating(mod, a, b)
                g_y = we * g_out[rows]
                g_a, g_b = torch.autograd.grad(h, (a, b), g_y @ wd)
            h = h.detach()
            gate.add_grad(e, g_a, xe)
            up.add_grad(e, g_b, xe)
            down.add_grad(e, g_y, h)
            k = keep[rows.cpu()]
            if k.any():
                gate.samples[e].append(xe[k.to(xe.device)].cpu().numpy())
                up.samples[e].append(gate.samples[e][-1])
                down.samples[e].append(h[k.to(h.device)].cpu().numpy())

    def finish(self) -> None:
        """After the sequence's backward: turn the recorded (input, output gradient) pairs into ``G_n``."""
        for fn in self._pending:
            fn()
        self._pending.clear()


def head_chunk_rows(d: int, n_tokens: int) -> int:
    """Vocabulary rows per chunk of :func:`head_probe` (its probes are drawn chunk by chunk)."""
    return max(1, _HEAD_CHUNK_BYTES // (4 * max(d, n_tokens)))


def rademacher(shape: tuple[int, int], seed: int, chunk: int, probe: int = 0) -> torch.Tensor:
    """The signs of probe sequence ``probe`` on vocabulary chunk ``chunk``: +-1, seeded per (probe, chunk), so
    every pass over the vocabulary redraws them and a probe's signs do not depend on which process runs it."""
    gen = torch.Generator().manual_seed((int(seed) * 1_000_003 + int(chunk)) * 65_537 + int(probe))
    return torch.randint(0, 2, shape, generator=gen, dtype=torch.int8).float() * 2 - 1


def probe_signs(n_probes: int, per_seq: int, cols: int, seed: int, chunk: int, first: int = 0) -> torch.Tensor:
    """``[n_probes * per_seq, cols]``: the signs of probes ``first .. first + n_probes - 1`` on one chunk."""
    return torch.cat([rademacher((per_seq, cols), seed, chunk, first + j) for j in range(n_probes)])


def fisher_rows(mass: np.ndarray, n_rows: int | None, seed: int, floor: float = 0.1) -> tuple[np.ndarray | None, np.ndarray]:
    """Which rows of a vocabulary matrix to measure, drawn by their Fisher mass, and each row's inclusion probability.

    A head row's share of the KL is about its Fisher mass ``m_v = sum_t p_tv (1 - p_tv)`` times its squared
    error, and the masses are Zipf-distributed: a uniform sample of 1% of the rows mostly misses the frequent
    tokens that carry the KL. Rows are drawn by Poisson sampling with ``pi_v = min(1, lam * ((1 - floor) m_v /
    sum m + floor / V))``, ``lam`` set so the expected count is ``n_rows``: the heaviest rows are kept for
    certain, every row keeps a chance. Weighting a measured row by ``1 / pi_v`` (Horvitz-Thompson) gives an
    unbiased estimate of the whole-matrix sum.

    Args:
        mass: ``[V]`` per-row Fisher mass (non-negative).
        n_rows: expected number of rows to measure; None or ``>= V``: all rows.
        seed: sampling seed.
        floor: share of the inclusion probability spread uniformly.

    Returns:
        The sorted measured rows (None: all) and their inclusion probabilities (``[len(rows)]``; ones for all).

    Example:
        >>> rows, pi = fisher_rows(np.array([100.0, 1, 1, 1, 1, 1, 1, 1]), 2, seed=0)
        >>> int(rows[0]), float(pi[0])
        (0, 1.0)
    """
    v = int(mass.shape[0])
    if n_rows is None or n_rows >= v:
        return None, np.ones(v)
    m = np.clip(mass.astype(np.float64), 0.0, None)
    share = (1 - floor) * m / m.sum() + floor / v if m.sum() > 0 else np.full(v, 1.0 / v)
    lo, hi = float(n_rows), float(n_rows) / share.min()
    for _ in range(100):  # sum(min(1, lam * share)) is increasing in lam
        lam = 0.5 * (lo + hi)
        lo, hi = (lam, hi) if np.minimum(1.0, lam * share).sum() < n_rows else (lo, lam)
    pi = np.minimum(1.0, hi * share)
    rows = np.flatnonzero(np.random.default_rng(seed).random(v) < pi)
    return rows, pi[rows]


def head_probe(
    sk: ModelSkeleton,
    head_weight: str,
    normed: torch.Tensor,
    spec: ProbeSpec,
    n_rows: int | None,
    softcap: float | None = None,
    *,
    first_probe: int = 0,
    ranks=None,
) -> tuple[torch.Tensor, np.ndarray | None, list[np.ndarray]]:
    """Probe gradients at the LM head, reading its weight in row chunks.

    Args:
        sk: the skeleton (the head is read with :meth:`ModelSkeleton.iter_rows`).
        head_weight: the LM head's parameter name (the input embedding's when tied).
        normed: final-normed hidden states of this process's probe sequences ``[n, S, d]``.
        spec: probe count (over all processes), sequence length and seed.
        n_rows: how many head rows the measurement uses, in expectation (None: all).
        softcap: final logit soft-capping (Gemma-2), applied as the model does.
        first_probe: the index of ``normed[0]`` among all probe sequences (its signs are that probe's).
        ranks: the :class:`~dq.analysis.ranks.Ranks` whose probes share the Fisher mass (default: one process).

    Returns:
        The gradient at ``normed`` (zero at unscored positions); the measured rows (:func:`fisher_rows`, by the
        probes' Fisher mass summed over every process; None: all); per probe of ``normed``, the head's weight
        gradient on those rows (``[rows, d]``), each row multiplied by ``1/sqrt(pi)`` so that the squared
        projections sum to the whole head's (measure it with ``rows_scale=1``).

    Three passes over the vocabulary (log-sum-exp; ``sqrt(p) . r`` and each row's Fisher mass; then the probe
    ``v`` itself), one chunk of rows at a time, so neither the head nor a ``[tokens, vocab]`` matrix is ever
    whole in memory.
    """
    n, s_len, d = normed.shape
    dev = torch.device(sk.device)
    sc = scored_positions(s_len)
    x = normed[:, sc].reshape(-1, d).float().to(dev)
    per_seq = sc.stop - sc.start
    rows_total = int(sk.module_param(head_weight).shape[0])
    chunk = head_chunk_rows(d, spec.n_probes * per_seq)

    def logits(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        z = x @ w.T
        if softcap:
            t = torch.tanh(z / softcap)
            return t * softcap, 1 - t * t
        return z, None

    def chunks():
        """The head's row chunks on ``dev``, each with its probes' signs (drawn on the CPU, the same on every
        device); on a GPU the next chunk's signs are drawn while this one computes."""
        with ThreadPoolExecutor(1) as pool:
            nxt = None
            for k, (r0, w) in enumerate(sk.iter_rows(head_weight, chunk)):
                cols = w.shape[0]
                cur = nxt if nxt is not None else pool.submit(probe_signs, n, per_seq, cols, spec.seed, k, first_probe)
                nxt = (pool.submit(probe_signs, n, per_seq, min(chunk, rows_total - r0 - cols), spec.seed, k + 1,
                                   first_probe) if dev.type != "cpu" and r0 + cols < rows_total else None)
                yield r0, w.to(dev), cur.result().to(dev)

    m = torch.full((x.shape[0],), -torch.inf, device=dev)
    ssum = torch.zeros(x.shape[0], device=dev)
    for _, w in sk.iter_rows(head_weight, chunk):
        z, _ = logits(w.to(dev))
        m_new = torch.maximum(m, z.max(-1).values)
        ssum = ssum * torch.exp(m - m_new) + torch.exp(z - m_new[:, None]).sum(-1)
        m = m_new
    lse = m + torch.log(ssum)
    c = torch.zeros(x.shape[0], device=dev)
    mass = np.zeros(rows_total)
    for r0, w, r in chunks():
        z, dcap = logits(w)
        p = torch.exp(z - lse[:, None])
        c += (torch.exp(0.5 * (z - lse[:, None])) * r).sum(-1)
        fisher = p * (1 - p) if dcap is None else p * (1 - p) * dcap * dcap
        mass[r0 : r0 + w.shape[0]] = fisher.sum(0, dtype=torch.float64).cpu().numpy()
    if ranks is not None:
        mass = ranks.sum(mass)  # every process draws the same rows from every probe's mass
    rows, pi = fisher_rows(mass, n_rows, spec.seed)
    g = torch.zeros_like(x)
    sel = None if rows is None else torch.from_numpy(rows).to(dev)
    weight = torch.from_numpy(1.0 / np.sqrt(pi))
    # every row's gradient (no subset) is [V, d] per probe: that stays in host memory
    acc = dev if sel is not None else torch.device("cpu")
    grads = [torch.zeros(rows_total if sel is None else len(sel), d, dtype=torch.float64, device=acc)
             for _ in range(n)]
    for r0, w, r in chunks():
        z, dcap = logits(w)
        p = torch.exp(z - lse[:, None])
        v = (p.sqrt() * r - p * c[:, None]) * spec.scale
        if dcap is not None:
            v = v * dcap
        g += v @ w
        if sel is None:
            local, dest = torch.arange(w.shape[0], device=dev), torch.arange(r0, r0 + w.shape[0])
        else:
            inside = (sel >= r0) & (sel < r0 + w.shape[0])
            dest = inside.nonzero().flatten()
            local = sel[inside] - r0
        if len(local):
            for j in range(n):
                t = slice(j * per_seq, (j + 1) * per_seq)
                grads[j][dest] += (v[t][:, local].T.double() @ x[t].double()).to(acc)
    g_full = torch.zeros(n, s_len, d)
    g_full[:, sc] = g.cpu().reshape(n, per_seq, d)
    return g_full, rows, [(gr.cpu() * weight[:, None]).float().numpy() for gr in grads]


def norm_backward(norm: nn.Module, hidden: torch.Tensor, g_normed: torch.Tensor, device: str) -> torch.Tensor:
    """The gradient at ``hidden [n, S, d]`` of ``norm``'s output gradient ``g_normed`` (one sequence at a time)."""
    out = torch.empty_like(hidden)
    for j in range(hidden.shape[0]):
        h = hidden[j : j + 1].to(device).requires_grad_(True)
        with torch.enable_grad():
            y = norm(h)
            (gh,) = torch.autograd.grad(y, h, g_normed[j : j + 1].to(device))
        out[j] = gh[0].float().cpu()
    return out


def embedding_grads(emb: nn.Module, rows: torch.Tensor, local_ids: torch.Tensor, g0: torch.Tensor,
                    device: str) -> np.ndarray:
    """Per probe, the gradient of the embedding weight restricted to the used ``rows [U, d]``.

    ``local_ids [n, S]`` index ``rows``; ``g0 [n, S, d]`` is the gradient at the first block's input. The
    embedding module's own forward runs (Gemma's scaling included), with ``rows`` as its weight.

    Returns:
        ``[n, U, d]`` float32.
    """
    meta_weight, padding_idx = emb.weight, getattr(emb, "padding_idx", None)
    leaf = nn.Parameter(rows.to(device), requires_grad=True)
    out = np.zeros((local_ids.shape[0], *rows.shape), dtype=np.float32)
    try:
        emb.weight = leaf
        if padding_idx is not None:
            emb.padding_idx = None
        for j in range(local_ids.shape[0]):
            with torch.enable_grad():
                h = emb(local_ids[j : j + 1].to(device))
                (gw,) = torch.autograd.grad(h, leaf, g0[j : j + 1].to(device).to(h.dtype))
            out[j] = gw.float().cpu().numpy()
    finally:
        emb.weight = meta_weight
        if padding_idx is not None:
            emb.padding_idx = padding_idx
    return out


def backward_block(sk: ModelSkeleton, i: int, inputs: torch.Tensor, g_out: torch.Tensor, layer_args,
                   collector: BlockGradients, seq_len: int, first_seq: int = 0) -> torch.Tensor:
    """Recompute loaded block ``i`` on its saved ``inputs [n, S, d]`` and backpropagate ``g_out``.

    ``first_seq`` is the index of ``inputs[0]`` among all probe sequences (the collector's token ids are global).

    Returns:
        The gradient at the block's input ``[n, S, d]``.
    """
    layer = sk.module(sk.layer_prefix(i))
    args, kwargs = layer_args.args[i], layer_args.kwargs[i]
    g_in = torch.empty_like(inputs)
    for j in range(inputs.shape[0]):
        s = first_seq + j
        collector.sequence(np.arange(s * seq_len, (s + 1) * seq_len))
        x = inputs[j : j + 1].to(sk.device).requires_grad_(True)
        with torch.enable_grad():
            y = layer(x, *args, **kwargs)
            y = y[0] if isinstance(y, tuple) else y
            (gx,) = torch.autograd.grad(y, x, g_out[j : j + 1].to(sk.device).to(y.dtype))
        collector.finish()
        g_in[j] = gx[0].float().cpu()
    return g_in
