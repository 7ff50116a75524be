"""A model's GGUF tensor list from its config alone, by llama.cpp's own converter, without the weights.

For a size-only plan of a checkpoint nobody here can download (DeepSeek-R1's 671B parameters, 1.3 TB in
BF16), dq writes a *sparse* safetensors file with the checkpoint's tensor names and shapes (a header, then
a hole: no disk blocks), and runs ``convert_hf_to_gguf.py --dry-run`` on it. The converter builds its
tensors lazily, so it maps names, merges experts and splits MLA's ``kv_b_proj`` exactly as it would for
the real checkpoint, logs every GGUF tensor's name, type and shape, and exits before reading data.

Checkpoint names come from transformers' model built on the meta device, with transformers-5 fused experts
written back as the per-expert tensors checkpoints ship (``mlp.experts.{e}.{gate,up,down}_proj.weight``,
the layout of DeepSeek-V2/V3 and Qwen-MoE checkpoints). The list is cached by the config's content.

Example:
    >>> tensors = tensors_from_config("deepseek-r1/config.json", tokenizer_dir)   # doctest: +SKIP
    >>> sum(math.prod(t.shape) for t in tensors) / 1e9                            # doctest: +SKIP
    671.0
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from dq.cache import cache_dir
from dq.errors import UnsupportedArchitectureError
from dq.quant.assign import SourceTensor
from dq.quant.formats import parse_format

__all__ = ["checkpoint_shapes", "tensors_from_config"]

# "INFO:hf-to-gguf:blk.3.attn_k_b.weight,   torch.bfloat16 --> BF16, shape = {128, 512, 128}"
_LINE = re.compile(r"hf-to-gguf:(?P<name>[^\s,]+),\s+\S+\s+-->\s+(?P<type>\w+),\s+shape\s+=\s+\{(?P<shape>[^}]*)\}")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "special_tokens_map.json")


def checkpoint_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names and shapes of a model with ``config`` (built on the meta device)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(**config)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    out: dict[str, tuple[int, ...]] = {}
    for k, v in model.state_dict().items():
        shape = tuple(int(d) for d in v.shape)
        if k.endswith("experts.gate_up_proj") and len(shape) == 3:
            n_exp, two_i, hidden = shape
            pre = k[: -len("gate_up_proj")]
            for e in range(n_exp):
                out[f"{pre}{e}.gate_proj.weight"] = (two_i // 2, hidden)
                out[f"{pre}{e}.up_proj.weight"] = (two_i // 2, hidden)
        elif k.endswith("experts.down_proj") and len(shape) == 3:
            n_exp, hidden, inter = shape
            pre = k[: -len("down_proj")]
            for e in range(n_exp):
                out[f"{pre}{e}.down_proj.weight"] = (hidden, inter)
        else:
            out[k] = shape
    return out


def _sparse_checkpoint(shapes: dict[str, tuple[int, ...]], path: Path) -> None:
    header, off = {}, 0
    for k, shape in shapes.items():
        n = math.prod(shape) * 2
        header[k] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [off, off + n]}
        off += n
    raw = json.dumps(header).encode()
    raw += b" " * ((8 - len(raw) % 8) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        fh.truncate(8 + len(raw) + off)  # a hole: the data is never read


def tensors_from_config(config: str | Path | dict, tokenizer_dir: str | Path, *,
                        cache: Path | None = None) -> list[SourceTensor]:
    """The GGUF tensors (names, numpy shapes, converter types) llama.cpp's converter makes for ``config``.

    Args:
        config: a ``config.json`` path or its dict.
        tokenizer_dir: a directory with a tokenizer the converter accepts for this architecture (only the
            vocabulary size matters for shapes, and ``config``'s ``vocab_size`` decides those).

    Raises:
        UnsupportedArchitectureError: the converter refused the config (its log tail is in the message).
    """
    from dq.convert.llama_cpp import converter_dir

    cfg = json.loads(Path(config).read_text()) if not isinstance(config, dict) else dict(config)
    key = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode()).hexdigest()[:16]
    cached = (cache or cache_dir()) / "shapes" / f"{key}.json"
    if cached.is_file():
        return [SourceTensor(n, tuple(s), parse_format(t)) for n, s, t in json.loads(cached.read_text())]
    conv = converter_dir()
    with tempfile.TemporaryDirectory(prefix="dq-shapes-") as tmp:
        d = Path(tmp)
        (d / "config.json").write_text(json.dumps(cfg))
        for f in _TOKENIZER_FILES:
            if (Path(tokenizer_dir) / f).exists():
                shutil.copy(Path(tokenizer_dir) / f, d / f)
        _sparse_checkpoint(checkpoint_shapes(cfg), d / "model.safetensors")
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(conv / "gguf-py"), str(conv)])
        proc = subprocess.run([sys.executable, str(conv / "convert_hf_to_gguf.py"), str(d), "--outtype", "bf16",
                               "--outfile", str(d / "out.gguf"), "--dry-run"], capture_output=True, text=True, env=env)
    log = proc.stdout + proc.stderr
    found = [(m.group("name"), tuple(int(x) for x in reversed(m.group("shape").split(","))), m.group("type"))
             for m in _LINE.finditer(log)]
    if proc.returncode != 0 or not found:
        raise UnsupportedArchitectureError(
            f"llama.cpp's converter could not map this config ({cfg.get('architectures')}): "
            + "\n".join(log.strip().splitlines()[-6:]))
    cached.parent.mkdir(parents=True, exist_ok=True)
    cached.write_text(json.dumps([[n, list(s), t] for n, s, t in found]))
    return [SourceTensor(n, s, parse_format(t)) for n, s, t in found]
