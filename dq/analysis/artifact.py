"""The ``Analysis`` artifact: what ``dq analyze`` measures and ``dq plan`` consumes (``analysis.json``).

Frozen dataclasses with ``to_dict``/``from_dict`` and a ``version``; unknown keys are rejected, so a
file from a newer or foreign tool fails loudly instead of silently losing fields. Re-planning with a
different budget reuses one analysis, as exllamav2 reuses its measurement file.

Per tensor and candidate type the analysis holds:
- ``nbytes``: exact stored bytes (after llama.cpp's block-size fallback, see ``stored``),
- ``weight_err``: ||W - Q(W)||^2 / ||W||^2,
- ``weighted_err``: the same, each input column weighted by the imatrix (mean squared activation),
- ``act_err``: ||X W^T - X Q(W)^T||^2 / ||X W^T||^2 on the calibration activations X,
- ``kld``: the predicted mean KL divergence (nats per token) of the model with only this tensor quantized
  to this type: second order, from the probe gradients of :mod:`dq.analysis.gradients`.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from dq.analysis.roles import TensorRole
from dq.errors import CorruptFileError, reject_unknown_keys
from dq.quant.formats import QuantFormat, parse_format

__all__ = ["ANALYSIS_VERSION", "IMATRIX_FILE", "TypeError_", "TensorMeasurement", "SuperWeight", "Analysis",
           "imatrix_beside"]

ANALYSIS_VERSION = 2  # 2: per-type predicted KLD from probe gradients


IMATRIX_FILE = "imatrix.gguf"  # what `dq analyze` writes beside analysis.json


def imatrix_beside(analysis_json: str | Path | None, name: str | None = None) -> Path | None:
    """The imatrix written beside an ``analysis.json`` (``name``, default :data:`IMATRIX_FILE`), if present.

    Plans record the analysis they came from; ``dq plan``, ``dq quantize --plan`` and ``dq eval --check``
    find the imatrix through this one lookup.
    """
    if not analysis_json:
        return None
    path = Path(analysis_json).parent / (name or IMATRIX_FILE)
    return path if path.is_file() else None


def _check_keys(cls: type, data: Mapping[str, Any]) -> None:
    reject_unknown_keys(cls.__name__, data, (f.name for f in fields(cls)))


@dataclass(frozen=True)
class TypeError_:
    """Measured damage of one candidate type on one tensor."""

    requested: QuantFormat
    stored: QuantFormat
    nbytes: int
    weight_err: float
    weighted_err: float | None = None
    act_err: float | None = None
    kld: float | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["requested"], d["stored"] = self.requested.value, self.stored.value
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TypeError_:
        _check_keys(cls, d)
        return cls(**{**d, "requested": parse_format(d["requested"]), "stored": parse_format(d["stored"])})


@dataclass(frozen=True)
class TensorMeasurement:
    """Everything measured about one GGUF tensor."""

    name: str  # GGUF name, e.g. blk.3.ffn_down.weight
    hf_name: str  # transformers parameter name (first expert's for merged expert tensors)
    role: TensorRole
    layer: int | None
    shape: tuple[int, ...]  # numpy order, as in the GGUF (experts first for *_exps)
    errors: tuple[TypeError_, ...] = ()
    max_abs: float | None = None

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)

    def error_for(self, fmt: QuantFormat) -> TypeError_ | None:
        return next((e for e in self.errors if e.requested is fmt), None)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "hf_name": self.hf_name, "role": self.role.value, "layer": self.layer,
            "shape": list(self.shape), "errors": [e.to_dict() for e in self.errors], "max_abs": self.max_abs,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> TensorMeasurement:
        _check_keys(cls, d)
        return cls(
            name=d["name"], hf_name=d["hf_name"], role=TensorRole(d["role"]), layer=d.get("layer"),
            shape=tuple(d["shape"]), errors=tuple(TypeError_.from_dict(e) for e in d.get("errors", ())),
            max_abs=d.get("max_abs"),
        )


@dataclass(frozen=True)
class SuperWeight:
    """A super weight (Yu et al. 2024): down_proj[row, col] where input and output spikes meet."""

    tensor: str  # GGUF name of the down_proj (or expert down) tensor
    layer: int
    row: int  # output channel (hidden dim)
    col: int  # input channel (intermediate dim)
    value: float
    input_spike: float  # max |x| at col
    output_spike: float  # max |y| at row
    expert: int | None = None
    ablation_ppl_ratio: float | None = None  # perplexity with the weight zeroed / base perplexity
    ablation_kld: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SuperWeight:
        _check_keys(cls, d)
        return cls(**d)


@dataclass(frozen=True)
class Analysis:
    """The whole measurement of one model."""

    model: str  # path or packaged name it was measured on
    architecture: str
    candidates: tuple[QuantFormat, ...]
    tensors: tuple[TensorMeasurement, ...]
    super_weights: tuple[SuperWeight, ...] = ()
    n_tokens: int = 0
    imatrix_file: str | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)
    version: int = ANALYSIS_VERSION

    def by_name(self) -> dict[str, TensorMeasurement]:
        return {t.name: t for t in self.tensors}

    def to_dict(self) -> dict[str, Any]:
        return {
            "version": self.version, "model": self.model, "architecture": self.architecture,
            "candidates": [c.value for c in self.candidates], "n_tokens": self.n_tokens,
            "imatrix_file": self.imatrix_file, "tensors": [t.to_dict() for t in self.tensors],
            "super_weights": [s.to_dict() for s in self.super_weights], "extra": dict(self.extra),
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> Analysis:
        _check_keys(cls, d)
        if d.get("version") != ANALYSIS_VERSION:
            raise CorruptFileError(
                f"analysis version {d.get('version')!r} is not {ANALYSIS_VERSION}; re-run `dq analyze` with this dq"
            )
        return cls(
            model=d["model"], architecture=d["architecture"],
            candidates=tuple(parse_format(c) for c in d["candidates"]),
            tensors=tuple(TensorMeasurement.from_dict(t) for t in d["tensors"]),
            super_weights=tuple(SuperWeight.from_dict(s) for s in d.get("super_weights", ())),
            n_tokens=d.get("n_tokens", 0), imatrix_file=d.get("imatrix_file"), extra=d.get("extra", {}),
        )

    def save(self, path: str | Path) -> Path:
        from dq.atomic import atomic_path

        path = Path(path)
        with atomic_path(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=1))
        return path

    @classmethod
    def load(cls, path: str | Path) -> Analysis:
        path = Path(path)
        if path.is_dir():
            path = path / "analysis.json"
        if not path.is_file():
            raise CorruptFileError(f"no analysis at {path}; run `dq analyze MODEL -o DIR` first")
        try:
            return cls.from_dict(json.loads(path.read_text()))
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptFileError(f"{path} is not a dq analysis ({exc}); re-run `dq analyze`") from exc
