"""``analyze``: the whole measurement of one model, streamed block by block, resumable.

Flow (every step checkpoints under ``OUT/blocks/``, :mod:`dq.analysis.checkpoints`):

1. sample calibration windows across every source (:mod:`dq.calibration`); embed them and capture each
   layer's call arguments (:mod:`dq.analysis.stream`);
2. forward sweep, per decoder block: load its weights, run every calibration sequence through it with
   hooks (:mod:`dq.analysis.collect`): imatrix sums and counts, down-projection spikes; save the block's
   input for the probe sequences; free it;
3. LM head: its imatrix, and the probe gradients at the logits (:func:`dq.analysis.gradients.head_probe`),
   backpropagated through the final norm;
4. backward sweep, from the last block to the first: load a block, recompute it on its saved probe inputs,
   backpropagate the gradient from above while :class:`~dq.analysis.gradients.BlockGradients` records the
   probe weight gradients of every linear layer and merged expert; then measure every tensor x candidate
   (:mod:`dq.analysis.measure`): bytes, weight/imatrix/activation error and the predicted KLD;
5. embeddings (predicted KLD from the rows the probes used), vision tower (weight error only);
6. super weights: candidates from the spikes, confirmed by ablation on held-out text;
7. write ``analysis.json``, ``imatrix.gguf``, CSV tables and plots (:mod:`dq.analysis.report`).

Peak memory is one block's float32 weights + the calibration hidden states (2 x tokens x d x 4 bytes) +
the probe gradients of one block (about ``probes x max_elements`` floats per tensor) + activation samples,
plus a constant. The embedding and LM head are only ever read in row chunks (32 MiB float32); checkpoint
tensors are read with ``pread`` and never memory-mapped (see :mod:`dq.analysis.loader`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import operator
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from functools import reduce
from pathlib import Path

import numpy as np
import torch

from dq.analysis.artifact import IMATRIX_FILE, Analysis, SuperWeight, TensorMeasurement
from dq.analysis.checkpoints import Checkpoints, Found
from dq.analysis.collect import (
    BlockCollector,
    TensorStats,
    down_weight,
    expert_modules,
    expert_params,
    reduce_stats,
    split_gate_up,
)
from dq.analysis.coverage import check_supported
from dq.analysis.gradients import (
    BlockGradients,
    ProbeSpec,
    TensorGrads,
    backward_block,
    embedding_grads,
    head_probe,
    norm_backward,
)
from dq.analysis.loader import ModelSkeleton, limit_heap_growth
from dq.analysis.measure import (
    DEFAULT_CANDIDATES,
    MatrixInput,
    finish_measure,
    measure_path,
    measure_sums,
    measure_tensor,
    parse_candidates,
    row_subsets,
)
from dq.analysis.names import NameMapper
from dq.analysis.ranks import Ranks
from dq.analysis.responses import measure_responses
from dq.analysis.roles import TensorRole, classify, layer_index
from dq.analysis.splits import split_of
from dq.analysis.stream import (
    embed,
    final_hidden,
    final_norm,
    run_layer,
    softcap,
    tokenize_calibration,
    used_rows,
)
from dq.analysis.superweights import (
    Spike,
    ablate,
    select_candidates,
    spikes_of,
    super_activations,
    super_expert_spikes,
    super_experts,
    whole_expert,
)
from dq.errors import AnalysisError
from dq.quant.formats import QuantFormat
from dq.quant.imatrix import Imatrix, ImatrixEntry, write_imatrix

__all__ = ["AnalyzeOptions", "analyze", "STATE_FILE", "DAMAGE_MODEL"]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"


@dataclass(frozen=True)
class AnalyzeOptions:
    """Settings of one analysis (validated here, at the boundary).

    Attributes:
        candidates: candidate GGML types (default: the issue's twelve).
        calib_file: the user's calibration text (default: packaged C4 + code + multilingual + technical).
        n_tokens: calibration tokens (rounded down to whole sequences of ``seq_len``).
        seq_len: tokens per calibration sequence.
        chat_template: wrap each calibration window as a user turn of the model's chat template.
        act_tokens: probe-sequence tokens (seeded subset) whose inputs are kept for activation error.
        grad_tokens: calibration tokens (whole sequences, balanced over the sources) that carry a KL probe
            through the backward sweep: the damage model's sample.
        max_elements: measure errors on at most this many weights per tensor (seeded row subset).
        device: ``cpu`` or ``cuda``.
        super_weights: detect super weights and confirm them by ablation.
        ablation_tokens: held-out (Wikipedia) tokens for the ablation perplexity/KLD.
        max_ablations: at most this many candidates are ablated.
        response_tokens: calibration tokens (PROBE windows, disjoint from the others) on which every role's
            measured response to a few anchor types is taken (:mod:`dq.analysis.responses`); 0 skips it.
        plots: write PNG plots.
        seed: seed of every subset.
        n_threads: libggml threads.
    """

    candidates: tuple[QuantFormat, ...] = DEFAULT_CANDIDATES
    calib_file: str | None = None
    n_tokens: int = 8192
    seq_len: int = 512
    chat_template: bool = False
    act_tokens: int = 512
    grad_tokens: int = 8192
    max_elements: int | None = 1 << 21
    device: str = "cpu"
    super_weights: bool = True
    ablation_tokens: int = 1024
    max_ablations: int = 4
    response_tokens: int = 2048
    plots: bool = True
    seed: int = 0
    n_threads: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "candidates", parse_candidates(list(self.candidates)))
        if not isinstance(self.n_tokens, int) or self.n_tokens <= 0:
            raise AnalysisError(f"--tokens must be a positive number of calibration tokens, got {self.n_tokens!r}; "
                                f"try --tokens 8192")
        if self.seq_len <= 1:
            raise AnalysisError(f"--seq-len must be at least 2, got {self.seq_len}")
        if self.act_tokens < 0 or self.ablation_tokens < 0 or self.response_tokens < 0:
            raise AnalysisError("--act-tokens, --ablation-tokens and --response-tokens must be >= 0")
        if self.grad_tokens < self.seq_len:
            raise AnalysisError(f"--grad-tokens {self.grad_tokens} must be at least one sequence (--seq-len "
                                f"{self.seq_len}); try --grad-tokens 4096")
        if self.device not in ("cpu", "cuda") and not str(self.device).startswith("cuda:"):
            raise AnalysisError(f"--device must be cpu or cuda, got {self.device!r}")
        if str(self.device).startswith("cuda") and not torch.cuda.is_available():
            raise AnalysisError("--device cuda was asked for but torch sees no CUDA device; use --device cpu")

    def fingerprint(self) -> dict:
        d = asdict(self)
        d["candidates"] = [c.value for c in self.candidates]
        for k in ("device", "plots", "n_threads", "super_weights", "ablation_tokens", "max_ablations"):
            d.pop(k)
        return d


def _model_fingerprint(model_dir: Path) -> dict:
    """Absolute path and a content fingerprint: config, every safetensors header (names, dtypes, shapes,
    offsets), file sizes, and the first and last MiB of each file's data (hashing 600 GB whole would take
    longer than the analysis)."""
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    for f in sorted(model_dir.glob("*.safetensors")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(1 << 20))
            fh.seek(max(0, size - (1 << 20)))
            h.update(fh.read())
    return {"path": str(model_dir.resolve()), "sha256": h.hexdigest()}


def _prepare_out(out_dir: Path, ck: Checkpoints, state: dict, resume: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        old = json.loads(state_path.read_text())
        if old.get("model", {}).get("sha256") != state["model"]["sha256"]:
            raise AnalysisError(
                f"resume directory {out_dir} holds an analysis of {old.get('model', {}).get('path')!r}, not of "
                f"{state['model']['path']!r}; pass a fresh output directory or drop --resume"
            )
        if old.get("processes", 1) != state["processes"]:
            raise AnalysisError(
                f"resume directory {out_dir} was analysed by {old.get('processes', 1)} process(es), this run has "
                f"{state['processes']}: each process's sequences are in its own files; resume with --nproc "
                f"{old.get('processes', 1)}, or drop --resume"
            )
        if old.get("options") != state["options"]:
            diff = sorted(k for k in state["options"] if old.get("options", {}).get(k) != state["options"][k])
            raise AnalysisError(
                f"resume directory {out_dir} was made with different settings ({', '.join(diff)}); "
                f"re-run with the same settings or drop --resume"
            )
        return
    if resume:
        log.info("nothing to resume in %s; starting afresh", out_dir)
    ck.clear()
    from dq.atomic import atomic_path

    with atomic_path(state_path) as tmp:
        tmp.write_text(json.dumps(state, indent=1))


# -- per-tensor measurement ---------------------------------------------------------------------------
def _importance(entry: ImatrixEntry | None) -> np.ndarray | None:
    if entry is None or entry.counts.sum() == 0:
        return None
    return entry.weights()[0]


def _expert_importance(entry: ImatrixEntry | None, e: int) -> np.ndarray | None:
    if entry is None or entry.counts[e] == 0:
        return None
    return (entry.sums[e] / entry.counts[e]).astype(np.float32)


def _forward_stats(sk: ModelSkeleton, stats: dict[str, TensorStats], expert_modules: dict[str, tuple[str, str, str]],
                   found: Found) -> None:
    """Imatrix entries and down-projection spikes of one block from its forward statistics."""
    for gname, st in stats.items():
        if st.counts.sum() > 0:
            found.imatrix[gname] = ImatrixEntry(st.sums.astype(np.float32), st.counts.astype(np.float32))
        if not st.track_spikes:
            continue
        mod_path = st.param.rpartition(".")[0]
        if st.expert is not None:
            mod = sk.module(mod_path)
            p = {k: v.detach() for k, v in expert_params(mod).items()}
            ws = [down_weight(mod, p, e).float().cpu().numpy() for e in range(st.n_mat)]
        else:
            ws = [sk.module_param(st.param).detach().float().cpu().numpy()]
        found.spikes.extend(spikes_of(st, ws, layer_index(gname) or 0))


def _measure_params(sk: ModelSkeleton, names: list[str], mapper: NameMapper, imatrix: dict[str, ImatrixEntry],
                    grads: dict[str, TensorGrads], expert_modules: dict[str, tuple[str, str, str]],
                    opt: AnalyzeOptions, found: Found, ranks: Ranks = Ranks()) -> None:
    for n in names:
        mod_path, _, pname = n.rpartition(".")
        if mod_path in expert_modules and pname.endswith("_bias"):
            continue  # expert biases (gpt-oss) are stored as they are
        if mod_path in expert_modules and pname in ("gate_up_proj", "down_proj", "gate_proj", "up_proj"):
            if pname in ("gate_up_proj", "gate_proj"):
                _measure_experts(sk, mod_path, expert_modules[mod_path], imatrix, grads, opt, found, ranks)
            continue
        p = sk.module_param(n).detach()
        gname = mapper.gguf_name(n)
        parts = split_of(mapper.arch_name, gname, sk.text_config) if p.ndim == 2 else None
        if parts is not None:
            _measure_split(p, n, parts, grads.get(gname), opt, found)
            continue
        errors = ()
        if p.ndim == 2:
            rec = grads.get(gname)
            w = p.float().cpu().numpy()
            mat = MatrixInput(w, _importance(imatrix.get(gname)), rec.sample_matrix(0) if rec else None,
                              rec.stacked(0) if rec else None)
            errors = measure_tensor([mat], w.shape, opt.candidates, max_elements=opt.max_elements, seed=opt.seed,
                                    n_threads=opt.n_threads, device=opt.device, subsets=rec.rows if rec else None)
        found.tensors.append(TensorMeasurement(
            name=gname, hf_name=n, role=classify(gname), layer=layer_index(gname), shape=tuple(p.shape),
            errors=errors, max_abs=float(p.abs().max()) if p.numel() else 0.0,
        ))


def _measure_split(p: torch.Tensor, hf_name: str, parts, rec: TensorGrads | None, opt: AnalyzeOptions,
                   found: Found) -> None:
    """A weight the converter reshapes into several GGUF tensors (:mod:`dq.analysis.splits`): each part is
    measured as llama.cpp stores it, from the same reshape of the weight and of every probe gradient."""
    w = p.float().cpu().numpy()
    probes = rec.grads[0] if rec is not None else []
    for part in parts:
        mats = part.take(w)
        g = np.stack([part.take(gr) for gr in probes], axis=1) if probes else None  # [matrices, probes, r, c]
        shape = part.shape or tuple(mats.shape[1:])  # () : one matrix, a 2-D GGUF tensor
        subsets = row_subsets(mats.shape[0], mats.shape[1], mats.shape[2], opt.max_elements, opt.seed)
        inputs = [MatrixInput(mats[e], None, None,
                              None if g is None else (g[e] if rows is None else g[e][:, rows]))
                  for e, rows in enumerate(subsets)]
        errors = measure_tensor(inputs, shape, opt.candidates, n_threads=opt.n_threads, device=opt.device,
                                subsets=subsets)
        found.tensors.append(TensorMeasurement(
            name=part.name, hf_name=hf_name, role=classify(part.name), layer=layer_index(part.name),
            shape=shape, errors=errors, max_abs=float(np.abs(mats).max()) if mats.size else 0.0,
        ))


def _measure_experts(sk: ModelSkeleton, path: str, names: tuple[str, str, str], imatrix: dict[str, ImatrixEntry],
                     grads: dict[str, TensorGrads], opt: AnalyzeOptions, found: Found, ranks: Ranks) -> None:
    """The merged gate/up/down expert tensors of one MoE module. Only each expert's measured rows are copied
    (``max_elements`` spread over the experts: a few rows each for 256 experts), never every expert at once.

    Every process measures its share of the experts (``grads`` holds those experts' probe gradients) and rank 0
    adds the shares' error sums (:class:`~dq.analysis.measure.PartialMeasure`) into the tensor's errors.
    """
    mod = sk.module(path)
    p = {k: v.detach() for k, v in expert_params(mod).items()}
    n_exp = p["down_proj"].shape[0]
    param = f"{path}.gate_up_proj" if "gate_up_proj" in p else f"{path}.gate_proj"
    for gname, kind in zip(names, ("gate", "up", "down")):
        def matrix(e: int, kind=kind) -> torch.Tensor:
            if kind == "down":
                return down_weight(mod, p, e)
            g, u = split_gate_up(mod, p, e)
            return g if kind == "gate" else u

        rows, cols = (int(d) for d in matrix(0).shape)
        entry, rec = imatrix.get(gname), grads.get(gname)
        subsets = rec.rows if rec else row_subsets(n_exp, rows, cols, opt.max_elements, opt.seed)
        mats, max_abs = [], 0.0
        for e in ranks.shard(n_exp):
            w, sub = matrix(e), subsets[e]
            max_abs = max(max_abs, float(w.abs().max()))
            w = w if sub is None else w[torch.from_numpy(sub).to(w.device)]
            mats.append(MatrixInput(w.float().cpu().numpy(), _expert_importance(entry, e),
                                    rec.sample_matrix(e) if rec else None, rec.stacked(e) if rec else None))
        shape = (n_exp, rows, cols)
        partial = measure_sums(mats, shape, opt.candidates, n_threads=opt.n_threads, device=opt.device,
                               subsets=[None] * len(mats))
        del mats
        parts = ranks.gather((partial, max_abs))
        if parts is None:
            continue
        errors = finish_measure(reduce(operator.add, [q for q, _ in parts]), shape, opt.candidates)
        found.tensors.append(TensorMeasurement(
            name=gname, hf_name=f"{path}.down_proj" if kind == "down" else param, role=classify(gname),
            layer=layer_index(gname), shape=shape, errors=errors, max_abs=max(m for _, m in parts),
        ))


# -- the pipeline -------------------------------------------------------------------------------------
def _order_key(t: TensorMeasurement) -> tuple:
    if t.role in (TensorRole.VISION, TensorRole.PROJECTOR):
        return (3, 0, t.name)
    if t.layer is not None:
        return (1, t.layer, t.name)
    return (0 if t.role is TensorRole.EMBEDDING else 2, 0, t.name)


def _subsets(opt: AnalyzeOptions, mapper: NameMapper, config):
    def fn(name: str, n_mats: int, rows: int, cols: int) -> list[np.ndarray | None]:
        if split_of(mapper.arch_name, name, config) is not None:
            return [None] * n_mats  # reshaped by the converter: the gradient is re-laid-out whole
        return row_subsets(n_mats, rows, cols, opt.max_elements, opt.seed)
    return fn


@dataclass(frozen=True)
class _Share:
    """This process's calibration sequences: its contiguous share of the probe sequences (first, so
    ``hidden[:n_probe]`` are its probes) and of the others, as global sequence indices."""

    seqs: tuple[int, ...]
    n_probe: int
    first_probe: int

    @classmethod
    def of(cls, ranks: Ranks, n_seq: int, n_probe: int) -> _Share:
        probes, rest = ranks.shard(n_probe), ranks.shard(n_seq - n_probe)
        return cls(tuple(probes) + tuple(n_probe + k for k in rest), len(probes), probes.start)


def _forward_sweep(sk: ModelSkeleton, mapper: NameMapper, ck: Checkpoints, hidden: torch.Tensor, layer_args,
                   start: int, share: _Share, n_seq: int, seq_len: int, ranks: Ranks, progress) -> torch.Tensor:
    """Blocks ``start..`` on this process's sequences: imatrix statistics and spikes, joined over the processes
    and saved by rank 0; each process saves its probe sequences' inputs."""
    no_samples = np.zeros(n_seq * seq_len, dtype=bool)
    for i in range(start, sk.n_layers):
        t0 = time.time()
        prefix = sk.layer_prefix(i)
        sk.load(prefix)
        try:
            with BlockCollector(sk.module(prefix), prefix, mapper, no_samples) as col:
                def announce(s: int, col=col) -> None:
                    g = share.seqs[s]  # token ids are global: a spike names the same token however many processes
                    col.tokens(np.arange(g * seq_len, (g + 1) * seq_len))

                out = run_layer(sk, i, hidden, layer_args, before_seq=announce)
            reduce_stats(col.stats, ranks)
            found = Found()
            if ranks.main:
                _forward_stats(sk, col.stats, col.experts, found)
        finally:
            sk.free(prefix)
        ck.save_mine(f"input_{i:04d}.pt", hidden=hidden[: share.n_probe].clone())
        hidden = out
        hidden_max = ranks.max(out.abs().amax(dim=(0, 1)).numpy())
        if ranks.main:
            ck.save_stats(f"fwd_{i:04d}", found, hidden_max)
        ck.save_step("hidden", i + 1, previous=i, hidden=hidden)
        log.info("forward: layer %d/%d in %.1fs", i + 1, sk.n_layers, time.time() - t0)
        if progress is not None:
            progress("forward", i + 1, sk.n_layers)
    return hidden


def _units(sk: ModelSkeleton, names: list[str], mapper: NameMapper) -> list[tuple[str, str, int]]:
    """A block's parameters outside merged-experts modules as ``(name, GGUF name, weights)``: the units dealt
    to processes (experts are shared out expert by expert instead, :func:`_measure_experts`)."""
    return [(n, mapper.gguf_name(n), int(sk.module_param(n).numel())) for n in names]


def _gather_grads(grads: dict[str, TensorGrads], owner: dict[str, int], experts: set[str],
                  ranks: Ranks) -> dict[str, TensorGrads]:
    """Each tensor's probe gradients and samples, from every process, on the process that measures it: a
    plain tensor on its ``owner``; a merged-experts tensor (in ``experts``) expert by expert, each process
    receiving the experts of its share."""
    if ranks.world == 1:
        return grads
    out = {}
    for name in sorted(grads):
        rec = grads[name]
        if name in experts:
            for dst in range(ranks.world):
                parts = ranks.gather(rec.only(Ranks(dst, ranks.world).shard(len(rec.rows))), dst=dst)
                if parts is not None:
                    out[name] = TensorGrads.join(parts)
            continue
        parts = ranks.gather(rec, dst=owner.get(name, 0))
        if parts is not None:
            out[name] = TensorGrads.join(parts)
    return out


def _backward_sweep(sk: ModelSkeleton, mapper: NameMapper, ck: Checkpoints, layer_args, g: torch.Tensor, top: int,
                    imatrix: dict[str, ImatrixEntry], sampled: np.ndarray, share: _Share, opt: AnalyzeOptions,
                    ranks: Ranks, progress, times: dict[str, float]) -> torch.Tensor:
    """Blocks ``top..0``: recompute each on this process's probe inputs and backpropagate (data parallel), then
    measure every tensor on the process it is dealt to (work parallel); rank 0 saves the block's measurements."""
    for i in range(top, -1, -1):
        t0 = time.time()
        prefix = sk.layer_prefix(i)
        saved = ck.load_mine(f"input_{i:04d}.pt")
        if saved is None:
            raise AnalysisError(f"the saved input of layer {i} is missing from {ck.dir}; re-run without --resume")
        names = sk.load(prefix)
        try:
            block = sk.module(prefix)
            with BlockGradients(block, prefix, mapper, _subsets(opt, mapper, sk.text_config), sampled) as bg:
                g = backward_block(sk, i, saved["hidden"], g, layer_args, bg, opt.seq_len, share.first_probe)
            t1 = time.time()
            times["backward_gradients"] = times.get("backward_gradients", 0.0) + t1 - t0
            experts = expert_modules(block, prefix, mapper)
            in_experts = [n for n in names if n.rpartition(".")[0] in experts]
            units = _units(sk, [n for n in names if n not in set(in_experts)], mapper)
            dealt = ranks.deal([min(size, opt.max_elements or size) for _, _, size in units])
            owner = {gn: r for (_, gn, _), r in zip(units, dealt)}
            grads = _gather_grads(bg.grads, owner, {g for gs in experts.values() for g in gs}, ranks)
            found = Found()
            # every process measures its share of each merged-experts tensor (collectives inside: same order
            # everywhere), then the plain tensors dealt to it
            _measure_params(sk, in_experts, mapper, imatrix, grads, experts, opt, found, ranks)
            mine = [n for (n, _, _), r in zip(units, dealt) if r == ranks.rank]
            _measure_params(sk, mine, mapper, imatrix, grads, experts, opt, found)
            del grads
            times["measure"] = times.get("measure", 0.0) + time.time() - t1
        finally:
            sk.free(prefix)
        parts = ranks.gather(found.tensors)
        if parts is not None:
            ck.save_layer(i, [t for part in parts for t in part])
        ck.save_step("grad", i - 1, previous=i, grad=g)
        # a process one block behind may still resume at block i + 1: its files go only once every process
        # has saved the gradient for block i (it is past the gather above)
        ck.drop_mine(f"input_{i + 1:04d}.pt")
        if i == sk.n_layers - 1:
            ck.drop_steps("hidden")
        log.info("backward: layer %d/%d measured in %.1fs", sk.n_layers - i, sk.n_layers, time.time() - t0)
        if progress is not None:
            progress("measure", sk.n_layers - i, sk.n_layers)
    return g


def _common_step(ck: Checkpoints, name: str, ranks: Ranks, newest: Callable = max) -> int | None:
    """The newest step of ``name`` (by ``newest``: the forward sweep counts up, the backward sweep down) that
    every process holds; None when some process holds none."""
    common = set.intersection(*(set(s) for s in ranks.all_gather(ck.steps(name))))
    return newest(common) if common else None


def analyze(
    model: str | Path | None,
    out_dir: str | Path,
    options: AnalyzeOptions | None = None,
    *,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
    ranks: Ranks | None = None,
) -> Analysis | None:
    """Measure a model: imatrix, per-tensor x type errors, predicted KLD and bytes, super weights.

    Args:
        model: Hugging Face directory, packaged model name (``smollm2-135m``), or None for the default.
        out_dir: output directory (``analysis.json``, ``imatrix.gguf``, ``*.csv``, ``*.png``, ``blocks/``).
        options: settings; default :class:`AnalyzeOptions`.
        resume: skip the work already checkpointed in ``out_dir`` (same model and settings, else AnalysisError).
        progress: called as ``progress(stage, done, total)`` (on rank 0 only).
        ranks: this process's place among several (default: what ``torchrun`` set up, else one process;
            :mod:`dq.analysis.ranks`). ``out_dir`` must be one directory every process sees.

    Returns:
        The :class:`~dq.analysis.artifact.Analysis`, also saved as ``out_dir/analysis.json``; None on the other
        ranks of a distributed run (rank 0 alone finishes: embedding, super weights, files).

    Example:
        >>> a = analyze("smollm2-135m", "out/smollm2", AnalyzeOptions(n_tokens=4096))  # doctest: +SKIP
        >>> a.by_name()["blk.0.ffn_down.weight"].error_for(QuantFormat.Q4_K).kld      # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    from dq.calibration import Purpose, sample_calibration
    from dq.data import heldout_text
    from dq.models import resolve_model

    opt = options or AnalyzeOptions()
    ranks = ranks or Ranks.from_env(opt.device)
    if ranks.world > 1:
        opt = replace(opt, device=ranks.device, n_threads=ranks.threads(opt.n_threads))
        progress = progress if ranks.main else None
    t_start = time.time()
    if limit_heap_growth():  # freed block weights go back to the OS (see its docstring)
        log.debug("glibc mmap threshold fixed at 1 MiB")
    model_dir = ranks.on_main(lambda: resolve_model(model))  # materialised once, not by every process
    sk = ModelSkeleton.open(model_dir, device=opt.device)
    measure_path(opt.device)  # logs which quantizers measure the errors (CPU: libggml)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    cal = sample_calibration(tokenizer, max(1, opt.n_tokens // opt.seq_len), opt.seq_len, calib_file=opt.calib_file,
                             chat_template=opt.chat_template, seed=opt.seed)
    ids = cal.ids
    out_dir = Path(out_dir)
    state = {"model": _model_fingerprint(model_dir),
             "options": {**opt.fingerprint(), "calib_sha256": cal.sources_sha256}, "processes": ranks.world}
    ck = Checkpoints(out_dir, rank=ranks.rank)

    mapper = NameMapper(sk.text_config.model_type, sk.n_layers, sk.text_model_path, sk.output_head_path())
    from dq.convert.source import source_gguf

    src = ranks.on_main(lambda: source_gguf(model_dir))
    check_supported(sk, mapper, src)  # before any work: the converter's tensors, dq's names
    n_tok, seq_len = int(ids.numel()), int(ids.shape[1])
    n_probe = min(int(ids.shape[0]), max(1, opt.grad_tokens // seq_len))
    if n_probe < ranks.world:
        raise AnalysisError(f"{ranks.world} processes need at least one probe sequence each, and --grad-tokens "
                            f"{opt.grad_tokens} gives {n_probe}; pass --grad-tokens {ranks.world * seq_len} or more, "
                            f"or start fewer processes")
    ranks.on_main(lambda: _prepare_out(out_dir, ck, state, resume))
    share = _Share.of(ranks, int(ids.shape[0]), n_probe)
    spec = ProbeSpec(n_probe, seq_len, opt.seed)
    sampled = np.zeros(n_probe * seq_len, dtype=bool)
    sampled[np.random.default_rng(opt.seed).choice(sampled.size, size=min(opt.act_tokens, sampled.size),
                                                   replace=False)] = True
    log.info("%s: %d layers, %d calibration tokens (%d x %d; %s), %d probe sequences, %d candidate types%s",
             model_dir.name, sk.n_layers, n_tok, ids.shape[0], seq_len,
             ", ".join(f"{k} {v}" for k, v in cal.describe()["sequences_per_source"].items()), n_probe,
             len(opt.candidates), f"; rank {ranks.rank} of {ranks.world} runs {len(share.seqs)} sequences"
             if ranks.world > 1 else "")

    times: dict[str, float] = {}
    t_stage = time.time()
    hidden, layer_args = embed(sk, ids[list(share.seqs)])
    found_all = Found()
    hidden_max: dict[int, np.ndarray] = {}
    head_done = resume and ck.load_stats("head") is not None and _common_step(ck, "grad", ranks, min) is not None
    start = 0
    if resume and not head_done:
        step = _common_step(ck, "hidden", ranks)
        if step is not None and all(ck.load_stats(f"fwd_{i:04d}") is not None for i in range(step)):
            start, hidden = step, ck.load_step("hidden", step)["hidden"]
            log.info("resuming the forward sweep at layer %d of %d", start, sk.n_layers)
    if not head_done:
        hidden = _forward_sweep(sk, mapper, ck, hidden, layer_args, start, share, int(ids.shape[0]), seq_len, ranks,
                                progress)
    ranks.barrier()  # rank 0's statistics are on disk for every process
    times["forward"] = time.time() - t_stage
    t_stage = time.time()
    for i in range(sk.n_layers):
        f, hm = ck.load_stats(f"fwd_{i:04d}")
        found_all.merge(f)
        hidden_max[i] = hm

    if not head_done:
        head_found, g = _measure_head(sk, mapper, hidden, share, spec, sampled, opt, ranks)
        if ranks.main:
            ck.save_stats("head", head_found)
        ck.save_step("grad", sk.n_layers - 1, grad=g)  # the forward sweep's files go after the first block back
    del hidden
    ranks.barrier()
    times["head"] = time.time() - t_stage
    head_found, _ = ck.load_stats("head")
    found_all.merge(head_found)
    top = _common_step(ck, "grad", ranks, min)
    g = ck.load_step("grad", top)["grad"]
    if top < 0:
        log.info("resuming: all %d layers are measured already", sk.n_layers)
    elif top < sk.n_layers - 1:
        log.info("resuming the backward sweep at layer %d", top)
    g = _backward_sweep(sk, mapper, ck, layer_args, g, top, found_all.imatrix, sampled, share, opt, ranks, progress,
                        times)
    parts = ranks.gather(g)  # the embedding is measured on rank 0, from every probe's gradient
    ck.drop_mine("input_0000.pt")
    if parts is None:
        sk.close()
        log.info("rank %d: done; rank 0 measures the embedding and super weights and writes %s", ranks.rank, out_dir)
        return None
    g = torch.cat(parts)
    for i in range(sk.n_layers):
        found_all.tensors.extend(ck.load_layer(i))
    t_stage = time.time()
    _measure_embedding(sk, mapper, ids[:n_probe], g, found_all, opt)
    _measure_vision(sk, mapper, opt, found_all)
    times["embedding_vision"] = time.time() - t_stage
    t_stage = time.time()

    sws: list[SuperWeight] = []
    candidates: list[Spike] = []
    experts = super_experts(found_all.spikes)
    if opt.super_weights:
        candidates = select_candidates(found_all.spikes, opt.max_ablations)
        strong = super_expert_spikes(found_all.spikes)[: opt.max_ablations]
        if (candidates or strong) and opt.ablation_tokens > 0:
            held = tokenize_calibration(tokenizer, heldout_text(), opt.ablation_tokens, min(opt.seq_len, 512))
            if candidates:
                sws = ablate(sk, candidates, held)
            for s, r in zip(strong, ablate(sk, [whole_expert(s) for s in strong], held) if strong else []):
                for e in experts:  # the super experts zeroed one at a time: their ablation result
                    if e["layer"] == s.layer and e["expert"] == s.expert:
                        e["ablation_ppl_ratio"], e["ablation_kld"] = r.ablation_ppl_ratio, r.ablation_kld
    times["super_weights"] = time.time() - t_stage
    t_stage = time.time()
    responses = []
    if opt.response_tokens >= opt.seq_len:
        probe_cal = sample_calibration(tokenizer, opt.response_tokens // opt.seq_len, opt.seq_len,
                                       calib_file=opt.calib_file, purpose=Purpose.PROBE,
                                       chat_template=opt.chat_template, seed=opt.seed)
        responses = measure_responses(sk, found_all.tensors, found_all.imatrix, probe_cal.ids, opt.candidates,
                                      device=opt.device, n_threads=opt.n_threads)
    sk.close()
    times["responses"] = time.time() - t_stage

    imatrix = Imatrix(dict(sorted(found_all.imatrix.items())),
                      datasets=("dq-analyze:" + (opt.calib_file or "c4,code,multilingual,technical"),),
                      chunk_count=int(ids.shape[0]), chunk_size=seq_len)
    write_imatrix(out_dir / IMATRIX_FILE, imatrix)
    tensors = tuple(sorted(found_all.tensors, key=_order_key))
    analysis = Analysis(
        model=str(model_dir.resolve()), architecture=mapper.arch_name,
        candidates=opt.candidates, tensors=tensors, super_weights=tuple(sws), n_tokens=n_tok,
        imatrix_file=IMATRIX_FILE,
        extra={
            "hf_architecture": (sk.config.architectures or [type(sk.model).__name__])[0],
            "model_arg": str(model) if model is not None else None,
            "model_fingerprint": state["model"],
            "options": state["options"],
            "calibration": cal.describe(),
            "damage_model": DAMAGE_MODEL | {"probes": n_probe, "probe_tokens": n_probe * seq_len},
            "notes": [
                f"act_err uses the inputs of {int(sampled.sum())} seeded tokens of the {n_probe} probe sequences "
                f"(routed ones for experts)",
                f"errors are measured on a seeded subset of rows when a tensor has more than "
                f"{opt.max_elements} weights; bytes are exact",
                "vision tower tensors have weight error only (calibration is text)",
                "types needing an imatrix use uniform importance on tensors without imatrix data",
            ],
            "spikes": [s.to_dict() for s in found_all.spikes],
            "super_weight_candidates": [s.to_dict() for s in candidates],
            "super_activations": super_activations(hidden_max),
            "super_experts": experts,
            "responses": [r.to_dict() for r in responses],
            "hidden_max": {str(k): float(v.max()) for k, v in sorted(hidden_max.items())},
            "seconds": round(time.time() - t_start, 1),
            "stage_seconds": {k: round(v, 1) for k, v in times.items()},  # this run's (a resumed run's part)
        },
    )
    analysis.save(out_dir / "analysis.json")
    from dq.analysis.report import write_report

    write_report(analysis, out_dir, plots=opt.plots)
    return analysis


DAMAGE_MODEL = {
    "form": "additive second-order KL: predicted mean KLD = sum over tensors of kld[tensor, type]",
    "kld": "1/2 sum_probes sum_rows ((Q(W)-W)_row . G_probe,row)^2; G = weight gradient of v.logits, "
           "v = sqrt(p)*r - p*(sqrt(p).r), r Rademacher, one probe per sequence over positions S/2..S-2",
    "rows": "large block tensors: a seeded uniform row subset, scaled by all/measured rows; the LM head: rows "
            "Poisson-sampled by Fisher mass sum_t p(1-p), weighted 1/inclusion (Horvitz-Thompson)",
}


def _measure_head(sk: ModelSkeleton, mapper: NameMapper, hidden: torch.Tensor, share: _Share, spec: ProbeSpec,
                  sampled: np.ndarray, opt: AnalyzeOptions, ranks: Ranks) -> tuple[Found, torch.Tensor]:
    """Final norm and LM head: the head's imatrix (all sequences), its probe gradients, its measurement.

    ``hidden`` holds this process's sequences (its probes first). Every process runs the head on its own
    sequences; the imatrix sums and the Fisher mass that picks the measured rows are summed over processes,
    and rank 0 gathers the probe gradients and measures the head.

    Returns:
        What was found (rank 0) and the gradient at the last block's output for this process's probe sequences.
        The head is read in row chunks (:func:`dq.analysis.gradients.head_probe`, :func:`_measure_rows`),
        never whole.
    """
    found = Found()
    norm, norm_path = final_norm(sk)
    emb_path = _embedding_path(sk)
    names = sk.load(sk.text_model_path, exclude=(sk.layers_path, emb_path))
    try:
        _measure_params(sk, names, mapper, {}, {}, {}, opt, found)  # the final norm (kept as it is)
    finally:
        sk.free(sk.text_model_path)
    normed = final_hidden(sk, hidden)
    head = sk.output_head_path()
    if head is None:
        raise AnalysisError(f"{type(sk.model).__name__} has no output head; dq analyzes causal language models")
    head_w, emb_w = f"{head}.weight", f"{emb_path}.weight"
    tied = head_w not in sk._targets and sk.tied_output()
    gname = mapper.gguf_name(emb_w) if tied else mapper.gguf_name(head_w)
    out_f, in_f = (int(d) for d in sk.module_param(head_w).shape)
    st = TensorStats(gname, emb_w if tied else head_w, 1, in_f, out_f)
    flat = normed.reshape(-1, in_f)
    st.add(0, flat, np.arange(flat.shape[0]), np.zeros(flat.shape[0], dtype=bool))
    entry = ImatrixEntry(ranks.sum(st.sums).astype(np.float32), ranks.sum(st.counts).astype(np.float32))
    found.imatrix[gname] = entry
    n_rows = None if opt.max_elements is None or out_f * in_f <= opt.max_elements else max(1, opt.max_elements // in_f)
    probes = normed[: share.n_probe]
    g_normed, rows, head_grads = head_probe(sk, head_w, probes, spec, n_rows, softcap(sk),
                                            first_probe=share.first_probe, ranks=ranks)
    rec = TensorGrads(gname, [rows])
    rec.grads[0] = head_grads
    mine = sampled[share.first_probe * spec.seq_len : (share.first_probe + share.n_probe) * spec.seq_len]
    rec.samples[0] = [probes.reshape(-1, in_f)[torch.from_numpy(mine)].numpy()]
    del normed, flat
    parts = ranks.gather(rec)
    if parts is not None:
        # the head's gradients are Horvitz-Thompson weighted already (rows drawn by Fisher mass): no subset scaling
        _measure_rows(sk, head_w, gname, emb_w if tied else head_w, entry, TensorGrads.join(parts), opt, found,
                      rows_scale=1.0)
    del parts, rec
    sk.load(norm_path)
    try:
        g = norm_backward(norm, hidden[: share.n_probe], g_normed, sk.device)
    finally:
        sk.free(norm_path)
    return found, g


def _embedding_path(sk: ModelSkeleton) -> str:
    emb = sk.model.get_input_embeddings()
    return next(n for n, m in sk.model.named_modules() if m is emb)


_ROW_CHUNK_BYTES = 32 << 20


def _measure_rows(sk: ModelSkeleton, name: str, gname: str, hf_name: str, entry: ImatrixEntry | None,
                  rec: TensorGrads | None, opt: AnalyzeOptions, found: Found, rows_scale: float | None = None) -> None:
    """Measure a whole-vocabulary matrix from float32 row chunks of ``_ROW_CHUNK_BYTES``.

    Keeps only the rows ``rec``'s gradients are on (else the seeded rows :func:`~dq.analysis.measure.row_subsets`
    gives), so the errors are those of the full-matrix call; max |w| is taken over every chunk. ``rows_scale``
    is :func:`~dq.analysis.measure.measure_tensor`'s (default: all rows / measured rows).
    """
    shape = tuple(int(d) for d in sk.module_param(name).shape)
    rows, cols = shape
    subset = rec.rows[0] if rec is not None else row_subsets(1, rows, cols, opt.max_elements, opt.seed)[0]
    keep: list[np.ndarray] = []
    max_abs = 0.0
    for r0, w in sk.iter_rows(name, max(1, _ROW_CHUNK_BYTES // (4 * cols))):
        w = w.cpu()
        if w.numel():
            max_abs = max(max_abs, float(w.abs().max()))
        if subset is None:
            keep.append(w.numpy())
        else:
            sel = subset[(subset >= r0) & (subset < r0 + w.shape[0])] - r0
            if len(sel):
                keep.append(w.numpy()[sel])
        del w
    wsub = np.concatenate(keep)
    mat = MatrixInput(wsub, _importance(entry), rec.sample_matrix(0) if rec else None, rec.stacked(0) if rec else None)
    errors = measure_tensor([mat], shape, opt.candidates, n_threads=opt.n_threads, device=opt.device, subsets=[None],
                            rows_scale=rows_scale)
    found.tensors.append(TensorMeasurement(
        name=gname, hf_name=hf_name, role=classify(gname), layer=layer_index(gname), shape=shape,
        errors=errors, max_abs=max_abs,
    ))


def _measure_embedding(sk: ModelSkeleton, mapper: NameMapper, probe_ids: torch.Tensor, g0: torch.Tensor,
                       found: Found, opt: AnalyzeOptions) -> None:
    """``token_embd``: weight errors from a row subset; predicted KLD from the rows the probes used.

    Only the embedding rows of tokens that occur carry gradient, so the KLD prediction quantizes exactly
    those rows (no subset scaling). A tied embedding adds its use as the LM head (measured by
    :func:`_measure_head`) to its use as the embedding.
    """
    emb_path = _embedding_path(sk)
    emb_w = f"{emb_path}.weight"
    gname = mapper.gguf_name(emb_w)
    uniq = torch.unique(probe_ids)
    rows = used_rows(sk, emb_w, uniq)
    grads = embedding_grads(sk.model.get_input_embeddings(), rows, torch.searchsorted(uniq, probe_ids), g0, sk.device)
    entry = found.imatrix.get(gname)
    shape = tuple(int(d) for d in sk.module_param(emb_w).shape)
    used = measure_tensor([MatrixInput(rows.cpu().numpy(), _importance(entry), None, grads)], shape, opt.candidates,
                          n_threads=opt.n_threads, device=opt.device, subsets=[None], rows_scale=1.0)
    del grads
    at = next((k for k, t in enumerate(found.tensors) if t.name == gname), None)
    if at is None:  # untied: measure its weight errors now
        part = Found()
        _measure_rows(sk, emb_w, gname, emb_w, entry, None, opt, part)
        found.tensors.extend(part.tensors)
        at = len(found.tensors) - 1
    t = found.tensors[at]
    errors = tuple(replace(e, kld=(e.kld or 0.0) + (u.kld or 0.0)) for e, u in zip(t.errors, used))
    found.tensors[at] = replace(t, errors=errors)


def _measure_vision(sk: ModelSkeleton, mapper: NameMapper, opt: AnalyzeOptions, found: Found) -> None:
    names = sk.vision_params()
    if not names:
        return
    roots = sorted({n.rsplit(".", 1)[0] for n in names})
    for root in roots:  # one module's parameters at a time
        own = [n for n in names if n.rsplit(".", 1)[0] == root]
        sk.load(root)
        try:
            _measure_params(sk, own, mapper, {}, {}, {}, opt, found)
        finally:
            sk.free(root)
