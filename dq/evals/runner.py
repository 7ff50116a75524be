"""``evaluate``: one quant against its base on the requested tasks, into an :class:`EvalReport`.

Tasks: ``kld`` and ``ppl`` (one streamed pass, :mod:`dq.evals.kld`) and lm-eval tasks
(:mod:`dq.evals.lmeval`). The base's KLD pass and lm-eval answers are cached, so evaluating a second
quant of the same base only runs the quant.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import dq
from dq.evals.backends import ModelRef, resolve_model_ref
from dq.evals.errors import EvalConfigError
from dq.evals.kld import KLDConfig, Progress, run_kld
from dq.evals.lmeval import LM_TASKS, LMEvalConfig, compare_runs, run_lmeval, single_run_summary
from dq.evals.report import EvalReport

__all__ = ["TOKEN_TASKS", "ALL_TASKS", "parse_tasks", "evaluate"]

log = logging.getLogger(__name__)

TOKEN_TASKS = ("kld", "ppl")
ALL_TASKS = TOKEN_TASKS + LM_TASKS


def parse_tasks(spec: str | Sequence[str]) -> tuple[str, ...]:
    """``"kld,ppl,mmlu"`` -> ``("kld", "ppl", "mmlu")``, or :class:`EvalConfigError` naming the valid set."""
    items = [s.strip().lower() for s in (spec.split(",") if isinstance(spec, str) else spec) if s.strip()]
    bad = [s for s in items if s not in ALL_TASKS]
    if bad or not items:
        raise EvalConfigError(f"unknown task(s) {bad or spec!r}; choose a comma list of {', '.join(ALL_TASKS)}")
    return tuple(dict.fromkeys(items))


def evaluate(
    quant: str | Path | ModelRef,
    base: str | Path | ModelRef | None,
    tasks: Sequence[str] = ("kld", "ppl"),
    *,
    kld_cfg: KLDConfig = KLDConfig(),
    lm_cfg: LMEvalConfig | None = None,
    label: str | None = None,
    cache_root: Path | None = None,
    progress: Progress | None = None,
) -> EvalReport:
    """Evaluate ``quant`` against ``base``.

    Args:
        quant: GGUF file or HF directory (or packaged model name).
        base: the model it came from, or None (then only PPL and plain accuracies).
        tasks: names from :data:`ALL_TASKS`.
        kld_cfg: settings of the KLD/PPL pass.
        lm_cfg: lm-eval settings; its ``tasks`` are replaced by the lm-eval tasks in ``tasks``.
        label: stored in the report.
        cache_root: cache root (default ``$DQ_CACHE``).
        progress: ``progress(stage, done, total)`` for the KLD pass.

    Returns:
        An :class:`EvalReport`.

    Example:
        >>> r = evaluate("m-Q4_K_M.gguf", "smollm2-135m", ["kld", "mmlu"], lm_cfg=LMEvalConfig(limit=5))  # doctest: +SKIP
        >>> r.metrics()["kld_mean"], r.metrics()["mmlu_lost"]                                           # doctest: +SKIP
    """
    tasks = parse_tasks(tasks)
    qref = quant if isinstance(quant, ModelRef) else resolve_model_ref(quant)
    bref = None if base is None else (base if isinstance(base, ModelRef) else resolve_model_ref(base))
    if "kld" in tasks and bref is None:
        raise EvalConfigError("task 'kld' needs the base model: pass --base MODEL (HF directory or GGUF)")
    timings: dict[str, float] = {}
    kld = None
    if "kld" in tasks or "ppl" in tasks:
        t0 = time.perf_counter()
        kld = run_kld(qref, bref, kld_cfg, cache_root=cache_root, progress=progress)
        timings["kld"] = time.perf_counter() - t0
    lm_tasks = tuple(t for t in tasks if t in LM_TASKS)
    comparisons, single = {}, {}
    if lm_tasks:
        cfg = replace(lm_cfg or LMEvalConfig(), tasks=lm_tasks)
        if bref is not None and bref.kind.value == "hf" and cfg.hf_dir is None:
            cfg = replace(cfg, hf_dir=str(bref.path))  # the torch GGUF backend builds the quant in its base's class
        t0 = time.perf_counter()
        qruns = run_lmeval(qref, cfg, cache=False)
        timings["lmeval_quant"] = time.perf_counter() - t0
        if bref is not None:
            t0 = time.perf_counter()
            bruns = run_lmeval(bref, cfg, cache=True, cache_root=cache_root)
            timings["lmeval_base"] = time.perf_counter() - t0
            comparisons = compare_runs(bruns, qruns, settings={
                "limit": cfg.limit, "num_fewshot": cfg.num_fewshot, "max_length": cfg.max_length,
                "mmlu_subjects": list(cfg.mmlu_subjects) if cfg.mmlu_subjects else "all"})
        else:
            single = single_run_summary(qruns)
    size = qref.path.stat().st_size if qref.path.is_file() else sum(
        p.stat().st_size for p in qref.path.glob("*.safetensors"))
    return EvalReport(
        quant=qref.to_dict() | {"size_bytes": size}, base=bref.to_dict() if bref else None, kld=kld,
        tasks=comparisons, single=single, label=label, timings=timings, dq_version=dq.__version__,
    )
