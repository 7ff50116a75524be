"""A transformers model skeleton whose weights are loaded one module at a time from safetensors.

The model is built from its config with transformers' own classes on the meta device (buffers such as
rotary frequencies stay real), so any causal LM or image-text-to-text model transformers supports runs
unchanged. Checkpoint keys are mapped to module parameters with transformers' own checkpoint
conversion rules (renamings and fused-expert merges, ``transformers.conversion_mapping``), computed
once; :meth:`ModelSkeleton.load` then materialises just the parameters under one module prefix, and
:meth:`ModelSkeleton.free` sends them back to ``meta``. Peak memory is one module's float32 weights plus
one checkpoint-dtype piece: parameters are built one at a time, merged expert tensors expert by expert and
plain ones in row chunks, straight into their float32 storage (transformers' converter, used for any other
form, would hold every expert twice in the checkpoint dtype first).

Checkpoint tensors are read with ``pread`` (:class:`_SafetensorsFile`), not through a memory map: pages
of a mapped file stay in the process's resident set until it is unmapped, so a long-lived ``safe_open``
handle grows RSS to the whole checkpoint. Whole-vocabulary matrices (embedding, LM head) can be read in
row chunks (:meth:`ModelSkeleton.iter_rows`) so they never have to be resident in float32 at once.

Example:
    >>> sk = ModelSkeleton.open(model_dir)                 # doctest: +SKIP
    >>> sk.load(sk.layer_prefix(0)); ...; sk.free(sk.layer_prefix(0))  # doctest: +SKIP
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import re
import struct
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from dq.errors import AnalysisError, ModelNotFoundError, NotAModelError, UnsupportedArchitectureError

__all__ = ["ModelSkeleton", "load_config", "limit_heap_growth"]

# safetensors dtype names -> torch dtypes (https://github.com/huggingface/safetensors, `Dtype`)
_ST_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class _SafetensorsFile:
    """One safetensors file read with ``pread``: nothing is memory-mapped, nothing stays resident.

    The format is an 8-byte little-endian header length, a JSON header (``dtype``, ``shape``,
    ``data_offsets`` per tensor, relative to the end of the header), then the data.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        with open(path, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        header.pop("__metadata__", None)
        self.header: dict[str, dict] = header
        self.data_start = 8 + n

    def keys(self) -> list[str]:
        return list(self.header)

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(self.header[key]["shape"])

    def read(self, key: str, r0: int | None = None, r1: int | None = None) -> torch.Tensor:
        """Tensor ``key`` (rows ``r0:r1`` of its first dimension if given) in its stored dtype, a fresh copy."""
        info = self.header[key]
        dtype = _ST_DTYPES.get(info["dtype"])
        if dtype is None:
            raise AnalysisError(f"{self.path}: tensor {key} has dtype {info['dtype']}, which dq cannot read")
        shape = list(info["shape"])
        begin, end = info["data_offsets"]
        if shape and (r0 is not None or r1 is not None):
            rows = shape[0]
            r0, r1 = max(0, r0 or 0), min(rows, rows if r1 is None else r1)
            stride = (end - begin) // rows if rows else 0
            begin, end = begin + r0 * stride, begin + max(r0, r1) * stride
            shape[0] = max(0, r1 - r0)
        buf = bytearray(end - begin)
        if buf:
            with open(self.path, "rb", buffering=0) as fh:
                view, pos = memoryview(buf), 0
                while pos < len(buf):  # preadv may return short reads on very large tensors
                    got = os.preadv(fh.fileno(), [view[pos:]], self.data_start + begin + pos)
                    if got <= 0:
                        raise AnalysisError(f"{self.path} is truncated: tensor {key} ends past the end of the file")
                    pos += got
            t = torch.frombuffer(buf, dtype=dtype)
        else:
            t = torch.empty(0, dtype=dtype)
        return t.reshape(shape)


log = logging.getLogger(__name__)

_VISION_RX = re.compile(r"(^|\.)(vision_tower|visual|vision_model|multi_modal_projector|mm_projector|vit)(\.|$)")


def load_config(model_dir: Path):
    """The model's transformers config, with clear errors for a missing or unknown model."""
    from transformers import AutoConfig

    model_dir = Path(model_dir)
    if not model_dir.exists():
        raise ModelNotFoundError(f"model path {str(model_dir)!r} does not exist")
    cfg_path = model_dir / "config.json"
    if not model_dir.is_dir() or not cfg_path.is_file():
        raise NotAModelError(
            f"{model_dir} is not a Hugging Face model directory (no config.json); `dq analyze` needs the "
            f"safetensors checkpoint, not a GGUF"
        )
    raw = json.loads(cfg_path.read_text())
    try:
        return AutoConfig.from_pretrained(model_dir)
    except (ValueError, KeyError) as exc:
        raise UnsupportedArchitectureError(
            f"unknown architecture: model_type {raw.get('model_type')!r} / architectures "
            f"{raw.get('architectures')} in {cfg_path} is not known to this transformers; upgrade transformers "
            f"or fix config.json ({exc})"
        ) from exc


# quantization_config.quant_method values whose weights dq reads as llama.cpp's converter does
_READABLE_QUANT = ("fp8",)


def _check_quantization(model_dir: Path) -> tuple[int, ...] | None:
    """The FP8 block shape of an FP8 checkpoint (None for an unquantized one).

    Raises:
        UnsupportedArchitectureError: a ``quantization_config`` dq cannot dequantize exactly as the converter.
    """
    qc = json.loads((model_dir / "config.json").read_text()).get("quantization_config")
    if not qc:
        return None
    method = qc.get("quant_method")
    if method not in _READABLE_QUANT:
        raise UnsupportedArchitectureError(
            f"{model_dir} is a {method!r}-quantized checkpoint (config.json quantization_config); dq reads "
            f"unquantized (BF16/F16/F32) or block-scaled FP8 checkpoints; give it the original weights"
        )
    return tuple(int(b) for b in qc.get("weight_block_size") or ())


def _build_meta_model(config):
    from accelerate import init_empty_weights
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText

    errors = []
    for auto in (AutoModelForCausalLM, AutoModelForImageTextToText):
        try:
            with init_empty_weights(include_buffers=False):
                return auto.from_config(config, dtype=torch.float32)
        except ValueError as exc:  # "Unrecognized configuration class ..."
            errors.append(str(exc).splitlines()[0])
    raise UnsupportedArchitectureError(
        f"unknown architecture: transformers has no causal-LM or image-text-to-text class for model_type "
        f"{config.model_type!r} ({'; '.join(errors)}); `dq analyze` supports models transformers can run"
    )


def _find_decoder_layers(model: nn.Module, n_layers: int) -> tuple[str, nn.ModuleList]:
    found = [
        (name, mod) for name, mod in model.named_modules()
        if isinstance(mod, nn.ModuleList) and name.split(".")[-1] == "layers" and len(mod) == n_layers
        and not _VISION_RX.search(name)
    ]
    if not found:
        raise UnsupportedArchitectureError(
            f"could not find the {n_layers} decoder layers of {type(model).__name__}; `dq analyze` needs a "
            f"transformers model with a `layers` ModuleList"
        )
    return found[0]


def _checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [model_dir / f for f in files]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise NotAModelError(f"{model_dir} has no .safetensors weights; `dq analyze` reads safetensors checkpoints")
    return files


def limit_heap_growth(threshold: int = 1 << 20) -> bool:
    """Have glibc serve allocations of ``threshold`` bytes and more with ``mmap``, so freeing returns them.

    glibc raises its mmap threshold to the size of each large block freed (up to 32 MiB), after which
    block-sized tensors come from the heap and freed ones stay resident as fragments: streaming
    SmolLM2's 30 blocks twice grew RSS by ~330 MiB, and by ~30 MiB with a fixed 1 MiB threshold.
    Process-wide (``mallopt(M_MMAP_THRESHOLD)``; also settable as ``MALLOC_MMAP_THRESHOLD_``); a no-op
    returning False where libc is not glibc.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, int(threshold)))  # -3 = M_MMAP_THRESHOLD (malloc.h)
    except (OSError, AttributeError):
        return False


@dataclass
class ModelSkeleton:
    """A meta-device model plus a map from its parameters to checkpoint tensors.

    Attributes:
        model_dir: the Hugging Face directory.
        config: the full config; ``text_config`` is the language model's (the same object for text models).
        model: the transformers model, parameters on ``meta`` until loaded.
        layers_path: module path of the decoder ``ModuleList`` (``model.layers``, ``model.language_model.layers``).
        text_model_path: module path of the module that owns the layers (its forward embeds tokens).
    """

    model_dir: Path
    config: Any
    text_config: Any
    model: nn.Module
    layers_path: str
    text_model_path: str
    _targets: dict[str, list[str]] = field(default_factory=dict)  # param prefix -> checkpoint keys
    _key_file: dict[str, Path] = field(default_factory=dict)
    _handles: dict[Path, _SafetensorsFile] = field(default_factory=dict)
    _converter: dict[str, Any] = field(default_factory=dict)  # param -> transformers WeightConverter building it
    _key_pattern: dict[str, str] = field(default_factory=dict)  # checkpoint key -> converter source pattern
    device: str = "cpu"
    fp8_block: tuple[int, ...] | None = None  # FP8 checkpoints: the weight_scale_inv block shape

    @classmethod
    def open(cls, model_dir: str | Path, device: str = "cpu") -> ModelSkeleton:
        """Build the skeleton of the model in ``model_dir`` (nothing but buffers is loaded)."""
        model_dir = Path(model_dir)
        config = load_config(model_dir)
        fp8_block = _check_quantization(model_dir)
        text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
        model = _build_meta_model(config)
        model.eval()
        n_layers = int(text_config.num_hidden_layers)
        layers_path, _ = _find_decoder_layers(model, n_layers)
        sk = cls(model_dir, config, text_config, model, layers_path, layers_path.rsplit(".", 1)[0], device=device,
                 fp8_block=fp8_block)
        for f in _checkpoint_files(model_dir):
            h = _SafetensorsFile(f)
            sk._handles[f] = h
            for k in h.keys():
                sk._key_file[k] = f
        sk._map_keys()
        return sk

    def _map_keys(self) -> None:
        # transformers' own checkpoint -> module renaming (internal API of transformers 5; a plain identity
        # mapping is the fallback for checkpoints saved in module layout).
        meta_sd = self.model.state_dict()
        try:
            from transformers.conversion_mapping import get_model_conversion_mapping
            from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

            mapping = get_model_conversion_mapping(self.model)
            renamings = [m for m in mapping if isinstance(m, WeightRenaming)]
            converters = [m for m in mapping if isinstance(m, WeightConverter)]
            self._weight_mapping = mapping

            def target(k: str) -> tuple[str, str | None]:
                t, pattern = rename_source_key(k, renamings, converters, self.model.base_model_prefix, meta_sd)
                if t not in meta_sd and k in meta_sd:
                    return k, None
                return t, pattern
        except ImportError:  # pragma: no cover - older transformers
            self._weight_mapping, converters = None, []

            def target(k: str) -> tuple[str, str | None]:
                return k, None
        targets: dict[str, list[str]] = defaultdict(list)
        for k in self._key_file:
            t, pattern = target(k)
            if t not in meta_sd:
                log.debug("checkpoint tensor %s (-> %s) has no parameter in the model; ignored", k, t)
                continue
            targets[t].append(k)
            if pattern is not None:
                conv = next((c for c in converters if pattern in c.source_patterns), None)
                if conv is not None:
                    self._key_pattern[k] = pattern
                    self._converter[t] = conv
        self._targets = dict(targets)

    # -- module paths ---------------------------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return int(self.text_config.num_hidden_layers)

    def layer_prefix(self, i: int) -> str:
        return f"{self.layers_path}.{i}"

    def module(self, path: str) -> nn.Module:
        return self.model.get_submodule(path) if path else self.model

    @property
    def text_model(self) -> nn.Module:
        return self.module(self.text_model_path)

    def output_head_path(self) -> str | None:
        """Module path of the LM head (``lm_head``), if the model has one."""
        out = self.model.get_output_embeddings()
        for name, mod in self.model.named_modules():
            if mod is out:
                return name
        return None

    def vision_params(self) -> list[str]:
        """Parameter names outside the text model and LM head (vision tower, projector)."""
        head = self.output_head_path()
        out = []
        for name, _ in self.model.named_parameters():
            if name.startswith(self.text_model_path + ".") or (head and name.startswith(head + ".")):
                continue
            out.append(name)
        return out

    def tied_output(self) -> bool:
        return bool(getattr(self.text_config, "tie_word_embeddings", False) or
                    getattr(self.config, "tie_word_embeddings", False))

    # -- loading --------------------------------------------------------------------------------------
    def _params_under(self, prefixes: tuple[str, ...], exclude: tuple[str, ...] = ()) -> list[str]:
        return [
            n for n, _ in self.model.named_parameters(remove_duplicate=False)
            if any(n == p or n.startswith(p + ".") for p in prefixes)
            and not any(n.startswith(e + ".") for e in exclude)
        ]

    def load(self, *prefixes: str, exclude: tuple[str, ...] = ()) -> list[str]:
        """Load every parameter under the module ``prefixes`` (float32, on ``device``); return their names.

        Raises:
            AnalysisError: the checkpoint lacks a parameter the model needs.
        """
        names = self._params_under(prefixes, exclude)
        wanted = [n for n in names if self.module_param(n).is_meta]
        missing = []
        for n in wanted:
            keys = self._targets.get(n)
            if not keys:
                missing.append(n)
            elif not self._fill_in_place(n, keys):
                self._load_with_transformers(keys)
        if missing:
            tied = self._tie(missing)
            missing = [m for m in missing if m not in tied]
        still = [n for n in wanted if self.module_param(n).is_meta]
        if missing or still:
            raise AnalysisError(
                f"the checkpoint in {self.model_dir} lacks {len(set(missing) | set(still))} parameter(s) the model "
                f"needs, e.g. {sorted(set(missing) | set(still))[:3]}; is the safetensors file complete?"
            )
        for n in names:  # the loader keeps checkpoint dtype for some tensors; compute in float32
            p = self.module_param(n)
            if p.dtype != torch.float32 and p.is_floating_point():
                self._set_param(n, p.detach().float())
        self._load_buffers(prefixes, exclude)
        return names

    # Parameters are loaded one at a time, so what exists besides the block's float32 parameters is one
    # parameter's transient at most; the large ones (merged experts, whole linears) are filled in place,
    # one checkpoint tensor or row chunk at a time, so their transient is one expert's tensor.
    _FILL_CHUNK_BYTES = 64 << 20

    def _fill_in_place(self, name: str, keys: list[str]) -> bool:
        """Build parameter ``name`` in a preallocated float32 tensor on ``device``, piece by piece; False if
        its checkpoint form is not one this knows (then transformers' converter builds it).

        Two forms: a plain copy of one tensor (read in row chunks), and transformers' merge of per-expert
        tensors (``MergeModulelist(dim=0)``, optionally followed by ``Concatenate(dim=d)`` of gate and up),
        where expert ``e`` of source pattern ``j`` goes to ``out[e]``'s ``j``-th slice along ``d - 1``, in
        the order transformers stacks them (``dot_natural_key``).
        """
        meta = self.module_param(name)
        if not meta.is_floating_point():
            return False
        conv = self._converter.get(name)
        if conv is not None:
            return self._fill_merged(name, keys, conv)
        src = self.row_source(name)
        if src is None or self._is_fp8(src[1]) or not meta.shape:
            return False
        f, key = src
        out = torch.empty(meta.shape, dtype=torch.float32, device=self.device)
        chunk = max(1, self._FILL_CHUNK_BYTES // max(1, out[0].numel() * 4))
        for r0 in range(0, out.shape[0], chunk):
            out[r0:r0 + chunk].copy_(f.read(key, r0, r0 + chunk))
        self._set_param(name, out)
        return True

    def _fill_merged(self, name: str, keys: list[str], conv) -> bool:
        from transformers.core_model_loading import Concatenate, MergeModulelist, dot_natural_key

        ops = list(conv.operations)
        if not ops or not isinstance(ops[0], MergeModulelist) or ops[0].dim != 0:
            return False
        cat_dim = None
        if len(ops) == 2 and isinstance(ops[1], Concatenate) and ops[1].dim >= 1:
            cat_dim = ops[1].dim - 1
        elif len(ops) != 1:
            return False
        groups = [sorted((k for k in keys if self._key_pattern.get(k) == pat), key=dot_natural_key)
                  for pat in conv.source_patterns]
        groups = [g for g in groups if g]
        if sum(map(len, groups)) != len(keys) or (cat_dim is None and len(groups) != 1):
            return False
        n_exp = len(groups[0])
        shapes = [self._handles[self._key_file[g[0]]].shape(g[0]) for g in groups]
        if any(len(g) != n_exp or any(self._handles[self._key_file[k]].shape(k) != shape for k in g)
               for g, shape in zip(groups, shapes)):
            return False
        if cat_dim is None:
            expect = (n_exp, *shapes[0])
        else:
            width = sum(s[cat_dim] for s in shapes)
            expect = (n_exp, *shapes[0][:cat_dim], width, *shapes[0][cat_dim + 1:])
        meta = self.module_param(name)
        if tuple(meta.shape) != expect:
            return False
        out = torch.empty(meta.shape, dtype=torch.float32, device=self.device)
        offset = 0
        for group, shape in zip(groups, shapes):
            for e, key in enumerate(group):
                dst = out[e] if cat_dim is None else out[e].narrow(cat_dim, offset, shape[cat_dim])
                dst.copy_(self._read_checkpoint_tensor(key))
            offset += 0 if cat_dim is None else shape[cat_dim]
        self._set_param(name, out)
        return True

    def _load_with_transformers(self, keys: list[str]) -> None:
        """One parameter through transformers' own conversion (renamings, splits, merges of any kind)."""
        from transformers.core_model_loading import convert_and_load_state_dict_in_model
        from transformers.modeling_utils import LoadStateDictConfig

        sd = {k: self._read_checkpoint_tensor(k) for k in keys}
        cfg = LoadStateDictConfig(
            pretrained_model_name_or_path=str(self.model_dir), weight_mapping=self._weight_mapping,
            dtype=torch.float32, device_map={"": self.device},
        )
        convert_and_load_state_dict_in_model(self.model, sd, cfg)
        sd.clear()  # the checkpoint-dtype copies; the model now holds float32 ones

    def _is_fp8(self, key: str) -> bool:
        return f"{key}_scale_inv" in self._key_file

    def _read_checkpoint_tensor(self, key: str) -> torch.Tensor:
        """A checkpoint tensor as the converter sees it: FP8 weights with a block scale (DeepSeek's
        ``weight_scale_inv``) dequantized as ``convert_hf_to_gguf.py`` does (``dequant_simple``: the scale
        repeated over each block, unpadded, times the weight) and rounded to BF16, the type it writes."""
        t = self._handles[self._key_file[key]].read(key)
        scale_key = f"{key}_scale_inv"
        if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) and scale_key in self._key_file:
            scale = self._handles[self._key_file[scale_key]].read(scale_key).float()
            for dim, size in enumerate(self.fp8_block or ()):
                scale = scale.repeat_interleave(size, dim)
            scale = scale[tuple(slice(0, n) for n in t.shape)]
            t = (t.float() * scale).to(torch.bfloat16)
        return t

    def _load_buffers(self, prefixes: tuple[str, ...], exclude: tuple[str, ...]) -> None:
        """Persistent buffers the checkpoint holds (DeepSeek-V3's ``e_score_correction_bias``, which picks the
        experts): the skeleton's buffers are real but hold their initial values until read from it."""
        for name, buf in self.model.named_buffers():
            if not any(name.startswith(p + ".") for p in prefixes) or any(name.startswith(e + ".") for e in exclude):
                continue
            keys = self._targets.get(name)
            if not keys or len(keys) != 1:
                continue
            value = self._handles[self._key_file[keys[0]]].read(keys[0])
            if tuple(value.shape) != tuple(buf.shape):
                raise AnalysisError(f"checkpoint buffer {keys[0]} has shape {tuple(value.shape)}, the model's {name} "
                                    f"{tuple(buf.shape)}: config.json does not match the weights")
            mod_path, _, bname = name.rpartition(".")
            dtype = torch.float32 if buf.is_floating_point() else buf.dtype
            self.module(mod_path)._buffers[bname] = value.to(device=self.device, dtype=dtype)

    def _tie(self, missing: list[str]) -> set[str]:
        """Tied output embeddings: take the input embedding's weight."""
        head = self.output_head_path()
        done = set()
        if head is None or not self.tied_output():
            return done
        emb = self.model.get_input_embeddings()
        for n in missing:
            if n == f"{head}.weight":
                if emb.weight.is_meta:
                    emb_name = next(k for k, m in self.model.named_modules() if m is emb)
                    self.load(emb_name)
                self._set_param(n, emb.weight.detach())
                done.add(n)
        return done

    def module_param(self, name: str) -> torch.Tensor:
        mod_path, _, pname = name.rpartition(".")
        return getattr(self.module(mod_path), pname)

    def _set_param(self, name: str, value: torch.Tensor) -> None:
        mod_path, _, pname = name.rpartition(".")
        mod = self.module(mod_path)
        setattr(mod, pname, nn.Parameter(value, requires_grad=False))

    def free(self, *prefixes: str) -> None:
        """Send every parameter under ``prefixes`` back to the meta device."""
        for n in self._params_under(prefixes):
            p = self.module_param(n)
            if not p.is_meta:
                self._set_param(n, torch.empty_like(p, device="meta"))

    def tensor(self, name: str) -> torch.Tensor:
        """One parameter's value (loading it if needed; the caller frees it)."""
        p = self.module_param(name)
        if p.is_meta:
            self.load(name.rpartition(".")[0])
            p = self.module_param(name)
        return p.detach()

    def row_source(self, name: str) -> tuple[_SafetensorsFile, str] | None:
        """The checkpoint tensor that parameter ``name`` is a plain (renamed) copy of, or None.

        A tied LM head that the checkpoint lacks is the input embedding's tensor. None when the parameter
        is built by a transformers converter (merged experts, split qkv): load it instead.
        """
        keys = self._targets.get(name)
        if not keys:
            head = self.output_head_path()
            if head is None or name != f"{head}.weight" or not self.tied_output():
                return None
            emb = self.model.get_input_embeddings()
            emb_name = next(k for k, m in self.model.named_modules() if m is emb)
            keys = self._targets.get(f"{emb_name}.weight")
            if not keys:
                return None
        if len(keys) != 1:
            return None
        f = self._handles[self._key_file[keys[0]]]
        if f.shape(keys[0]) != tuple(self.module_param(name).shape):
            return None
        return f, keys[0]

    def iter_rows(self, name: str, chunk: int):
        """Yield ``(r0, rows)``: float32 row chunks ``[<=chunk, ...]`` of parameter ``name``.

        Reads the checkpoint chunk by chunk when the parameter is a plain copy of one tensor (the
        embedding, the LM head), so at most ``chunk`` rows are in memory; otherwise loads the parameter's
        module, slices it, and frees it at the end if it was not loaded before.
        """
        src = self.row_source(name)
        rows = int(self.module_param(name).shape[0])
        if src is not None:
            f, key = src
            for r0 in range(0, rows, chunk):
                yield r0, f.read(key, r0, r0 + chunk).to(torch.float32)
            return
        was_meta = self.module_param(name).is_meta
        mod_path = name.rpartition(".")[0]
        w = self.tensor(name)
        try:
            for r0 in range(0, rows, chunk):
                yield r0, w[r0 : r0 + chunk].float()
        finally:
            del w
            if was_meta:
                self.free(mod_path)

    def close(self) -> None:
        self._handles.clear()
