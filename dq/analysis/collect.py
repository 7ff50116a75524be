"""Forward hooks that gather calibration statistics inside one decoder block.

For every linear-like module (``nn.Linear`` and routers: a leaf with a 2-D ``weight``) the hooks sum
squared inputs per input column and count tokens (llama-imatrix's ``in_sum2``/``counts``), keep the
inputs of a fixed, seeded subset of calibration tokens (for activation error), and for down
projections the max |input| per channel, max |output| per channel and the input vector at the token
where the largest output occurs (super-weight detection).

Transformers-5 MoE layers hold their experts as fused 3-D parameters (``gate_up_proj [E, 2I, H]``,
``down_proj [E, H, I]``) inside one module called as ``experts(hidden, top_k_index, top_k_weights)``.
A pre-hook on that module sees the routing, so each expert counts only the tokens routed to it; its
down-projection inputs ``act(x Wg^T) * (x Wu^T)`` are recomputed from the expert's own weights (the
same arithmetic as the module's eager forward, biases and gpt-oss's gating included: :func:`expert_forward`), which works whatever kernel the module dispatches to.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from dq.analysis.names import NameMapper
from dq.analysis.roles import TensorRole, classify

__all__ = ["TensorStats", "BlockHooks", "BlockCollector", "reduce_stats", "is_linear_like", "expert_params", "expert_modules", "split_gate_up",
           "down_weight", "expert_biases", "gating", "expert_forward", "call_input"]

_DOWN_ROLES = (TensorRole.FFN_DOWN, TensorRole.SHARED_DOWN, TensorRole.EXPERT_DOWN)


@dataclass
class TensorStats:
    """Accumulated statistics of one GGUF weight tensor (``n_mat`` = experts, 1 for a plain weight).

    Attributes:
        name: GGUF tensor name.
        param: transformers parameter name.
        sums: float64 ``[n_mat, in]``, sum of x^2 per input column.
        counts: ``[n_mat]`` tokens seen (routed tokens for experts).
        samples: per matrix, the inputs of the sampled calibration tokens (list of ``[t, in]`` arrays).
        in_max / out_max: ``[n_mat, in]`` / ``[n_mat, out]`` max |x| and |y| per channel (down projections).
        peak: per matrix ``(|y| max, row, token, x at that token)`` (down projections).
        expert: for merged expert tensors, which slice of the fused parameter (``gate``, ``up``, ``down``).
    """

    name: str
    param: str
    n_mat: int
    n_in: int
    n_out: int
    track_spikes: bool = False
    expert: str | None = None
    sums: np.ndarray = field(init=False)
    counts: np.ndarray = field(init=False)
    samples: list[list[np.ndarray]] = field(init=False)
    in_max: np.ndarray | None = field(init=False, default=None)
    out_max: np.ndarray | None = field(init=False, default=None)
    peak: list[tuple[float, int, int, np.ndarray | None]] = field(init=False)

    def __post_init__(self) -> None:
        self.sums = np.zeros((self.n_mat, self.n_in), dtype=np.float64)
        self.counts = np.zeros(self.n_mat, dtype=np.int64)
        self.samples = [[] for _ in range(self.n_mat)]
        self.peak = [(0.0, -1, -1, None) for _ in range(self.n_mat)]
        if self.track_spikes:
            self.in_max = np.zeros((self.n_mat, self.n_in), dtype=np.float32)
            self.out_max = np.zeros((self.n_mat, self.n_out), dtype=np.float32)

    def add(self, e: int, x: torch.Tensor, token_ids: np.ndarray, sampled: np.ndarray,
            y: torch.Tensor | None = None) -> None:
        """Accumulate inputs ``x [t, in]`` (and outputs ``y [t, out]``) of matrix ``e``."""
        if x.shape[0] == 0:
            return
        xf = x.detach().float()
        self.sums[e] += (xf.double() ** 2).sum(0).cpu().numpy()
        self.counts[e] += x.shape[0]
        keep = sampled[token_ids]
        if keep.any():
            self.samples[e].append(xf[torch.from_numpy(keep).to(xf.device)].cpu().numpy())
        if self.track_spikes and y is not None:
            ax, ay = xf.abs(), y.detach().float().abs()
            np.maximum(self.in_max[e], ax.amax(0).cpu().numpy(), out=self.in_max[e])
            np.maximum(self.out_max[e], ay.amax(0).cpu().numpy(), out=self.out_max[e])
            flat = int(torch.argmax(ay))
            t, r = divmod(flat, ay.shape[1])
            v = float(ay[t, r])
            if v > self.peak[e][0]:
                self.peak[e] = (v, r, int(token_ids[t]), xf[t].cpu().numpy())

    def sample_matrix(self, e: int) -> np.ndarray | None:
        return np.concatenate(self.samples[e]) if self.samples[e] else None


def is_linear_like(mod: nn.Module) -> bool:
    """``nn.Linear`` or a leaf module whose only matrix is a 2-D ``weight`` used as ``x @ W^T`` (routers)."""
    if isinstance(mod, nn.Linear):
        return True
    if isinstance(mod, (nn.Embedding, nn.Conv1d, nn.Conv2d, nn.Conv3d)) or any(True for _ in mod.children()):
        return False
    w = getattr(mod, "weight", None)
    return isinstance(w, torch.Tensor) and w.ndim == 2 and set(dict(mod.named_parameters())) <= {"weight", "bias"}


def expert_params(mod: nn.Module) -> dict[str, torch.Tensor] | None:
    """The fused 3-D expert parameters of a transformers-5 experts module, or None."""
    p = dict(mod.named_parameters(recurse=False))
    if "down_proj" in p and p["down_proj"].ndim == 3 and ("gate_up_proj" in p or "gate_proj" in p):
        return p
    return None


def expert_modules(block: nn.Module, block_path: str, mapper: NameMapper) -> dict[str, tuple[str, str, str]]:
    """Module path -> GGUF (gate, up, down) names of every merged-experts module inside ``block``."""
    out = {}
    for rel, mod in block.named_modules():
        if expert_params(mod) is not None:
            path = f"{block_path}.{rel}" if rel else block_path
            n = mapper.expert_names(path)
            out[path] = (n.gate, n.up, n.down)
    return out


def split_gate_up(mod: nn.Module, p: dict[str, torch.Tensor], e: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert ``e``'s gate and up weights as ``[I, H]`` (out, in), as llama.cpp's converter splits them:
    halves of ``gate_up_proj`` (Mixtral, Qwen-MoE, DeepSeek) or its interleaved rows (gpt-oss,
    ``is_concatenated=False``: gate = rows 0, 2, 4, ...)."""
    transposed = bool(getattr(mod, "is_transposed", False))
    if "gate_up_proj" in p:
        gu = p["gate_up_proj"][e]
        gu = gu.T if transposed else gu
        if not getattr(mod, "is_concatenated", True):
            return gu[0::2], gu[1::2]
        inter = gu.shape[0] // 2
        return gu[:inter], gu[inter:]  # Mixtral/Qwen-MoE layout: .chunk(2, dim=-1) of the output
    g, u = p["gate_proj"][e], p["up_proj"][e]
    return (g.T, u.T) if transposed else (g, u)


def down_weight(mod: nn.Module, p: dict[str, torch.Tensor], e: int) -> torch.Tensor:
    d = p["down_proj"][e]
    return d.T if bool(getattr(mod, "is_transposed", False)) else d


def expert_biases(mod: nn.Module, p: dict[str, torch.Tensor], e: int) -> tuple:
    """Expert ``e``'s gate, up and down biases (gpt-oss), else ``(None, None, None)``."""
    if "gate_up_proj_bias" not in p:
        return None, None, None
    gu = p["gate_up_proj_bias"][e]
    if not getattr(mod, "is_concatenated", True):
        bg, bu = gu[0::2], gu[1::2]
    else:
        bg, bu = gu.chunk(2)
    return bg, bu, p.get("down_proj_bias", [None] * (e + 1))[e]


def gating(mod: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """The experts module's own gating of gate outputs ``a`` and up outputs ``b``: its ``_apply_gate`` on the
    pair laid out as the module lays it out (halves, or interleaved for ``is_concatenated=False``: gpt-oss's
    clamped ``(up + 1) * gate * sigmoid(alpha * gate)``), else ``act_fn(a) * b``."""
    if hasattr(mod, "_apply_gate"):
        if getattr(mod, "is_concatenated", True):
            gu = torch.cat([a, b], dim=-1)
        else:
            gu = torch.stack([a, b], dim=-1).reshape(*a.shape[:-1], 2 * a.shape[-1])
        return mod._apply_gate(gu)
    return mod.act_fn(a) * b


def expert_forward(mod: nn.Module, p: dict[str, torch.Tensor], e: int, x: torch.Tensor):
    """``(gate out, up out, down in, down out)`` of expert ``e`` on inputs ``x [t, H]`` (float32)."""
    wg, wu = split_gate_up(mod, p, e)
    bg, bu, bd = expert_biases(mod, p, e)
    a = x @ wg.float().T
    b = x @ wu.float().T
    if bg is not None:
        a, b = a + bg.float(), b + bu.float()
    h = gating(mod, a, b)
    y = h @ down_weight(mod, p, e).float().T
    if bd is not None:
        y = y + bd.float()
    return a, b, h, y


def call_input(args: tuple, kwargs: dict, key: str) -> torch.Tensor:
    if args:
        return args[0]
    return kwargs[key]


class BlockHooks:
    """Hooks on one decoder block's linear-like modules and expert containers, removed on exit; a subclass
    says what each hook records (``_install_linear``, ``_install_experts``) and keeps them in ``_handles``."""

    block: nn.Module
    block_path: str
    _handles: list

    def __enter__(self) -> BlockHooks:
        for rel, mod in self.block.named_modules():
            path = f"{self.block_path}.{rel}" if rel else self.block_path
            ep = expert_params(mod)
            if ep is not None:
                self._install_experts(path, mod, ep)
            elif is_linear_like(mod):
                self._install_linear(path, mod)
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _install_linear(self, path: str, mod: nn.Module) -> None:
        raise NotImplementedError

    def _install_experts(self, path: str, mod: nn.Module, ep: dict[str, torch.Tensor]) -> None:
        raise NotImplementedError


class BlockCollector(BlockHooks):
    """Hooks on one block's modules; ``tokens(ids)`` tells them which calibration tokens flow next.

    Args:
        block: the decoder layer (or any module) to instrument.
        block_path: its module path in the model.
        mapper: HF -> GGUF names.
        sampled: boolean mask over all calibration token ids: which inputs to keep.
    """

    def __init__(self, block: nn.Module, block_path: str, mapper: NameMapper, sampled: np.ndarray) -> None:
        self.block = block
        self.block_path = block_path
        self.mapper = mapper
        self.sampled = sampled
        self.stats: dict[str, TensorStats] = {}
        self.experts: dict[str, tuple[str, str, str]] = {}  # module path -> (gate, up, down) GGUF names
        self._token_ids = np.zeros(0, dtype=np.int64)
        self._handles: list = []

    def tokens(self, token_ids: np.ndarray) -> None:
        self._token_ids = token_ids


    def _install_linear(self, path: str, mod: nn.Module) -> None:
        name = self.mapper.gguf_name(f"{path}.weight")
        out_f, in_f = mod.weight.shape
        st = TensorStats(name, f"{path}.weight", 1, in_f, out_f, track_spikes=classify(name) in _DOWN_ROLES)
        self.stats[name] = st

        def hook(module, args, kwargs, output):
            x = call_input(args, kwargs, "input")
            x2 = x.reshape(-1, x.shape[-1])
            y = None
            if st.track_spikes:
                y = (output[0] if isinstance(output, tuple) else output).reshape(-1, out_f)
            st.add(0, x2, self._ids_for(x2.shape[0]), self.sampled, y)

        self._handles.append(mod.register_forward_hook(hook, with_kwargs=True))

    def _ids_for(self, n: int) -> np.ndarray:
        ids = self._token_ids
        if len(ids) != n:  # a module that sees a different token count (should not happen in a block)
            raise RuntimeError(f"hooked module saw {n} tokens, the runner announced {len(ids)}")
        return ids

    def _install_experts(self, path: str, mod: nn.Module, p: dict[str, torch.Tensor]) -> None:
        names = self.mapper.expert_names(path)
        n_exp = p["down_proj"].shape[0]
        g0, _ = split_gate_up(mod, p, 0)
        d0 = down_weight(mod, p, 0)
        inter, hidden = g0.shape
        param_gu = f"{path}.gate_up_proj" if "gate_up_proj" in p else f"{path}.gate_proj"
        gate = TensorStats(names.gate, param_gu, n_exp, hidden, inter, expert="gate")
        up = TensorStats(names.up, f"{path}.gate_up_proj" if "gate_up_proj" in p else f"{path}.up_proj",
                         n_exp, hidden, inter, expert="up")
        down = TensorStats(names.down, f"{path}.down_proj", n_exp, inter, d0.shape[0], track_spikes=True,
                           expert="down")
        self.stats.update({names.gate: gate, names.up: up, names.down: down})
        self.experts[path] = (names.gate, names.up, names.down)

        def pre_hook(module, args, kwargs):
            x = call_input(args, kwargs, "hidden_states")
            idx = args[1] if len(args) > 1 else kwargs["top_k_index"]
            x2 = x.reshape(-1, x.shape[-1]).float()
            ids = self._ids_for(x2.shape[0])
            idx = idx.reshape(x2.shape[0], -1)
            with torch.no_grad():
                # gate/up statistics for every expert at once: each (token, choice) adds the token's x^2
                flat = idx.reshape(-1).long()
                tok = torch.arange(x2.shape[0], device=x2.device).repeat_interleave(idx.shape[1])
                sq = torch.zeros(n_exp, x2.shape[1], dtype=torch.float64, device=x2.device)
                sq.index_add_(0, flat, (x2.double() ** 2)[tok])
                counts = torch.bincount(flat, minlength=n_exp).cpu().numpy()
                sq = sq.cpu().numpy()
                for st in (gate, up):
                    st.sums += sq
                    st.counts += counts
                # down inputs need each expert's own forward: only the experts that got tokens
                order = torch.argsort(flat, stable=True)
                starts = np.concatenate([[0], np.cumsum(counts)])
                for e in np.nonzero(counts)[0]:
                    rows = tok[order[starts[e]:starts[e + 1]]]
                    xe = x2[rows]
                    ide = ids[rows.cpu().numpy()]
                    keep = self.sampled[ide]
                    if keep.any():
                        for st in (gate, up):
                            st.samples[e].append(xe[torch.from_numpy(keep).to(xe.device)].cpu().numpy())
                    _, _, h, y = expert_forward(module, p, int(e), xe)
                    down.add(int(e), h, ide, self.sampled, y)
            return None

        self._handles.append(mod.register_forward_pre_hook(pre_hook, with_kwargs=True))


def reduce_stats(stats: dict[str, TensorStats], ranks) -> None:
    """Join every rank's statistics of one block in place (:class:`~dq.analysis.ranks.Ranks`): sums and
    counts summed, channel maxima maxed, and each matrix's peak the largest over ranks (on a tie, the earliest
    token, as one process sweeping the sequences in order keeps it). Forward statistics only: activation
    samples are not joined here."""
    if ranks.world == 1:
        return
    for name in sorted(stats):
        st = stats[name]
        st.sums = ranks.sum(st.sums)
        st.counts = ranks.sum(st.counts)
        if st.track_spikes:
            st.in_max = ranks.max(st.in_max)
            st.out_max = ranks.max(st.out_max)
            peaks = ranks.all_gather(st.peak)
            st.peak = [max((p[e] for p in peaks), key=lambda pk: (pk[0], -pk[2])) for e in range(st.n_mat)]
