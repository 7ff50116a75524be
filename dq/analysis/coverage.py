"""Before measuring: the GGUF tensors llama.cpp's converter writes for this model, and dq's names for them.

The converter (run once, cached: the same BF16 GGUF the planner and writer use) is the truth for names and
shapes. Every weight the analysis will measure must map onto one of its tensors (through gguf-py's name
map, merged experts and :mod:`dq.analysis.splits`); if some do not, the architecture is not one dq
supports, and the analysis stops before any work, naming the ones it does.
"""

from __future__ import annotations

from pathlib import Path

from dq.analysis.collect import expert_modules
from dq.analysis.loader import ModelSkeleton
from dq.analysis.names import NameMapper
from dq.analysis.splits import split_of
from dq.errors import UnsupportedArchitectureError

__all__ = ["TESTED_ARCHITECTURES", "expected_names", "check_supported"]

# model_types carried end to end by tests/test_architectures.py
TESTED_ARCHITECTURES = ("llama", "mistral", "qwen2", "qwen3", "gemma3", "mixtral", "qwen2_moe", "qwen3_moe",
                        "deepseek_v3", "gpt_oss", "qwen2_vl")


def expected_names(sk: ModelSkeleton, mapper: NameMapper) -> dict[str, str]:
    """GGUF name -> parameter for every text-model weight the analysis measures."""
    out: dict[str, str] = {}
    experts = {}
    for i in range(sk.n_layers):
        experts.update(expert_modules(sk.module(sk.layer_prefix(i)), sk.layer_prefix(i), mapper))
    for path, names in experts.items():
        for n in names:
            out[n] = path
    head = sk.output_head_path()
    for name, p in sk.model.named_parameters():
        mod = name.rpartition(".")[0]
        if mod in experts or p.ndim < 2 or not name.endswith("weight"):
            continue
        if not (name.startswith(sk.text_model_path + ".") or (head and name.startswith(head + "."))):
            continue  # vision tower: the mmproj conversion's
        if head and name == f"{head}.weight" and sk.tied_output():
            continue
        gname = mapper.gguf_name(name)
        parts = split_of(mapper.arch_name, gname, sk.text_config)
        for n in [q.name for q in parts] if parts else [gname]:
            out[n] = name
    return out


def check_supported(sk: ModelSkeleton, mapper: NameMapper, source_gguf: Path) -> None:
    """Raise unless every weight dq measures is a tensor of the converter's GGUF of this model.

    Raises:
        UnsupportedArchitectureError: the names do not meet; the message lists the tested architectures.
    """
    from dq.quant.assign import read_source_tensors

    converted = {t.name for t in read_source_tensors(source_gguf)}
    missing = {g: p for g, p in expected_names(sk, mapper).items() if g not in converted}
    if missing:
        model_type = sk.text_config.model_type
        example = ", ".join(f"{p} -> {g}" for g, p in list(missing.items())[:3])
        raise UnsupportedArchitectureError(
            f"dq does not support {model_type!r} ({len(missing)} weight(s) do not map onto llama.cpp's conversion, "
            f"e.g. {example}); supported: {', '.join(TESTED_ARCHITECTURES)}"
        )
