"""Regression thresholds as data (``evals/thresholds.yaml``) and the check ``dq eval --check`` runs.

The file (llm-compressor's ``tests/lmeval/configs`` pattern: model, scheme, metric bounds)::

    version: 1
    settings:                     # evaluation settings shared by every entry (all optional)
      ctx: 512                    # KLD chunk length
      chunks: 8                   # KLD chunks
      topk: 256                   # base log-probs cached exactly per token
      tasks_limit: 4              # lm-eval questions per task / per MMLU subject
      mmlu_subjects: quick        # all | quick | [subject, ...]
    entries:
      - model: smollm2-135m       # base: packaged model name or HF directory
        preset: Q4_K_M            # llama.cpp preset built with dq's quantizer ...
        tensor_type: []           #   ... with optional REGEX=TYPE overrides and
        imatrix: null             #   an optional imatrix (GGUF imatrix file; `auto`: the imatrix of the
                                  #   settings.analyze analysis, the one `plan: auto` entries use)
        # quant: path/to/file.gguf  (instead of preset: an already-built quant)
        # plan: auto + target_size: 75MB (or target_bpw)  (instead of preset: dq's own plan, analysed
        #   with settings.analyze, e.g. {n_tokens: 2048, grad_tokens: 1024, candidates: "Q8_0,Q4_K,..."})
        bounds:                   # metric -> {max: x} and/or {min: y}
          kld_mean: {max: 0.05}
          same_top: {min: 0.85}

Unknown keys, metrics and presets are errors (:class:`ThresholdsError`) naming the valid set. Relative
paths are relative to the YAML file. Metric names are those of :meth:`EvalReport.metrics`
(``kld_mean``, ``same_top``, ``ppl_ratio``, ``mmlu_acc``, ``mmlu_recovery``, ``mmlu_flip_rate``, ...).
"""

from __future__ import annotations

import hashlib
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

from dq.cache import cache_dir
from dq.errors import DQError, ModelNotFoundError, reject_unknown_keys
from dq.evals.errors import ThresholdsError
from dq.evals.kld import KLDConfig, Progress
from dq.evals.lmeval import LM_TASKS, LMEvalConfig, parse_subjects
from dq.evals.report import METRICS, EvalReport, known_metric

__all__ = ["Bound", "ThresholdEntry", "Thresholds", "CheckRow", "load_thresholds", "build_quant", "auto_analysis", "auto_plan",
           "build_plan_quant", "run_check"]

log = logging.getLogger(__name__)

_SETTINGS_KEYS = {"ctx", "chunks", "topk", "tail_samples", "tasks_limit", "mmlu_subjects", "num_fewshot", "max_length",
                  "analyze"}
_ENTRY_KEYS = {"name", "model", "preset", "tensor_type", "imatrix", "quant", "plan", "target_size", "target_bpw",
               "bounds"}
AUTO = Path("auto")  # `plan: auto`: analyse (settings.analyze), plan under the budget, quantize; `imatrix: auto`: its imatrix


@dataclass(frozen=True)
class Bound:
    """``min <= value <= max`` (either side optional)."""

    metric: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if not known_metric(self.metric):
            raise ThresholdsError(
                f"unknown metric {self.metric!r}; use one of {', '.join(METRICS)} or <task>_<acc|acc_base|acc_delta|"
                f"recovery|lost|gained|flips|flip_rate> for a task in {', '.join(LM_TASKS)}"
            )
        if self.min is None and self.max is None:
            raise ThresholdsError(f"bound for {self.metric!r} has neither 'min' nor 'max'; write e.g. {{max: 0.05}}")

    def violated(self, value: float | None) -> str | None:
        """None if ``value`` satisfies the bound, else a phrase saying how it does not."""
        if value is None or math.isnan(value):
            return "was not measured"
        if self.max is not None and value > self.max:
            return f"{value:.6g} > max {self.max:g}"
        if self.min is not None and value < self.min:
            return f"{value:.6g} < min {self.min:g}"
        return None

    def describe(self) -> str:
        parts = ([f">= {self.min:g}"] if self.min is not None else []) + ([f"<= {self.max:g}"] if self.max is not None else [])
        return " and ".join(parts)


@dataclass(frozen=True)
class ThresholdEntry:
    """One quant of one model and the bounds it must meet."""

    model: str
    bounds: tuple[Bound, ...]
    preset: str | None = None
    tensor_type: tuple[str, ...] = ()
    imatrix: Path | None = None
    quant: Path | None = None
    name: str | None = None
    plan: Path | None = None
    target_size: str | int | None = None
    target_bpw: float | None = None

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.preset, self.quant, self.plan)) != 1:
            raise ThresholdsError(f"entry for {self.model!r} needs exactly one of 'preset' (e.g. Q4_K_M), "
                                  f"'plan' (a dq plan file, or auto) or 'quant' (a .gguf)")
        budget = (self.target_size is not None) + (self.target_bpw is not None)
        if self.plan == AUTO and budget != 1:
            raise ThresholdsError(f"entry {self.label!r}: 'plan: auto' needs exactly one of target_size and target_bpw")
        if self.plan != AUTO and budget:
            raise ThresholdsError(f"entry {self.label!r}: target_size/target_bpw only go with 'plan: auto'")
        if not self.bounds:
            raise ThresholdsError(f"entry {self.label!r} has no bounds; add e.g. bounds: {{kld_mean: {{max: 0.05}}}}")

    @property
    def label(self) -> str:
        return self.name or f"{self.model} {self.preset or Path(self.quant or self.plan).name}"

    def tasks(self) -> tuple[str, ...]:
        out = []
        for b in self.bounds:
            if b.metric in METRICS:
                out.append("kld")
            else:
                out.extend(t for t in LM_TASKS if b.metric.startswith(t + "_"))
        return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class Thresholds:
    entries: tuple[ThresholdEntry, ...]
    kld: KLDConfig = KLDConfig(chunks=8)
    lm: LMEvalConfig = LMEvalConfig()
    source: Path | None = None
    analyze: dict = field(default_factory=dict)  # AnalyzeOptions fields for `plan: auto` entries


@dataclass(frozen=True)
class CheckRow:
    entry: str
    metric: str
    value: float | None
    bound: str
    ok: bool
    why: str | None = None

    def to_dict(self) -> dict:
        return {"entry": self.entry, "metric": self.metric, "value": self.value, "bound": self.bound,
                "ok": self.ok, "why": self.why}


def _forbid_extra(d: dict, allowed: set[str], where: str) -> None:
    reject_unknown_keys(where, d, allowed, ThresholdsError)


def load_thresholds(path: str | Path) -> Thresholds:
    """Parse and validate a thresholds YAML.

    Raises:
        ModelNotFoundError: the file does not exist.
        ThresholdsError: it does not parse, or has unknown keys/metrics/presets, or an entry without bounds.
    """
    import yaml

    path = Path(path)
    if not path.is_file():
        raise ModelNotFoundError(f"thresholds file {str(path)!r} does not exist; see evals/thresholds.yaml for the format")
    try:
        doc = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        raise ThresholdsError(f"{path} is not valid YAML ({exc})") from exc
    if not isinstance(doc, dict) or not isinstance(doc.get("entries"), list):
        raise ThresholdsError(f"{path}: expected a mapping with 'version: 1' and a list 'entries'")
    _forbid_extra(doc, {"version", "settings", "entries"}, str(path))
    if doc.get("version", 1) != 1:
        raise ThresholdsError(f"{path}: version {doc.get('version')} is not supported (expected 1)")
    s = doc.get("settings") or {}
    _forbid_extra(s, _SETTINGS_KEYS, f"{path}: settings")
    from dq.evals.errors import EvalConfigError

    try:
        kld = KLDConfig(ctx=int(s.get("ctx", 512)), chunks=int(s.get("chunks", 8)), topk=int(s.get("topk", 256)),
                        tail_samples=int(s.get("tail_samples", 256)))
        subjects = s.get("mmlu_subjects", "quick")
        lm = LMEvalConfig(
            limit=s.get("tasks_limit"), num_fewshot=int(s.get("num_fewshot", 5)),
            max_length=int(s.get("max_length", 2048)),
            mmlu_subjects=tuple(subjects) if isinstance(subjects, list) else parse_subjects(str(subjects)),
        )
    except EvalConfigError as exc:
        raise ThresholdsError(f"{path}: settings: {exc}") from exc
    from dq.quant.llama_quantize import parse_preset

    entries = []
    for i, e in enumerate(doc["entries"]):
        where = f"{path}: entries[{i}]"
        if not isinstance(e, dict):
            raise ThresholdsError(f"{where}: expected a mapping with model, preset or quant, and bounds")
        _forbid_extra(e, _ENTRY_KEYS, where)
        if "model" not in e:
            raise ThresholdsError(f"{where}: 'model' is missing (a packaged model name or a HF directory)")
        bounds_doc = e.get("bounds") or {}
        if not isinstance(bounds_doc, dict):
            raise ThresholdsError(f"{where}: 'bounds' must map metric -> {{min: x}} / {{max: y}}")
        bounds = []
        for metric, b in bounds_doc.items():
            if not isinstance(b, dict):
                raise ThresholdsError(f"{where}: bound of {metric!r} must be a mapping like {{max: 0.05}}")
            _forbid_extra(b, {"min", "max"}, f"{where}: bounds.{metric}")
            try:
                bounds.append(Bound(metric, min=None if b.get("min") is None else float(b["min"]),
                                    max=None if b.get("max") is None else float(b["max"])))
            except ThresholdsError as exc:
                raise ThresholdsError(f"{where}: {exc}") from None
        preset = e.get("preset")
        if preset is not None:
            try:
                preset = parse_preset(str(preset))
            except DQError as exc:
                raise ThresholdsError(f"{where}: {exc}") from None

        def rel(p):
            return None if p is None else (Path(p) if Path(p).is_absolute() else (path.parent / p))

        model = str(e["model"])
        if not Path(model).is_absolute() and (path.parent / model).exists():
            model = str(path.parent / model)
        try:
            entries.append(ThresholdEntry(
                model=model, bounds=tuple(bounds), preset=preset,
                tensor_type=tuple(e.get("tensor_type") or ()),
                imatrix=AUTO if e.get("imatrix") == "auto" else rel(e.get("imatrix")),
                quant=rel(e.get("quant")), name=e.get("name"),
                plan=AUTO if e.get("plan") == "auto" else rel(e.get("plan")),
                target_size=e.get("target_size"), target_bpw=e.get("target_bpw"),
            ))
        except ThresholdsError as exc:
            raise ThresholdsError(f"{where}: {exc}") from None
    analyze = dict(s.get("analyze") or {})
    if analyze:
        from dataclasses import fields as dc_fields

        from dq.analysis.analyze import AnalyzeOptions

        _forbid_extra(analyze, {f.name for f in dc_fields(AnalyzeOptions)}, f"{path}: settings.analyze")
        if "candidates" in analyze and isinstance(analyze["candidates"], str):
            analyze["candidates"] = tuple(c.strip() for c in analyze["candidates"].split(","))
    return Thresholds(tuple(entries), kld=kld, lm=lm, source=path, analyze=analyze)


def build_quant(model: str | Path, preset: str, tensor_type: tuple[str, ...] = (), imatrix: Path | None = None,
                *, cache_root: Path | None = None) -> Path:
    """Quantize ``model`` with dq's quantizer (llama.cpp preset mix, overrides, imatrix) into the cache,
    once; return the GGUF path. The key covers the source GGUF, preset, overrides, imatrix and dq version.
    """
    import dq
    from dq.convert.source import source_gguf
    from dq.evals.backends import resolve_model_ref
    from dq.export.gguf_quantize import quantize_gguf
    from dq.quant.assign import assign_preset, parse_tensor_type
    from dq.quant.imatrix import read_imatrix
    from dq.quant.llama_quantize import PRESETS, parse_preset

    preset = parse_preset(preset)
    src = source_gguf(resolve_model_ref(model).path)
    h = hashlib.sha256()
    st = src.stat()
    h.update(f"{src.resolve()}:{st.st_size}:{st.st_mtime_ns}:{preset}:{sorted(tensor_type)}:{dq.__version__}".encode())
    if imatrix is not None:
        ist = Path(imatrix).stat()
        h.update(f"{Path(imatrix).resolve()}:{ist.st_size}:{ist.st_mtime_ns}".encode())
    out = (cache_root or cache_dir()) / "evals" / "quants" / f"{Path(src).parent.name}-{preset}-{h.hexdigest()[:12]}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    overrides = [parse_tensor_type(t) for t in tensor_type]
    im = read_imatrix(imatrix) if imatrix is not None else None
    assignment = assign_preset(src, preset, overrides, has_imatrix=im is not None)
    log.info("quantizing %s to %s -> %s", src, preset, out)
    quantize_gguf(src, out, assignment, imatrix=im, imatrix_name=Path(imatrix).name if imatrix else None,
                  preset_ftype=PRESETS[preset])
    return out


def auto_analysis(model: str | Path, analyze_options: dict, *, cache_root: Path | None = None) -> Path:
    """The directory of ``model``'s analysis with ``analyze_options``, analysing once (cached by the model's
    files and the options)."""
    import json

    from dq.analysis.analyze import AnalyzeOptions, analyze
    from dq.cache import files_key
    from dq.evals.backends import resolve_model_ref

    opts = AnalyzeOptions(**analyze_options)
    ref = resolve_model_ref(model)
    key = hashlib.sha256(json.dumps(opts.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
    adir = (cache_root or cache_dir()) / "evals" / "analysis" / f"{ref.path.name}-{files_key(ref.path)}-{key}"
    if not (adir / "analysis.json").is_file():
        log.info("analysing %s for `plan: auto` into %s", ref.path, adir)
        analyze(ref.path, adir, opts, resume=True)
    return adir


def auto_plan(model: str | Path, analyze_options: dict, target_size, target_bpw, *,
              cache_root: Path | None = None) -> Path:
    """``plan: auto``: a plan of :func:`auto_analysis` under the budget, saved beside it; returns the file."""
    import math

    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan
    from dq.quant.assign import read_source_tensors

    adir = auto_analysis(model, analyze_options, cache_root=cache_root)
    inputs = load_plan_inputs(adir)
    n = sum(math.prod(s.shape) for s in read_source_tensors(inputs.source_gguf))
    plan = make_plan(inputs, budget_bytes(target_size, target_bpw, n))
    return plan.save(adir / f"plan-{target_size or target_bpw}.yaml")


def build_plan_quant(model: str | Path, plan_path: Path, imatrix: Path | None = None,
                     *, cache_root: Path | None = None) -> Path:
    """Quantize ``model`` with the per-tensor types of a ``dq plan`` file into the cache, once.

    The imatrix is ``imatrix`` or, by default, the one beside the plan's analysis.
    """
    from dq.analysis.artifact import imatrix_beside
    from dq.convert.source import source_gguf
    from dq.evals.backends import resolve_model_ref
    from dq.export.gguf_quantize import quantize_gguf
    from dq.plan.artifact import QuantPlan
    from dq.quant.assign import assign_types, read_source_tensors
    from dq.quant.imatrix import read_imatrix

    plan = QuantPlan.load(plan_path)
    src = source_gguf(resolve_model_ref(model).path)
    sources = read_source_tensors(src)
    plan.check_model((t.name, t.shape) for t in sources)
    imatrix = imatrix or imatrix_beside(plan.analysis)
    h = hashlib.sha256(Path(plan_path).read_bytes())
    h.update(f"{src.resolve()}:{src.stat().st_size}:{src.stat().st_mtime_ns}:{imatrix}".encode())
    out = (cache_root or cache_dir()) / "evals" / "quants" / f"{Path(src).parent.name}-plan-{h.hexdigest()[:12]}.gguf"
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    quantize_gguf(src, out, assign_types(sources, explicit=plan.explicit_types()),
                  imatrix=read_imatrix(imatrix) if imatrix else None, imatrix_name=Path(imatrix).name if imatrix else None)
    return out


@dataclass
class CheckResult:
    rows: list[CheckRow] = field(default_factory=list)
    reports: dict[str, EvalReport] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return all(r.ok for r in self.rows)

    @property
    def failures(self) -> list[CheckRow]:
        return [r for r in self.rows if not r.ok]


def run_check(thresholds: Thresholds | str | Path, *, cache_root: Path | None = None,
              progress: Progress | None = None) -> CheckResult:
    """Evaluate every entry and compare its metrics with its bounds.

    Returns:
        A :class:`CheckResult`; ``ok`` is False if any bound is violated (``failures`` names them).

    Example:
        >>> res = run_check("evals/thresholds.yaml")          # doctest: +SKIP
        >>> [f"{r.entry}: {r.metric} {r.why}" for r in res.failures]   # doctest: +SKIP
    """
    from dq.analysis.artifact import imatrix_beside
    from dq.evals.runner import evaluate

    th = thresholds if isinstance(thresholds, Thresholds) else load_thresholds(thresholds)
    result = CheckResult()
    for e in th.entries:
        imatrix = e.imatrix
        if imatrix == AUTO:
            imatrix = imatrix_beside(auto_analysis(e.model, th.analyze, cache_root=cache_root) / "analysis.json")
        if e.quant is not None:
            quant = e.quant
        elif e.plan is not None:
            plan = (auto_plan(e.model, th.analyze, e.target_size, e.target_bpw, cache_root=cache_root)
                    if e.plan == AUTO else e.plan)
            quant = build_plan_quant(e.model, plan, imatrix, cache_root=cache_root)
        else:
            quant = build_quant(e.model, e.preset, e.tensor_type, imatrix, cache_root=cache_root)
        if not Path(quant).exists():
            raise ModelNotFoundError(f"{e.label}: quant {str(quant)!r} does not exist; build it or fix 'quant:'")
        log.info("checking %s (%s)", e.label, quant)
        report = evaluate(quant, e.model, e.tasks(), kld_cfg=th.kld, lm_cfg=th.lm, label=e.label,
                          cache_root=cache_root, progress=progress)
        result.reports[e.label] = report
        metrics = report.metrics()
        for b in e.bounds:
            v = metrics.get(b.metric)
            why = b.violated(v)
            result.rows.append(CheckRow(e.label, b.metric, v, b.describe(), why is None, why))
    return result
