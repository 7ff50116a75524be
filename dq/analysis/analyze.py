"""``analyze``: the whole measurement of one model, streamed block by block, resumable.

Flow (each step's output is checkpointed under ``OUT/blocks/``):

1. tokenize calibration text; embed it and capture each layer's call arguments (:mod:`dq.analysis.stream`);
2. per decoder block: load its weights, run every calibration sequence through it with hooks
   (:mod:`dq.analysis.collect`), measure every tensor x candidate (:mod:`dq.analysis.measure`) and its
   down-projection spikes, save ``layer_NNNN.json/.npz`` and the block's output hidden states, free it;
3. final norm + LM head (imatrix and errors of ``output.weight``, or of ``token_embd.weight`` when tied),
   embeddings, vision tower (weight error only: calibration is text);
4. super weights: candidates from the spikes, confirmed by ablation on held-out text;
5. write ``analysis.json``, ``imatrix.gguf``, CSV tables and plots (:mod:`dq.analysis.report`).

Peak memory is one block's float32 weights + calibration hidden states (2 x tokens x d x 4 bytes) +
activation samples, plus a constant: the Python/torch runtime and bounded chunks. The embedding and
LM head are only ever read in row chunks (32 MiB float32), their logits in 16 MiB chunks; checkpoint
tensors are read with ``pread`` and never memory-mapped (see :mod:`dq.analysis.loader`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from dq.analysis.artifact import IMATRIX_FILE, Analysis, SuperWeight, TensorMeasurement
from dq.analysis.collect import BlockCollector, TensorStats, expert_params
from dq.analysis.loader import ModelSkeleton, limit_heap_growth
from dq.analysis.measure import (
    DEFAULT_CANDIDATES,
    MatrixInput,
    measure_path,
    measure_tensor,
    parse_candidates,
)
from dq.analysis.names import NameMapper
from dq.analysis.roles import TensorRole, classify, layer_index
from dq.analysis.stream import embed, final_hidden, run_layer, tokenize_calibration
from dq.analysis.superweights import (
    Spike,
    ablate,
    select_candidates,
    spikes_of,
    super_activations,
    super_experts,
)
from dq.errors import AnalysisError
from dq.quant.formats import QuantFormat
from dq.quant.imatrix import Imatrix, ImatrixEntry, write_imatrix

__all__ = ["AnalyzeOptions", "analyze", "STATE_FILE"]

log = logging.getLogger(__name__)

STATE_FILE = "state.json"
_BLOCKS = "blocks"


@dataclass(frozen=True)
class AnalyzeOptions:
    """Settings of one analysis (validated here, at the boundary).

    Attributes:
        candidates: candidate GGML types (default: the issue's twelve).
        calib_file: the user's calibration text (default: packaged C4 + code + multilingual + technical).
        n_tokens: calibration tokens (rounded down to whole sequences of ``seq_len``).
        seq_len: tokens per calibration sequence.
        chat_template: wrap each calibration paragraph as a user turn of the model's chat template.
        act_tokens: calibration tokens (seeded subset) whose inputs are kept for activation error.
        max_elements: measure errors on at most this many weights per tensor (seeded row subset).
        device: ``cpu`` or ``cuda``.
        super_weights: detect super weights and confirm them by ablation.
        ablation_tokens: held-out (Wikipedia) tokens for the ablation perplexity/KLD.
        max_ablations: at most this many candidates are ablated.
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
    max_elements: int | None = 1 << 21
    device: str = "cpu"
    super_weights: bool = True
    ablation_tokens: int = 1024
    max_ablations: int = 4
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
        if self.act_tokens < 0 or self.ablation_tokens < 0:
            raise AnalysisError("--act-tokens and --ablation-tokens must be >= 0")
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
    h = hashlib.sha256((model_dir / "config.json").read_bytes())
    sizes = {f.name: f.stat().st_size for f in sorted(model_dir.glob("*.safetensors"))}
    h.update(json.dumps(sizes, sort_keys=True).encode())
    return {"path": str(model_dir.resolve()), "sha256": h.hexdigest()}


def _prepare_out(out_dir: Path, state: dict, resume: bool) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    state_path = out_dir / STATE_FILE
    if resume and state_path.is_file():
        old = json.loads(state_path.read_text())
        if old.get("model", {}).get("sha256") != state["model"]["sha256"]:
            raise AnalysisError(
                f"resume directory {out_dir} holds an analysis of {old.get('model', {}).get('path')!r}, not of "
                f"{state['model']['path']!r}; pass a fresh output directory or drop --resume"
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
    blocks = out_dir / _BLOCKS
    if blocks.is_dir():
        for f in blocks.iterdir():
            f.unlink()
    blocks.mkdir(exist_ok=True)
    from dq.export.atomic import atomic_path

    with atomic_path(state_path) as tmp:
        tmp.write_text(json.dumps(state, indent=1))


# -- per-tensor measurement ---------------------------------------------------------------------------
@dataclass
class _Found:
    tensors: list[TensorMeasurement] = field(default_factory=list)
    imatrix: dict[str, ImatrixEntry] = field(default_factory=dict)
    spikes: list[Spike] = field(default_factory=list)


def _importance(st: TensorStats | None) -> np.ndarray | None:
    if st is None or st.counts.sum() == 0:
        return None
    return ImatrixEntry(st.sums.astype(np.float32), st.counts.astype(np.float32)).weights()[0]


def _measure_params(sk: ModelSkeleton, names: list[str], mapper: NameMapper, stats: dict[str, TensorStats],
                    expert_modules: dict[str, tuple[str, str, str]], opt: AnalyzeOptions,
                    found: _Found, rename: dict[str, str] | None = None) -> None:
    rename = rename or {}
    by_param = {st.param: st for st in stats.values() if st.expert is None}
    for n in names:
        mod_path, _, pname = n.rpartition(".")
        if mod_path in expert_modules and pname in ("gate_up_proj", "down_proj", "gate_proj", "up_proj"):
            if pname in ("gate_up_proj", "gate_proj"):
                _measure_experts(sk, mod_path, expert_modules[mod_path], stats, opt, found)
            continue
        p = sk.module_param(n).detach()
        gname = rename.get(n, mapper.gguf_name(n))
        st = by_param.get(n)
        errors = ()
        if p.ndim == 2:
            imp = _importance(st)
            x = st.sample_matrix(0) if st is not None else None
            w = p.float().cpu().numpy()
            errors = measure_tensor([MatrixInput(w, imp, x)], w.shape, opt.candidates,
                                    max_elements=opt.max_elements, seed=opt.seed, n_threads=opt.n_threads,
                                    device=opt.device)
            if st is not None and st.counts.sum() > 0:
                found.imatrix[gname] = ImatrixEntry(st.sums.astype(np.float32), st.counts.astype(np.float32))
            if st is not None and st.track_spikes:
                found.spikes.extend(spikes_of(st, [w], layer_index(gname) or 0))
        found.tensors.append(TensorMeasurement(
            name=gname, hf_name=n, role=classify(gname), layer=layer_index(gname), shape=tuple(p.shape),
            errors=errors, max_abs=float(p.abs().max()) if p.numel() else 0.0,
        ))


def _measure_experts(sk: ModelSkeleton, path: str, names: tuple[str, str, str], stats: dict[str, TensorStats],
                     opt: AnalyzeOptions, found: _Found) -> None:
    from dq.analysis.collect import _down, _split_gate_up

    mod = sk.module(path)
    p = {k: v.detach() for k, v in expert_params(mod).items()}
    n_exp = p["down_proj"].shape[0]
    for gname, kind in zip(names, ("gate", "up", "down")):
        st = stats[gname]
        ws = []
        for e in range(n_exp):
            if kind == "down":
                ws.append(_down(mod, p, e).float().cpu().numpy())
            else:
                g, u = _split_gate_up(mod, p, e)
                ws.append((g if kind == "gate" else u).float().cpu().numpy())
        imp = [None if st.counts[e] == 0 else (st.sums[e] / st.counts[e]).astype(np.float32) for e in range(n_exp)]
        mats = [MatrixInput(ws[e], imp[e], st.sample_matrix(e)) for e in range(n_exp)]
        shape = (n_exp, *ws[0].shape)
        errors = measure_tensor(mats, shape, opt.candidates, max_elements=opt.max_elements, seed=opt.seed,
                                n_threads=opt.n_threads, device=opt.device)
        found.imatrix[gname] = ImatrixEntry(st.sums.astype(np.float32), st.counts.astype(np.float32))
        if kind == "down":
            found.spikes.extend(spikes_of(st, ws, layer_index(gname) or 0))
        found.tensors.append(TensorMeasurement(
            name=gname, hf_name=st.param, role=classify(gname), layer=layer_index(gname), shape=shape,
            errors=errors, max_abs=float(max(np.abs(w).max() for w in ws)),
        ))


# -- checkpoints --------------------------------------------------------------------------------------
def _save_block(out_dir: Path, i: int, found: _Found, hidden_max: np.ndarray) -> None:
    from dq.export.atomic import atomic_path

    base = out_dir / _BLOCKS / f"layer_{i:04d}"
    arrays = {f"{k}|sums": e.sums for k, e in found.imatrix.items()}
    arrays.update({f"{k}|counts": e.counts for k, e in found.imatrix.items()})
    arrays["hidden_max"] = hidden_max
    with atomic_path(base.with_suffix(".npz")) as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)
    with atomic_path(base.with_suffix(".json")) as tmp:
        tmp.write_text(json.dumps({
            "tensors": [t.to_dict() for t in found.tensors], "spikes": [s.to_dict() for s in found.spikes],
        }))


def _load_block(out_dir: Path, i: int) -> tuple[_Found, np.ndarray] | None:
    base = out_dir / _BLOCKS / f"layer_{i:04d}"
    if not (base.with_suffix(".json").is_file() and base.with_suffix(".npz").is_file()):
        return None
    d = json.loads(base.with_suffix(".json").read_text())
    with np.load(base.with_suffix(".npz")) as z:
        names = sorted({k.rsplit("|", 1)[0] for k in z.files if "|" in k})
        imatrix = {n: ImatrixEntry(z[f"{n}|sums"], z[f"{n}|counts"]) for n in names}
        hidden_max = z["hidden_max"]
    found = _Found([TensorMeasurement.from_dict(t) for t in d["tensors"]], imatrix,
                   [Spike(**s) for s in d["spikes"]])
    return found, hidden_max


def _save_hidden(out_dir: Path, next_layer: int, hidden: torch.Tensor) -> None:
    from dq.export.atomic import atomic_path

    with atomic_path(out_dir / _BLOCKS / "hidden.pt") as tmp:
        torch.save({"next_layer": next_layer, "hidden": hidden}, tmp)


def _load_hidden(out_dir: Path) -> tuple[int, torch.Tensor] | None:
    path = out_dir / _BLOCKS / "hidden.pt"
    if not path.is_file():
        return None
    d = torch.load(path, weights_only=True)
    return int(d["next_layer"]), d["hidden"]


# -- the pipeline -------------------------------------------------------------------------------------
def _order_key(t: TensorMeasurement) -> tuple:
    if t.role in (TensorRole.VISION, TensorRole.PROJECTOR):
        return (3, 0, t.name)
    if t.layer is not None:
        return (1, t.layer, t.name)
    return (0 if t.role is TensorRole.EMBEDDING else 2, 0, t.name)


def analyze(
    model: str | Path | None,
    out_dir: str | Path,
    options: AnalyzeOptions | None = None,
    *,
    resume: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> Analysis:
    """Measure a model: imatrix, per-tensor x type errors and bytes, super weights; write ``out_dir``.

    Args:
        model: Hugging Face directory, packaged model name (``smollm2-135m``), or None for the default.
        out_dir: output directory (``analysis.json``, ``imatrix.gguf``, ``*.csv``, ``*.png``, ``blocks/``).
        options: settings; default :class:`AnalyzeOptions`.
        resume: skip blocks already finished in ``out_dir`` (same model and settings, else AnalysisError).
        progress: called as ``progress(stage, done, total)``.

    Returns:
        The :class:`~dq.analysis.artifact.Analysis`, also saved as ``out_dir/analysis.json``.

    Example:
        >>> a = analyze("smollm2-135m", "out/smollm2", AnalyzeOptions(n_tokens=4096))  # doctest: +SKIP
        >>> a.by_name()["blk.0.ffn_down.weight"].error_for(QuantFormat.Q4_K).act_err   # doctest: +SKIP
    """
    from transformers import AutoTokenizer

    from dq.data import calibration_text, heldout_text
    from dq.models import resolve_model

    opt = options or AnalyzeOptions()
    t_start = time.time()
    if limit_heap_growth():  # freed block weights go back to the OS (see its docstring)
        log.debug("glibc mmap threshold fixed at 1 MiB")
    model_dir = resolve_model(model)
    text = calibration_text(calib_file=opt.calib_file)
    sk = ModelSkeleton.open(model_dir, device=opt.device)
    measure_path(opt.device)  # logs which quantizers measure the errors (CPU: libggml)
    out_dir = Path(out_dir)
    calib_sha = hashlib.sha256(text.encode()).hexdigest()
    state = {"model": _model_fingerprint(model_dir), "options": {**opt.fingerprint(), "calib_sha256": calib_sha}}
    _prepare_out(out_dir, state, resume)

    mapper = NameMapper(sk.text_config.model_type, sk.n_layers, sk.text_model_path, sk.output_head_path())
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    ids = tokenize_calibration(tokenizer, text, opt.n_tokens, opt.seq_len, chat_template=opt.chat_template)
    if ids.shape[0] == 0:
        raise AnalysisError(
            f"the calibration text holds fewer than {opt.seq_len} tokens; give more text or a smaller --seq-len"
        )
    n_tok = int(ids.numel())
    rng = np.random.default_rng(opt.seed)
    sampled = np.zeros(n_tok, dtype=bool)
    sampled[rng.choice(n_tok, size=min(opt.act_tokens, n_tok), replace=False)] = True
    log.info("%s: %d layers, %d calibration tokens (%d x %d), %d candidate types", model_dir.name,
             sk.n_layers, n_tok, ids.shape[0], ids.shape[1], len(opt.candidates))

    hidden, layer_args = embed(sk, ids)
    start = 0
    if resume:
        saved = _load_hidden(out_dir)
        if saved is not None and all(_load_block(out_dir, i) is not None for i in range(saved[0])):
            start, hidden = saved
            log.info("resuming at layer %d of %d", start, sk.n_layers)
    found_all = _Found()
    hidden_max: dict[int, np.ndarray] = {}
    for i in range(start):
        f, hm = _load_block(out_dir, i)
        _merge(found_all, f)
        hidden_max[i] = hm
    for i in range(start, sk.n_layers):
        t0 = time.time()
        prefix = sk.layer_prefix(i)
        names = sk.load(prefix)
        try:
            with BlockCollector(sk.module(prefix), prefix, mapper, sampled) as col:
                seq = ids.shape[1]

                def announce(s: int, col=col) -> None:
                    col.tokens(np.arange(s * seq, (s + 1) * seq))

                out = run_layer(sk, i, hidden, layer_args, before_seq=announce)
            found = _Found()
            _measure_params(sk, names, mapper, col.stats, col.experts, opt, found)
        finally:
            sk.free(prefix)
        hm = out.abs().amax(dim=(0, 1)).numpy()
        hidden = out
        _save_block(out_dir, i, found, hm)
        _save_hidden(out_dir, i + 1, hidden)
        _merge(found_all, found)
        hidden_max[i] = hm
        log.info("layer %d/%d done in %.1fs", i + 1, sk.n_layers, time.time() - t0)
        if progress is not None:
            progress("layers", i + 1, sk.n_layers)

    _measure_head(sk, mapper, hidden, sampled, opt, found_all)
    _measure_vision(sk, mapper, opt, found_all)

    sws: list[SuperWeight] = []
    candidates: list[Spike] = []
    if opt.super_weights:
        candidates = select_candidates(found_all.spikes, opt.max_ablations)
        if candidates and opt.ablation_tokens > 0:
            held = tokenize_calibration(tokenizer, heldout_text(), opt.ablation_tokens, min(opt.seq_len, 512))
            sws = ablate(sk, candidates, held)
    sk.close()

    imatrix = Imatrix(dict(sorted(found_all.imatrix.items())), datasets=("dq-analyze:" + (opt.calib_file or "c4,code,multilingual,technical"),),
                      chunk_count=int(ids.shape[0]), chunk_size=int(ids.shape[1]))
    write_imatrix(out_dir / IMATRIX_FILE, imatrix)
    tensors = tuple(sorted(found_all.tensors, key=_order_key))
    analysis = Analysis(
        model=str(model) if model is not None else str(model_dir), architecture=mapper.arch_name,
        candidates=opt.candidates, tensors=tensors, super_weights=tuple(sws), n_tokens=n_tok,
        imatrix_file=IMATRIX_FILE,
        extra={
            "hf_architecture": (sk.config.architectures or [type(sk.model).__name__])[0],
            "model_dir": str(model_dir),
            "options": {**opt.fingerprint(), "calib_sha256": calib_sha},
            "notes": [
                f"act_err uses the inputs of {int(sampled.sum())} seeded calibration tokens per tensor "
                f"(routed ones for experts)",
                f"errors are measured on a seeded subset of rows when a tensor has more than "
                f"{opt.max_elements} weights; bytes are exact",
                "vision tower tensors have weight error only (calibration is text)",
                "types needing an imatrix use uniform importance on tensors without imatrix data",
            ],
            "spikes": [s.to_dict() for s in found_all.spikes],
            "super_weight_candidates": [s.to_dict() for s in candidates],
            "super_activations": super_activations(hidden_max),
            "super_experts": super_experts(found_all.spikes),
            "hidden_max": {str(k): float(v.max()) for k, v in sorted(hidden_max.items())},
            "seconds": round(time.time() - t_start, 1),
        },
    )
    analysis.save(out_dir / "analysis.json")
    from dq.analysis.report import write_report

    write_report(analysis, out_dir, plots=opt.plots)
    return analysis


def _merge(into: _Found, f: _Found) -> None:
    into.tensors.extend(f.tensors)
    into.imatrix.update(f.imatrix)
    into.spikes.extend(f.spikes)


def _measure_head(sk: ModelSkeleton, mapper: NameMapper, hidden: torch.Tensor, sampled: np.ndarray,
                  opt: AnalyzeOptions, found: _Found) -> None:
    """Final norm, LM head (its input statistics come from the normed hidden states) and embeddings.

    The embedding and LM head are read in row chunks (:func:`_measure_rows`), never whole in float32.
    """
    normed = final_hidden(sk, hidden)
    head = sk.output_head_path()
    emb = sk.model.get_input_embeddings()
    emb_path = next(n for n, m in sk.model.named_modules() if m is emb)
    emb_w = f"{emb_path}.weight"
    chunked = [emb_w] if emb_w.startswith(sk.text_model_path + ".") else []
    stats: dict[str, TensorStats] = {}
    if head is not None:
        head_w = f"{head}.weight"
        tied = head_w not in sk._targets and sk.tied_output()
        out_f, in_f = (int(d) for d in sk.module_param(head_w).shape)
        gname = mapper.gguf_name(emb_w) if tied else mapper.gguf_name(head_w)
        st = TensorStats(gname, emb_w if tied else head_w, 1, in_f, out_f)
        flat = normed.reshape(-1, normed.shape[-1])
        st.add(0, flat, np.arange(flat.shape[0]), sampled)
        stats[gname] = st
        if not tied:
            chunked.append(head_w)
    del normed
    names = sk.load(sk.text_model_path, exclude=(sk.layers_path, emb_path))
    try:
        _measure_params(sk, names, mapper, stats, {}, opt, found)
    finally:
        sk.free(sk.text_model_path)
    for n in chunked:
        _measure_rows(sk, n, mapper, stats, opt, found)


_ROW_CHUNK_BYTES = 32 << 20


def _measure_rows(sk: ModelSkeleton, name: str, mapper: NameMapper, stats: dict[str, TensorStats],
                  opt: AnalyzeOptions, found: _Found) -> None:
    """Measure a whole-vocabulary matrix from float32 row chunks of ``_ROW_CHUNK_BYTES``.

    Keeps only the seeded row subset that :func:`measure_tensor` would draw from the full matrix (its
    own ``_row_subset`` with the same seed), so the errors are those of the full-matrix call; max |w|
    is taken over every chunk.
    """
    from dq.analysis.measure import _row_subset

    gname = mapper.gguf_name(name)
    st = next((s for s in stats.values() if s.param == name and s.expert is None), None)
    shape = tuple(sk.module_param(name).shape)
    rows, cols = (int(d) for d in shape)
    subset = _row_subset(rows, cols, opt.max_elements, np.random.default_rng(opt.seed))
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
    errors = measure_tensor([MatrixInput(wsub, _importance(st), st.sample_matrix(0) if st is not None else None)],
                            (rows, cols), opt.candidates, max_elements=opt.max_elements, seed=opt.seed,
                            n_threads=opt.n_threads, device=opt.device)
    if st is not None and st.counts.sum() > 0:
        found.imatrix[gname] = ImatrixEntry(st.sums.astype(np.float32), st.counts.astype(np.float32))
    found.tensors.append(TensorMeasurement(
        name=gname, hf_name=name, role=classify(gname), layer=layer_index(gname), shape=shape,
        errors=errors, max_abs=max_abs,
    ))


def _measure_vision(sk: ModelSkeleton, mapper: NameMapper, opt: AnalyzeOptions, found: _Found) -> None:
    names = sk.vision_params()
    if not names:
        return
    roots = sorted({n.rsplit(".", 1)[0] for n in names})
    for root in roots:  # one module's parameters at a time
        own = [n for n in names if n.rsplit(".", 1)[0] == root]
        sk.load(root)
        try:
            _measure_params(sk, own, mapper, {}, {}, opt, found)
        finally:
            sk.free(root)
