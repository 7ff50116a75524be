"""Write the files of a plan: the text GGUF, and for a vision-language model its mmproj GGUF too.

llama.cpp runs a VLM from two files: the language model and the multimodal projector (vision tower +
projector, llama.cpp's ``--mmproj`` conversion), loaded together by ``llama-mtmd-cli`` / ``llama-server
--mmproj``. A plan covers both (its budget is their sum; ``QuantPlan.mmproj`` lists the projector's
tensors); the projector is written beside the text file as ``mmproj-<name>``. If the second file fails,
the first is removed: either both files are there or neither.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from dq.errors import PlanError
from dq.export.gguf_quantize import QuantizeResult, quantize_gguf
from dq.plan.artifact import QuantPlan
from dq.quant.assign import assign_types, read_source_tensors
from dq.quant.imatrix import Imatrix

if TYPE_CHECKING:
    from dq.quant.gguf_header import GGUFHeader

__all__ = ["mmproj_path", "write_plan_files"]


def mmproj_path(out: str | Path) -> Path:
    """Where the projector of ``out`` goes: ``mmproj-<name>`` beside it."""
    out = Path(out)
    return out.with_name("mmproj-" + out.name)


def write_plan_files(
    plan: QuantPlan,
    text_src: str | Path | GGUFHeader,
    mmproj_src: str | Path | None,
    out: str | Path,
    *,
    imatrix: Imatrix | None = None,
    imatrix_name: str | None = None,
    overrides=(),
    n_threads: int | None = None,
    progress: Callable | None = None,
    tensor_cache=None,
    split_max_bytes: int = 0,
    device: str = "cpu",
) -> list[QuantizeResult]:
    """Quantize ``plan`` into ``out`` (and ``mmproj-<out>`` when the plan has projector tensors).

    Raises:
        PlanError: the plan was made for another model, or names projector tensors but no mmproj source.
    """
    text = read_source_tensors(text_src)
    mm = read_source_tensors(mmproj_src) if mmproj_src is not None else []
    plan.check_model((s.name, s.shape) for s in [*text, *mm])
    if plan.mmproj and mmproj_src is None:
        raise PlanError("the plan has mmproj tensors (a vision-language model) but no mmproj GGUF was given")
    results = [quantize_gguf(text_src, out, assign_types(text, explicit=plan.explicit_types(mmproj=False),
                                                         overrides=overrides),
                             imatrix=imatrix, imatrix_name=imatrix_name, n_threads=n_threads, progress=progress,
                             tensor_cache=tensor_cache, split_max_bytes=split_max_bytes, device=device)]
    if plan.mmproj:
        try:
            results.append(quantize_gguf(mmproj_src, mmproj_path(out),
                                         assign_types(mm, explicit=plan.explicit_types(mmproj=True)),
                                         n_threads=n_threads, progress=progress, tensor_cache=tensor_cache,
                                         device=device))
        except BaseException:
            for f in results[0].files:
                f.unlink(missing_ok=True)
            raise
    return results
