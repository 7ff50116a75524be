"""The ``dq eval`` report: a versioned JSON artifact, its table, and the comparison of two reports.

Every number is relative to the base model where there is one (KLD, same-top, PPL ratio, accuracy
delta and flips). :meth:`EvalReport.metrics` flattens a report into ``name -> value``; those names are
what ``evals/thresholds.yaml`` bounds and what ``dq eval --compare`` lines up.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from dq.evals.errors import ReportError
from dq.evals.kld import KLDResult
from dq.evals.lmeval import TaskComparison

__all__ = ["REPORT_VERSION", "EvalReport", "METRICS", "format_table", "compare_reports", "format_compare",
           "read_report", "write_report", "metric_direction", "known_metric"]

REPORT_VERSION = 1

# metric name -> (description, higher is better?)
METRICS: dict[str, tuple[str, bool]] = {
    "kld_mean": ("mean KL(base || quant) per token, nats", False),
    "kld_median": ("median KLD", False),
    "kld_p90": ("90th percentile KLD", False),
    "kld_p99": ("99th percentile KLD", False),
    "kld_p999": ("99.9th percentile KLD", False),
    "kld_max": ("maximum KLD", False),
    "same_top": ("fraction of tokens where quant and base agree on the top token", True),
    "ppl_quant": ("perplexity of the quant", False),
    "ppl_base": ("perplexity of the base", False),
    "ppl_ratio": ("PPL(quant) / PPL(base)", False),
    "delta_p_mean": ("mean p_quant - p_base of the correct token", True),
    "delta_p_rms": ("RMS of Δp", False),
}
_TASK_METRICS: dict[str, tuple[str, bool]] = {
    "acc": ("accuracy of the quant", True),
    "acc_base": ("accuracy of the base", True),
    "acc_delta": ("accuracy(quant) - accuracy(base)", True),
    "recovery": ("accuracy(quant) / accuracy(base)", True),
    "lost": ("questions right in base, wrong in quant", False),
    "gained": ("questions wrong in base, right in quant", True),
    "flips": ("lost + gained", False),
    "flip_rate": ("(lost + gained) / questions", False),
}


def metric_direction(name: str) -> bool | None:
    """True if higher is better, False if lower is, None for an unknown metric name."""
    from dq.evals.lmeval import LM_TASKS

    if name in METRICS:
        return METRICS[name][1]
    for t in LM_TASKS:
        if name.startswith(t + "_") and name[len(t) + 1:] in _TASK_METRICS:
            return _TASK_METRICS[name[len(t) + 1:]][1]
    return None


def known_metric(name: str) -> bool:
    """Whether ``name`` is a metric :meth:`EvalReport.metrics` can produce."""
    return metric_direction(name) is not None


@dataclass(frozen=True)
class EvalReport:
    """One ``dq eval`` run.

    Attributes:
        quant: the evaluated model (path, kind, fingerprint, size_bytes).
        base: the base model, or None.
        kld: the KLD/PPL result, or None.
        tasks: task -> comparison with the base (lm-eval tasks).
        single: task -> ``{"acc", "n"}`` when there is no base.
        label: a free-form name, e.g. ``smollm2-135m Q4_K_M``.
        timings: stage -> seconds.
    """

    quant: dict
    base: dict | None = None
    kld: KLDResult | None = None
    tasks: dict[str, TaskComparison] = field(default_factory=dict)
    single: dict[str, dict] = field(default_factory=dict)
    label: str | None = None
    timings: dict[str, float] = field(default_factory=dict)
    dq_version: str = ""
    version: int = REPORT_VERSION

    def metrics(self) -> dict[str, float]:
        """Flat ``metric -> value`` (the names :data:`METRICS` and ``<task>_<acc|acc_base|...>``)."""
        out: dict[str, float] = {}
        if self.kld is not None:
            for name in METRICS:
                v = getattr(self.kld, name, None)
                if v is not None:
                    out[name] = float(v)
        for task, c in self.tasks.items():
            out[f"{task}_acc"] = c.acc_quant
            out[f"{task}_acc_base"] = c.acc_base
            out[f"{task}_acc_delta"] = c.acc_delta
            out[f"{task}_recovery"] = c.recovery
            out[f"{task}_lost"] = float(c.lost)
            out[f"{task}_gained"] = float(c.gained)
            out[f"{task}_flips"] = float(c.lost + c.gained)
            out[f"{task}_flip_rate"] = (c.lost + c.gained) / c.n if c.n else float("nan")
        for task, s in self.single.items():
            out.setdefault(f"{task}_acc", float(s["acc"]))
        return out

    def to_dict(self) -> dict:
        return {
            "version": self.version, "dq_version": self.dq_version, "label": self.label,
            "quant": self.quant, "base": self.base,
            "kld": self.kld.to_dict() if self.kld else None,
            "tasks": {k: v.to_dict() for k, v in self.tasks.items()},
            "single": self.single, "timings": self.timings, "metrics": self.metrics(),
        }

    @classmethod
    def from_dict(cls, d: dict) -> EvalReport:
        if not isinstance(d, dict) or "quant" not in d or "version" not in d:
            raise ReportError("not a dq eval report (no 'version'/'quant'); pass a file written by `dq eval --json`")
        if d["version"] != REPORT_VERSION:
            raise ReportError(f"report version {d['version']} is not supported (expected {REPORT_VERSION}); re-run dq eval")
        return cls(
            quant=d["quant"], base=d.get("base"),
            kld=KLDResult.from_dict(d["kld"]) if d.get("kld") else None,
            tasks={k: TaskComparison.from_dict(v) for k, v in (d.get("tasks") or {}).items()},
            single=d.get("single") or {}, label=d.get("label"), timings=d.get("timings") or {},
            dq_version=d.get("dq_version", ""), version=d["version"],
        )


def write_report(path: str | Path, report: EvalReport) -> Path:
    """Write the report as JSON atomically."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(report.to_dict(), indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    return path


def read_report(path: str | Path) -> EvalReport:
    """Read a report written by :func:`write_report` or ``dq eval --json``.

    Raises:
        ReportError: the file is not JSON or not a dq eval report.
    """
    path = Path(path)
    if not path.is_file():
        from dq.errors import ModelNotFoundError

        raise ModelNotFoundError(f"report {str(path)!r} does not exist; write one with `dq eval ... -o FILE`")
    try:
        d = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ReportError(f"{path} is not JSON ({exc}); pass a file written by `dq eval --json`") from exc
    return EvalReport.from_dict(d)


def _fmt(v: float | None, name: str = "") -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    if name in ("same_top",) or name.endswith(("_acc", "_acc_base", "_acc_delta", "_recovery", "_flip_rate")):
        return f"{100 * v:.2f}%"
    if name.endswith(("_lost", "_gained", "_flips")):
        return f"{int(v)}"
    if abs(v) >= 100:
        return f"{v:.1f}"
    if abs(v) >= 0.01 or v == 0:
        return f"{v:.4f}"
    return f"{v:.3e}"


def format_table(report: EvalReport) -> str:
    """A human-readable table of one report."""
    lines = [f"quant: {report.quant.get('path')}" + (f"  ({report.label})" if report.label else "")]
    if report.base:
        lines.append(f"base:  {report.base.get('path')}")
    k = report.kld
    if k is not None:
        s = k.settings
        lines.append(f"text: {s.get('text')}, {s.get('chunks')} chunks x {s.get('ctx')} tokens, "
                     f"{k.n_tokens} scored tokens (second half of each chunk)")
        rows = [("PPL(quant)", _fmt(k.ppl_quant))]
        if k.ppl_base is not None:
            rows += [
                ("PPL(base)", _fmt(k.ppl_base)), ("PPL ratio", _fmt(k.ppl_ratio)),
                ("mean KLD", f"{_fmt(k.kld_mean)} ± {_fmt(k.kld_mean_stderr)}"), ("median KLD", _fmt(k.kld_median)),
                ("p99 KLD", _fmt(k.kld_p99)), ("p99.9 KLD", _fmt(k.kld_p999)), ("max KLD", _fmt(k.kld_max)),
                ("same top token", f"{_fmt(k.same_top, 'same_top')} ± {100 * (k.same_top_stderr or 0):.2f}%"),
                ("mean Δp (correct token)", f"{100 * (k.delta_p_mean or 0):+.3f}%"),
                ("RMS Δp", f"{100 * (k.delta_p_rms or 0):.3f}%"),
            ]
        w = max(len(r[0]) for r in rows)
        lines += [f"  {a:<{w}}  {b}" for a, b in rows]
    if report.tasks:
        lines.append(f"  {'task':<13} {'n':>5} {'base':>8} {'quant':>8} {'delta':>8} {'lost':>5} {'gained':>6}")
        for t, c in report.tasks.items():
            lines.append(f"  {t:<13} {c.n:>5} {100 * c.acc_base:>7.2f}% {100 * c.acc_quant:>7.2f}% "
                         f"{100 * c.acc_delta:>+7.2f}% {c.lost:>5} {c.gained:>6}")
    for t, s in report.single.items():
        lines.append(f"  {t:<13} n={s['n']} acc={100 * s['acc']:.2f}%")
    return "\n".join(lines)


def compare_reports(a: EvalReport, b: EvalReport) -> list[dict]:
    """Line up the metrics of two reports: ``[{metric, a, b, delta, better}]`` where ``better`` names
    the report with the better value (``a``, ``b``, ``=``) or is None when the direction is unknown."""
    ma, mb = a.metrics(), b.metrics()
    rows = []
    for name in list(ma) + [n for n in mb if n not in ma]:
        va, vb = ma.get(name), mb.get(name)
        delta = vb - va if va is not None and vb is not None else None
        hib = metric_direction(name)
        better = None
        if delta is not None and hib is not None and not math.isnan(delta):
            better = "=" if delta == 0 else ("b" if (delta > 0) == hib else "a")
        rows.append({"metric": name, "a": va, "b": vb, "delta": delta, "better": better})
    return rows


def format_compare(a: EvalReport, b: EvalReport, rows: list[dict]) -> str:
    w = max([len(r["metric"]) for r in rows] + [6])
    lines = [f"a: {a.label or a.quant.get('path')}", f"b: {b.label or b.quant.get('path')}",
             f"{'metric':<{w}}  {'a':>12}  {'b':>12}  {'b - a':>12}  better"]
    for r in rows:
        d = r["delta"]
        ds = "-" if d is None else (f"{100 * d:+.2f}%" if r["metric"] in ("same_top",) or
                                    r["metric"].endswith(("_acc", "_acc_delta", "_recovery")) else f"{d:+.4g}")
        lines.append(f"{r['metric']:<{w}}  {_fmt(r['a'], r['metric']):>12}  {_fmt(r['b'], r['metric']):>12}  "
                     f"{ds:>12}  {r['better'] or ''}")
    return "\n".join(lines)
