"""From an analysis directory and a budget to a ``QuantPlan`` (what ``dq plan`` and ``--plan auto`` run).

Steps: load ``analysis.json``; find the unquantized GGUF of the model it measured (converting once);
build the damage model from the analysis (:mod:`dq.plan.damage`); price the header exactly (it carries
the imatrix keys); solve the knapsack. No model pass runs here: planning every budget of a model costs
one analysis, then seconds per budget.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path

from dq.analysis.artifact import Analysis, imatrix_beside
from dq.errors import BudgetError, PlanError
from dq.plan.allocate import allocate
from dq.plan.artifact import QuantPlan
from dq.plan.damage import DamageModel
from dq.plan.policy import Policy
from dq.quant.assign import SourceTensor, read_source_tensors
from dq.quant.gguf_header import read_gguf_header
from dq.quant.imatrix import Imatrix, read_imatrix
from dq.quant.layout import header_size

__all__ = ["parse_size", "budget_bytes", "PlanInputs", "load_plan_inputs", "make_plan"]

log = logging.getLogger(__name__)

_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
          "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}


def parse_size(text: str | int) -> int:
    """``12GB`` -> 12e9, ``80MiB`` -> 80*2**20, ``123456`` -> 123456 bytes.

    Raises:
        BudgetError: unparseable or non-positive.
    """
    if isinstance(text, int):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([KMGT]?I?B?)\s*", str(text).upper())
        if not m or m.group(2) not in _UNITS:
            raise BudgetError(f"cannot read size {text!r}; write e.g. 80MB, 1.5GB, 700MiB or a byte count")
        value = int(float(m.group(1)) * _UNITS[m.group(2)])
    if value <= 0:
        raise BudgetError(f"size must be positive, got {text!r}")
    return value


def budget_bytes(target_size: str | int | None, target_bpw: float | None, n_elements: int) -> int:
    """The whole-file byte budget from exactly one of ``--target-size`` and ``--target-bpw``."""
    if (target_size is None) == (target_bpw is None):
        raise BudgetError("give exactly one of --target-size (e.g. 80MB) and --target-bpw (e.g. 2.5)")
    if target_size is not None:
        return parse_size(target_size)
    if not 0 < float(target_bpw) <= 32:
        raise BudgetError(f"--target-bpw must be in (0, 32], got {target_bpw}")
    return int(float(target_bpw) * n_elements / 8)


@dataclass(frozen=True)
class PlanInputs:
    """Everything a plan is made from: the analysis, its damage model, the model's source GGUF, the imatrix."""

    analysis: Analysis
    analysis_path: Path
    model_dir: Path
    source_gguf: Path
    imatrix: Imatrix | None
    imatrix_path: Path | None
    damage: DamageModel
    sources: tuple[SourceTensor, ...]  # the source GGUF's tensors, in file order (then the mmproj's)
    header_bytes: int  # the quantized files' exact header sizes (they do not depend on the types)
    mmproj_gguf: Path | None = None  # a vision-language model's projector GGUF (vision tower + projector)
    mmproj_names: frozenset[str] = frozenset()  # which of ``sources`` live in it


def load_plan_inputs(analysis_path: str | Path) -> PlanInputs:
    """Load an analysis and locate the model, its BF16 GGUF (and mmproj GGUF for a VLM) and its imatrix."""
    from dq.convert.source import mmproj_gguf, source_gguf
    from dq.models import resolve_model

    path = Path(analysis_path)
    analysis = Analysis.load(path)
    adir = path if path.is_dir() else path.parent
    model_dir = resolve_model(analysis.model)
    src = source_gguf(model_dir)
    im_path = imatrix_beside(adir / "analysis.json", analysis.imatrix_file)
    imatrix = read_imatrix(im_path) if im_path else None
    header = read_gguf_header(src)
    sources = read_source_tensors(header)
    head = header_size(header, imatrix=imatrix, imatrix_name=im_path.name if im_path else None)
    mm = mmproj_gguf(model_dir) if model_dir.is_dir() else None
    mm_names: frozenset[str] = frozenset()
    if mm is not None:
        mm_header = read_gguf_header(mm)
        mm_sources = read_source_tensors(mm_header)
        mm_names = frozenset(t.name for t in mm_sources)
        sources += mm_sources
        head += header_size(mm_header)
    return PlanInputs(analysis, adir / "analysis.json", model_dir, src, imatrix, im_path,
                      DamageModel.from_analysis(analysis), tuple(sources), head, mm, mm_names)


def make_plan(
    inputs: PlanInputs,
    budget: int,
    *,
    policy: Policy | None = None,
) -> QuantPlan:
    """Allocate types for ``inputs`` under ``budget`` bytes (the whole file), least predicted KLD first.

    Raises:
        PlanError: the analysis measured tensors the model's GGUF does not have (another model's analysis).
        BudgetError: the budget is below the smallest file the policy allows (the message states that size).
    """
    names = {s.name for s in inputs.sources}
    foreign = [t.name for t in inputs.analysis.tensors if t.errors and t.name not in names]
    if foreign:
        raise PlanError(f"the analysis measured tensors this model does not have (e.g. {foreign[:3]}): "
                        f"it belongs to another model; re-run `dq analyze` on {inputs.model_dir}")
    plan = allocate(inputs.analysis, inputs.sources, budget, header_bytes=inputs.header_bytes, policy=policy,
                    damage=inputs.damage, analysis_path=str(inputs.analysis_path),
                    imatrix_names=frozenset(inputs.imatrix.entries) if inputs.imatrix is not None else frozenset(),
                    mmproj_names=inputs.mmproj_names)
    log.info("plan: %s bytes of %s budget, predicted mean KLD %.4g", f"{plan.total_bytes:,}", f"{budget:,}",
             plan.predicted_damage)
    return plan
