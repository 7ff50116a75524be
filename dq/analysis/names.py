"""Transformers parameter names -> GGUF tensor names, through gguf-py's ``TensorNameMap``.

llama.cpp's converter decides the GGUF architecture per Hugging Face architecture (``@ModelBase.register``
in ``convert_hf_to_gguf.py``); :data:`GGUF_ARCH` copies that decision for the model types dq analyses,
and an unlisted type falls back to the gguf architecture of the same name. Names are mapped in the text
model's canonical form (``model.layers.N...``, ``lm_head``), so a VLM's ``model.language_model.layers``
maps like a plain LM's; vision towers map with the ``mmproj`` table (llama.cpp's ``v.``/``mm.`` names).
Fused transformers-5 expert parameters become llama.cpp's merged ``ffn_{gate,up,down}_exps`` tensors.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

__all__ = ["GGUF_ARCH", "gguf_arch_for", "NameMapper", "ExpertNames"]

log = logging.getLogger(__name__)

# transformers model_type (of the text config) -> gguf-py MODEL_ARCH member name, as convert_hf_to_gguf.py
# registers them (Mistral and Mixtral are converted as llama; Gemma-3 text as gemma3).
GGUF_ARCH: dict[str, str] = {
    "llama": "LLAMA", "mistral": "LLAMA", "mixtral": "LLAMA", "granite": "GRANITE",
    "qwen2": "QWEN2", "qwen2_moe": "QWEN2MOE", "qwen3": "QWEN3", "qwen3_moe": "QWEN3MOE",
    "gemma": "GEMMA", "gemma2": "GEMMA2", "gemma3": "GEMMA3", "gemma3_text": "GEMMA3",
    "phi3": "PHI3", "olmo": "OLMO", "olmo2": "OLMO2", "olmoe": "OLMOE", "smollm3": "SMOLLM3",
    "qwen2_vl": "QWEN2VL", "qwen2_5_vl": "QWEN2VL", "qwen2_vl_text": "QWEN2VL", "qwen2_5_vl_text": "QWEN2VL", "starcoder2": "STARCODER2", "stablelm": "STABLELM",
    "deepseek_v2": "DEEPSEEK2", "deepseek_v3": "DEEPSEEK2", "gpt_oss": "GPT_OSS", "granitemoe": "GRANITE_MOE",
}


def gguf_arch_for(model_type: str):
    """gguf-py ``MODEL_ARCH`` for a transformers ``model_type`` (None if llama.cpp has no such architecture)."""
    import gguf

    name = GGUF_ARCH.get(model_type)
    if name is not None:
        return gguf.MODEL_ARCH[name]
    norm = model_type.replace("_", "").replace("-", "").lower()
    for arch, arch_name in gguf.MODEL_ARCH_NAMES.items():
        if arch_name.replace("_", "").replace("-", "").lower() == norm:
            return arch
    return None


@dataclass(frozen=True)
class ExpertNames:
    """GGUF names of one MoE layer's merged expert tensors."""

    gate: str
    up: str
    down: str


_EXPERT_PARAM = re.compile(r"^(?P<pre>.*\.experts)\.(?P<p>gate_up_proj|down_proj|gate_proj|up_proj)$")


class NameMapper:
    """Map parameter names of one model (text model under ``text_model_path``) to GGUF names."""

    def __init__(self, model_type: str, n_layers: int, text_model_path: str, head_path: str | None,
                 n_vision_layers: int = 64) -> None:
        import gguf

        self.arch = gguf_arch_for(model_type)
        if self.arch is None:
            log.warning("llama.cpp has no GGUF architecture for model_type %r; GGUF names fall back to llama's",
                        model_type)
            self.arch = gguf.MODEL_ARCH.LLAMA
        self.arch_name = gguf.MODEL_ARCH_NAMES[self.arch]
        self._map = gguf.get_tensor_name_map(self.arch, n_layers)
        self._vmap = gguf.get_tensor_name_map(gguf.MODEL_ARCH.MMPROJ, n_vision_layers)
        self.text_model_path = text_model_path
        self.head_path = head_path

    def canonical(self, module_path: str) -> str | None:
        """``model.language_model.layers.0.x`` -> ``model.layers.0.x``; ``lm_head`` stays; None if not text."""
        if self.head_path is not None and (module_path == self.head_path or module_path.startswith(self.head_path + ".")):
            return "lm_head" + module_path[len(self.head_path):]
        if module_path.startswith(self.text_model_path + "."):
            return "model." + module_path[len(self.text_model_path) + 1:]
        return None

    def gguf_name(self, param: str) -> str:
        """GGUF name of a parameter (``...q_proj.weight`` -> ``blk.0.attn_q.weight``); unmapped names are kept."""
        mod, _, suffix = param.rpartition(".")
        canon = self.canonical(mod)
        if canon is not None:
            got = self._map.get_name(canon)
            if got is not None:
                return f"{got}.{suffix}"
            whole = self._map.get_name(f"{canon}.{suffix}")
            if whole is not None:  # a bare parameter (gpt-oss's attention sinks): the converter adds .weight
                return f"{whole}.weight"
            log.debug("no GGUF name for %s", param)
            return param
        bare = re.sub(r"^model\.", "", mod)
        cands = (mod, bare, bare.replace("vision_tower.", "vision_tower.vision_model.", 1),
                 bare.replace("visual.", "vision_tower."))
        for cand in cands:
            got = self._vmap.get_name(cand)
            if got is not None:
                return f"{got}.{suffix}"
        return f"v.{param}" if "vision" in param or "visual" in param else f"mm.{param}"

    def expert_names(self, experts_module: str) -> ExpertNames:
        """GGUF names of the merged expert tensors of the experts module at ``experts_module``."""
        canon = self.canonical(experts_module)
        if canon is None:
            raise ValueError(f"{experts_module} is not inside the text model")

        def one(kind: str) -> str:
            got = self._map.get_name(f"{canon}.{kind}")
            return f"{got}.weight" if got else f"{experts_module}.{kind}.weight"

        return ExpertNames(one("gate_proj"), one("up_proj"), one("down_proj"))
