"""Per-tensor type assignment: llama.cpp preset mix, ``--tensor-type`` overrides, or an explicit map.

The preset's own per-tensor decisions are llama.cpp's rules (ported in :mod:`dq.quant.preset_rules` and
checked against a dry run of ``llama_model_quantize``, which still decides on other architectures), so
``--type Q4_K_M`` means exactly what it means to llama-quantize. Overrides keep llama-quantize's
meaning (``regex_search`` on the GGUF tensor name, first match wins, only tensors llama.cpp would
quantize) but are applied on top of the preset's decisions, so overriding some layers of a class never
shifts the preset's layer counters for the others (a llama-quantize pitfall). Block-size fallbacks are
resolved here, from the type table, and every one is recorded: nothing falls back silently.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from dq.errors import PlanError, UnknownFormatError
from dq.quant.formats import FORMATS, QuantFormat, effective_format, parse_format, tensor_nbytes

if TYPE_CHECKING:
    from dq.quant.gguf_header import GGUFHeader

__all__ = ["TensorChoice", "TypeAssignment", "SourceTensor", "parse_tensor_type", "read_source_tensors", "assign_types"]


@dataclass(frozen=True)
class SourceTensor:
    """A tensor of the unquantized GGUF: name, numpy shape, stored type."""

    name: str
    shape: tuple[int, ...]
    fmt: QuantFormat


@dataclass(frozen=True)
class TensorChoice:
    """The type one tensor gets.

    Attributes:
        requested: the type asked for (preset, override or plan).
        stored: the type really written; differs from ``requested`` only by llama.cpp's block-size fallback.
        origin: why: ``preset Q4_K_M``, ``--tensor-type attn_v=Q8_0``, ``plan``, ``kept``.
    """

    name: str
    shape: tuple[int, ...]
    source: QuantFormat
    requested: QuantFormat
    stored: QuantFormat
    origin: str

    @property
    def fell_back(self) -> bool:
        return self.requested is not self.stored

    @property
    def nbytes(self) -> int:
        return tensor_nbytes(self.stored, self.shape)

    @property
    def n_elements(self) -> int:
        return math.prod(self.shape)


@dataclass(frozen=True)
class TypeAssignment:
    """Every tensor's choice, in file order, plus the override patterns that matched nothing."""

    choices: tuple[TensorChoice, ...]
    preset: str | None
    unmatched_patterns: tuple[str, ...] = ()

    @property
    def fallbacks(self) -> list[TensorChoice]:
        return [c for c in self.choices if c.fell_back]

    def by_name(self) -> dict[str, TensorChoice]:
        return {c.name: c for c in self.choices}


def parse_tensor_type(spec: str) -> tuple[str, QuantFormat]:
    """Parse llama-quantize's ``REGEX=TYPE`` (e.g. ``attn_v=q8_0``).

    Raises:
        UnknownFormatError: bad type; ValueError: missing ``=`` or an invalid regex.
    """
    pattern, sep, type_name = spec.rpartition("=")
    if not sep or not pattern or not type_name:
        raise ValueError(f"--tensor-type {spec!r} is not REGEX=TYPE, e.g. 'attn_v=Q8_0' or '^output\\.weight=Q6_K'")
    try:
        re.compile(pattern)
    except re.error as exc:
        raise ValueError(f"--tensor-type {spec!r}: {pattern!r} is not a valid regex ({exc})") from None
    return pattern, parse_format(type_name)


def read_source_tensors(gguf: str | Path | GGUFHeader) -> list[SourceTensor]:
    """Tensors of a GGUF file (or of its parsed header) in file order (numpy shapes)."""
    from dq.quant.gguf_header import GGUFHeader, read_gguf_header

    header = gguf if isinstance(gguf, GGUFHeader) else read_gguf_header(gguf)
    out = []
    for t in header.tensors:
        try:
            fmt = parse_format(t.ggml_type)
        except UnknownFormatError as exc:
            raise PlanError(f"{header.path}: tensor {t.name} has a type dq does not handle ({exc})") from None
        out.append(SourceTensor(t.name, t.shape, fmt))
    return out


def _quantizable(src: SourceTensor, preset_type: QuantFormat) -> bool:
    # llama.cpp leaves a tensor it may not quantize (norms, 1-D, ...) in its source type.
    return len(src.shape) >= 2 and (preset_type is not src.fmt or not FORMATS[preset_type].is_float)


def assign_types(
    sources: Sequence[SourceTensor],
    *,
    preset_types: Mapping[str, QuantFormat] | None = None,
    preset_requested: Mapping[str, QuantFormat] | None = None,
    preset: str | None = None,
    overrides: Sequence[tuple[str, QuantFormat]] = (),
    explicit: Mapping[str, QuantFormat] | None = None,
) -> TypeAssignment:
    """Decide every tensor's stored type.

    Args:
        sources: the unquantized file's tensors.
        preset_types: llama.cpp's per-tensor choice for ``preset`` (see ``dq.quant.llama_quantize``).
        preset_requested: for tensors where llama.cpp fell back, the type the preset wanted.
        preset: the preset's name, for the ``origin`` field.
        overrides: ``(regex, type)`` pairs; first match wins; applied on top of the preset or the plan.
        explicit: name -> type for every tensor to change (a plan); names must exist.

    Returns:
        A :class:`TypeAssignment`; patterns that matched nothing are listed in ``unmatched_patterns``.
    """
    names = {s.name for s in sources}
    if explicit is not None:
        unknown = sorted(set(explicit) - names)
        if unknown:
            raise PlanError(
                f"the plan names {len(unknown)} tensor(s) the model does not have, e.g. {unknown[:3]}; "
                f"was it made for another model? Re-run `dq plan` on this model's analysis"
            )
    compiled = [(re.compile(p), p, fmt) for p, fmt in overrides]
    used: set[str] = set()
    choices = []
    for src in sources:
        base = (preset_types or {}).get(src.name, src.fmt)
        requested = (preset_requested or {}).get(src.name, base)
        origin = f"preset {preset}" if preset and base is not src.fmt else "kept"
        in_plan = explicit is not None and src.name in explicit
        if in_plan:
            requested, origin = explicit[src.name], "plan"
        if (len(src.shape) >= 2) if in_plan else _quantizable(src, base):
            # on top of the preset's or the plan's decision, as llama-quantize applies them on top of a preset
            for rx, pattern, fmt in compiled:
                if rx.search(src.name):
                    requested = fmt
                    origin = f"{'plan, then ' if in_plan else ''}--tensor-type {pattern}={fmt}"
                    used.add(pattern)
                    break
        stored = effective_format(requested, src.shape) if not FORMATS[requested].is_float else requested
        choices.append(TensorChoice(src.name, src.shape, src.fmt, requested, stored, origin))
    unmatched = tuple(p for _, p, _ in compiled if p not in used)
    return TypeAssignment(tuple(choices), preset, unmatched)


def assign_preset(
    gguf_path: str | Path | GGUFHeader,
    preset: str,
    overrides: Sequence[tuple[str, QuantFormat]] = (),
    explicit: Mapping[str, QuantFormat] | None = None,
    *,
    has_imatrix: bool = False,
) -> TypeAssignment:
    """llama.cpp's per-tensor choice for ``preset`` on this file, then ``overrides``/``explicit``.

    The preset's rules run in Python (:mod:`dq.quant.preset_rules`); on an architecture that port is not
    verified on, llama.cpp's own dry run decides. ``has_imatrix``: the file will be quantized with an
    importance matrix (llama.cpp's IQ3_XXS, IQ4_NL/IQ4_XS and Q4_0/Q5_0 mixes choose differently then).
    ``gguf_path`` may be a header already parsed (:func:`dq.quant.gguf_header.read_gguf_header`), which
    :func:`dq.export.gguf_quantize.quantize_gguf` takes too: the file's header is then read once.
    """
    from dq.quant.gguf_header import GGUFHeader, read_gguf_header
    from dq.quant.llama_quantize import llama_quantize, parse_preset
    from dq.quant.preset_rules import preset_types

    preset = parse_preset(preset)
    header = gguf_path if isinstance(gguf_path, GGUFHeader) else read_gguf_header(gguf_path)
    decided = preset_types(header, preset, has_imatrix=has_imatrix)
    if decided is None:
        # llama.cpp only asks whether an imatrix is given: any one entry tells its dry run so
        flag = {"dq.dry_run": np.ones(1, np.float32)} if has_imatrix else None
        decided = llama_quantize(header.path, None, preset, dry_run=True, imatrix=flag)
    return assign_types(
        read_source_tensors(header),
        preset_types=decided.types,
        preset_requested=decided.requested,
        preset=preset,
        overrides=overrides,
        explicit=explicit,
    )
