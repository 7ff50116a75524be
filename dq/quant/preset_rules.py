"""llama.cpp's preset mixes decided in Python: which type ``Q4_K_M``, ``IQ2_XXS``, ... give each tensor.

A port of ``llama_tensor_get_type`` and its helpers (``src/llama-quant.cpp`` of the pinned llama.cpp:
``tensor_allows_quantization``, ``tensor_get_category``, ``llama_tensor_get_type_impl``,
``tensor_type_fallback``, ``llama_ftype_get_default_type``), reading only the GGUF header. It replaces the
dry run of ``llama_model_quantize`` that ``dq quantize --type`` needed to learn the preset's choices, which
cost a second pass over the model's metadata through libllama (about a quarter of a second on SmolLM2,
the gap between dq and llama-quantize in ``bench/quantize_speed.py``).

The rules depend on the tensor order llama.cpp walks (by layer, then by name: its counters for attn_v and
ffn_down count in that order, not by layer number), on the GGUF's head counts, expert count and block
count, on whether an imatrix is given, and on a few architecture names. ``tests/quant/test_preset_rules.py``
checks every preset, with and without an imatrix, against the dry run on models of every architecture in
:data:`VERIFIED_ARCHITECTURES`; :func:`preset_types` answers ``None`` for any other architecture, and for the
shapes llama.cpp calls a 70B model (a rule of their own), so that the caller falls back to the dry run.

Example:
    >>> from dq.quant.gguf_header import read_gguf_header          # doctest: +SKIP
    >>> d = preset_types(read_gguf_header("m-bf16.gguf"), "Q4_K_M")  # doctest: +SKIP
    >>> d.types["blk.0.attn_v.weight"]                              # doctest: +SKIP
    <QuantFormat.Q6_K: 'Q6_K'>
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from dq.quant.formats import FORMATS, QuantFormat, fallback_format, parse_format
from dq.quant.gguf_header import GGUFHeader

__all__ = ["VERIFIED_ARCHITECTURES", "PresetDecision", "preset_types"]

# GGUF ``general.architecture`` values whose presets tests/quant/test_preset_rules.py compares with the dry run
VERIFIED_ARCHITECTURES = frozenset({"llama", "qwen2", "qwen3", "gemma3", "qwen2moe", "qwen3moe", "deepseek2",
                                    "gpt-oss", "qwen2vl"})
# (arch, block count) that llama.cpp's model loader types as LLM_TYPE_70B, whose attn_v rule differs
_TYPE_70B = {("llama", 80), ("qwen2", 80), ("deci", 80), ("olmo", 80), ("jais2", 68)}

_Q = QuantFormat
# llama_ftype_get_default_type, keyed by dq.quant.llama_quantize.PRESETS names
_DEFAULT_TYPE = {
    "Q4_0": _Q.Q4_0, "Q4_1": _Q.Q4_1, "Q5_0": _Q.Q5_0, "Q5_1": _Q.Q5_1, "Q8_0": _Q.Q8_0, "F16": _Q.F16,
    "BF16": _Q.BF16, "F32": _Q.F32, "MXFP4_MOE": _Q.MXFP4, "Q2_K_S": _Q.Q2_K, "Q2_K": _Q.Q2_K, "IQ3_XS": _Q.IQ3_S,
    "Q3_K_S": _Q.Q3_K, "Q3_K_M": _Q.Q3_K, "Q3_K_L": _Q.Q3_K, "Q4_K_S": _Q.Q4_K, "Q4_K_M": _Q.Q4_K,
    "Q5_K_S": _Q.Q5_K, "Q5_K_M": _Q.Q5_K, "Q6_K": _Q.Q6_K, "TQ1_0": _Q.TQ1_0, "TQ2_0": _Q.TQ2_0,
    "IQ2_XXS": _Q.IQ2_XXS, "IQ2_XS": _Q.IQ2_XS, "IQ2_S": _Q.IQ2_XS, "IQ2_M": _Q.IQ2_S, "IQ3_XXS": _Q.IQ3_XXS,
    "IQ1_S": _Q.IQ1_S, "IQ1_M": _Q.IQ1_M, "IQ4_NL": _Q.IQ4_NL, "IQ4_XS": _Q.IQ4_XS, "IQ3_S": _Q.IQ3_S,
    "IQ3_M": _Q.IQ3_S,
}
# preset aliases that are the same llama_ftype (dq.quant.llama_quantize.PRESETS maps both to one id)
_ALIAS = {"Q3_K": "Q3_K_M", "Q4_K": "Q4_K_M", "Q5_K": "Q5_K_M"}

# tensor_allows_quantization: name fragments never quantized (norms, routers, tiny or positional tables)
_NEVER = ("_norm.weight", "ffn_gate_inp.weight", "ffn_gate_tid2eid.weight", "altup", "laurel", "per_layer_model_proj",
          "ssm_conv1d", "shortconv.conv.weight", "indexer.k_proj.weight", "indexer.q_proj.weight",
          "time_mix_first.weight", "time_mix_w0.weight", "time_mix_w1.weight", "time_mix_w2.weight",
          "time_mix_v0.weight", "time_mix_v1.weight", "time_mix_v2.weight", "time_mix_a0.weight",
          "time_mix_a1.weight", "time_mix_a2.weight", "time_mix_g1.weight", "time_mix_g2.weight",
          "time_mix_decay_w1.weight", "time_mix_decay_w2.weight", "time_mix_lerp_fused.weight", "attn_rel_b.weight",
          ".position_embd", "sam.pos_embd", "sam.neck.", "sam.net_", ".rel_pos", ".patch_embd", ".patch_merger",
          "a.rvq.codebook", "mm.a.code_embd")
_NEVER_GLM5_NEXT = ("hc_", "indexer.attn_q_b", "indexer.attn_k", "indexer.proj", "indexer_compressor_gate",
                    "indexer_compressor_ape", "ssm_f_a.weight", "ssm_f_b.weight", "ssm_g_a.weight", "ssm_g_b.weight",
                    "ssm_beta.weight", "attn_kv_a_mqa.weight", "attn_k_b.weight", "attn_v_b.weight")

_IQ_LOW = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"})
_LAYER = re.compile(r"blk\.(-?\d+)\.")  # sscanf(name, "blk.%d.")


@dataclass(frozen=True)
class PresetDecision:
    """What the dry run reports: every tensor's stored type, and the wanted type where it fell back."""

    types: dict[str, QuantFormat]
    requested: dict[str, QuantFormat]


def _category(name: str) -> str:
    if name == "output.weight":
        return "output"
    if name in ("token_embd.weight", "per_layer_token_embd.weight"):
        return "token_embd"
    for frag, cat in (("attn_qkv.weight", "attn_qkv"), ("attn_kv_b.weight", "attn_kv_b"), ("attn_v.weight", "attn_v"),
                      ("attn_k.weight", "attn_k"), ("attn_q.weight", "attn_q"), ("attn_output.weight", "attn_output"),
                      ("ffn_up", "ffn_up"), ("ffn_gate", "ffn_gate"), ("ffn_down", "ffn_down")):
        if frag in name:
            return cat
    return "other"


def _ne(shape: tuple[int, ...]) -> list[int]:
    return [int(d) for d in reversed(shape)] + [1] * (4 - len(shape))


def _n_dims(shape: tuple[int, ...]) -> int:
    ne = _ne(shape)
    return max([i + 1 for i, d in enumerate(ne) if d > 1] or [1])


def _allows_quantization(name: str, shape: tuple[int, ...], arch: str) -> bool:
    if _n_dims(shape) < 2 or not name.endswith("weight"):
        return False
    if name in ("position_embd.weight", "token_types.weight"):
        return False
    never = _NEVER + (_NEVER_GLM5_NEXT if arch == "glm5-next" else ())
    return not any(f in name for f in never)


def _layer_order(name: str) -> tuple[int, str]:
    # llama_model_loader's weight_name_comparer: by the blk.N. number (-1 outside blocks), then by name
    m = _LAYER.match(name)
    return (int(m.group(1)) if m else -1, name)


def _use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


class _State:
    """quantize_state_impl: the counters llama.cpp advances as it walks the tensors."""

    def __init__(self, arch: str, n_layer: int, n_gqa: int, n_expert: int, has_imatrix: bool, tied: bool,
                 n_attention_wv: int) -> None:
        self.arch, self.n_gqa, self.n_expert, self.has_imatrix, self.tied = arch, n_gqa, n_expert, has_imatrix, tied
        self.n_attention_wv = n_attention_wv
        self.n_ffn_down = self.n_ffn_gate = self.n_ffn_up = n_layer
        self.i_attention_wv = self.i_ffn_down = self.i_ffn_gate = self.i_ffn_up = 0

    def layer_info(self, counter: int, n: int, name: str) -> tuple[int, int]:
        if max(1, self.n_expert) > 1:
            m = _LAYER.match(name)
            if m is None or not 0 <= int(m.group(1)) < n:
                raise ValueError(f"cannot determine the layer of {name}")
            return int(m.group(1)), n
        return counter, n


def _impl(qs: _State, new: QuantFormat, name: str, ne: list[int], ftype: str, cat: str) -> QuantFormat:
    """llama_tensor_get_type_impl."""
    arch, gqa, n_exp = qs.arch, qs.n_gqa, qs.n_expert
    falcon = arch == "falcon"
    attn_v_like = cat in ("attn_v", "attn_qkv", "attn_kv_b")
    if arch == "glm5-next" and any(f in name for f in ("attn_q_a", "attn_q_b", "nextn.eh_proj")):
        if new not in (_Q.F32, _Q.BF16, _Q.F16):
            return _Q.Q8_0
    if cat == "output" or (qs.tied and cat == "token_embd"):
        if ftype == "MXFP4_MOE" or falcon or ne[0] % FORMATS[new].block_size != 0:
            return _Q.Q8_0
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ3_XXS", "IQ1_S", "IQ2_S", "IQ2_M", "IQ1_M"):
            return _Q.Q5_K
        return new if new is _Q.Q8_0 else _Q.Q6_K
    if ftype == "MXFP4_MOE":
        expert_role = arch != "bailingmoe3" or cat in ("ffn_up", "ffn_gate", "ffn_down")
        return _Q.MXFP4 if ne[2] > 1 and expert_role else _Q.Q8_0
    if cat == "token_embd":
        if ftype in ("IQ2_XXS", "IQ2_XS", "IQ1_S", "IQ1_M"):
            return _Q.Q2_K
        if ftype in ("IQ2_S", "IQ2_M", "IQ3_XXS"):
            return _Q.IQ3_S
        if ftype in ("TQ1_0", "TQ2_0"):
            return _Q.Q4_K
        return new
    if ftype in _IQ_LOW:
        two_s = ftype in ("IQ2_S", "IQ2_M")
        if attn_v_like:
            new = _Q.Q4_K if gqa >= 4 or n_exp >= 4 else (_Q.IQ3_S if two_s else _Q.Q2_K)
            qs.i_attention_wv += 1
        elif n_exp == 8 and cat == "attn_k":
            new = _Q.Q4_K
        elif cat == "ffn_down":
            if qs.i_ffn_down < qs.n_ffn_down // 8:
                new = _Q.IQ3_S if two_s else _Q.Q2_K
            qs.i_ffn_down += 1
        elif cat == "attn_output":
            if n_exp == 8:
                new = _Q.Q5_K
            elif ftype in ("IQ1_S", "IQ1_M"):
                new = _Q.IQ2_XXS
            elif two_s:
                new = _Q.IQ3_S
        return new
    if attn_v_like:  # attn_qkv lands here too: llama.cpp's own ATTENTION_QKV branch below it is never reached
        if ftype == "Q2_K":
            new = _Q.Q4_K if gqa >= 4 else _Q.Q3_K
        elif ftype == "Q2_K_S" and gqa >= 4:
            new = _Q.Q4_K
        elif ftype == "IQ3_XXS":
            new = _Q.Q4_K if gqa >= 4 else (_Q.IQ3_XXS if qs.has_imatrix else _Q.IQ3_S)
        elif ftype in ("IQ3_XS", "IQ3_S") and gqa >= 4:
            new = _Q.Q4_K
        elif ftype == "IQ3_M":
            new = _Q.Q4_K
        elif ftype == "Q3_K_M":
            new = _Q.Q5_K if qs.i_attention_wv < 2 else _Q.Q4_K
        elif ftype == "Q3_K_L":
            new = _Q.Q5_K
        elif ftype in ("IQ4_NL", "IQ4_XS") and gqa >= 4:
            new = _Q.Q5_K
        elif ftype in ("Q4_K_M", "Q5_K_M") and _use_more_bits(qs.i_attention_wv, qs.n_attention_wv):
            new = _Q.Q6_K
        elif ftype == "Q4_K_S" and qs.i_attention_wv < 4:
            new = _Q.Q5_K
        if n_exp == 8:
            new = _Q.Q8_0
        qs.i_attention_wv += 1
    elif cat == "attn_k":
        if n_exp == 8:
            new = _Q.Q8_0
        elif ftype == "IQ3_XS":
            new = _Q.IQ3_XXS
        elif ftype == "IQ3_XXS":
            new = _Q.IQ2_S
    elif cat == "attn_q":
        if ftype == "IQ3_XS":
            new = _Q.IQ3_XXS
        elif ftype == "IQ3_XXS":
            new = _Q.IQ2_S
    elif cat == "ffn_down":
        i, n = qs.layer_info(qs.i_ffn_down, qs.n_ffn_down, name)
        if ftype == "Q2_K":
            new = _Q.Q3_K
        elif ftype == "Q2_K_S":
            if i < n // 8:
                new = _Q.Q4_K
        elif ftype == "IQ3_XXS" and not qs.has_imatrix:
            new = _Q.Q4_K if i < n // 8 else _Q.Q3_K
        elif ftype == "Q3_K_M":
            new = _Q.Q5_K if i < n // 16 else (_Q.Q4_K if not falcon or _use_more_bits(i, n) else _Q.Q3_K)
        elif ftype == "IQ3_M" and (i < n // 8 or (n_exp == 8 and _use_more_bits(i, n))):
            new = _Q.Q4_K
        elif ftype == "Q3_K_L":
            new = _Q.Q4_K if falcon else _Q.Q5_K
        elif ftype == "Q4_K_M":
            if falcon:
                new = _Q.Q6_K if i < n // 16 else (_Q.Q5_K if _use_more_bits(i, n) else _Q.Q4_K)
            elif _use_more_bits(i, n):
                new = _Q.Q6_K
        elif i < n // 8 and ftype in ("IQ4_NL", "IQ4_XS") and not qs.has_imatrix:
            new = _Q.Q5_K
        elif ftype == "Q5_K_M" and _use_more_bits(i, n):
            new = _Q.Q6_K
        elif ftype == "Q4_K_S" and not falcon and i < n // 8:
            new = _Q.Q5_K
        elif ftype in ("Q4_0", "Q5_0") and qs.has_imatrix and i < n // 8:
            new = _Q.Q4_1 if ftype == "Q4_0" else _Q.Q5_1
        qs.i_ffn_down += 1
    elif cat == "attn_output":
        if not falcon:
            if n_exp == 8:
                if ftype in ("Q2_K", "IQ3_XS", "IQ3_XXS", "Q3_K_S", "Q3_K_M", "IQ4_NL", "Q4_K_S", "Q4_K_M", "IQ3_S",
                             "IQ3_M", "IQ4_XS"):
                    new = _Q.Q5_K
            else:
                new = {"Q2_K": _Q.Q3_K, "IQ3_XXS": _Q.IQ3_S, "Q3_K_M": _Q.Q4_K, "Q3_K_L": _Q.Q5_K,
                       "IQ3_M": _Q.Q4_K}.get(ftype, new)
        elif ftype == "Q3_K_L":
            new = _Q.Q4_K
    elif cat in ("ffn_gate", "ffn_up"):
        counter = qs.i_ffn_gate if cat == "ffn_gate" else qs.i_ffn_up
        i, n = qs.layer_info(counter, qs.n_ffn_gate, name)
        if ftype == "IQ3_XS" and n // 8 <= i < 7 * n // 8:
            new = _Q.IQ3_XXS
        if cat == "ffn_gate":
            qs.i_ffn_gate += 1
        else:
            qs.i_ffn_up += 1
    return new


def preset_types(header: GGUFHeader, preset: str, *, has_imatrix: bool = False) -> PresetDecision | None:
    """The type llama.cpp's ``preset`` gives every tensor of ``header``'s model, as its dry run reports them.

    Args:
        header: the unquantized GGUF's parsed header.
        preset: a name of :data:`dq.quant.llama_quantize.PRESETS`.
        has_imatrix: whether the quantization gets an importance matrix (some rules depend on it).

    Returns:
        The decision, or None where this port is not verified (another architecture, a 70B-typed model):
        ask llama.cpp's dry run then.
    """
    from dq.quant.llama_quantize import parse_preset

    ftype = parse_preset(preset)
    ftype = _ALIAS.get(ftype, ftype)
    arch = header.value("general.architecture")
    n_layer = header.first(f"{arch}.block_count")
    if arch not in VERIFIED_ARCHITECTURES or n_layer is None or (arch, n_layer) in _TYPE_70B:
        return None
    n_head = int(header.first(f"{arch}.attention.head_count") or 0)
    n_head_kv = header.first(f"{arch}.attention.head_count_kv")
    n_head_kv = n_head if n_head_kv is None else int(n_head_kv)
    n_gqa = n_head // n_head_kv if n_head_kv else 0
    n_expert = int(header.first(f"{arch}.expert_count") or 0)
    tensors = sorted(header.tensors, key=lambda t: _layer_order(t.name))
    cats = {t.name: _category(t.name) for t in tensors}
    qs = _State(arch, int(n_layer), n_gqa, n_expert, has_imatrix, tied="output" not in cats.values(),
                n_attention_wv=sum(c in ("attn_v", "attn_qkv", "attn_kv_b") for c in cats.values()))
    default = _DEFAULT_TYPE[ftype]
    types: dict[str, QuantFormat] = {}
    requested: dict[str, QuantFormat] = {}
    for t in tensors:
        src = parse_format(t.ggml_type)
        if not _allows_quantization(t.name, t.shape, arch):
            types[t.name] = src
            continue
        if FORMATS[default].is_float:
            types[t.name] = default
            continue
        want = _impl(qs, default, t.name, _ne(t.shape), ftype, cats[t.name])
        got = fallback_format(want, _ne(t.shape)[0])
        types[t.name] = got
        if got is not want:
            requested[t.name] = want
    return PresetDecision(types, requested)
