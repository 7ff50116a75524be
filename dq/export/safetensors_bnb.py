"""Dynamic 4-bit safetensors: bitsandbytes NF4 per module, the modules 4-bit breaks kept in 16-bit.

The output is an ordinary Hugging Face directory (``config.json`` with a bitsandbytes
``quantization_config`` whose ``llm_int8_skip_modules`` lists every 16-bit linear, NF4 weights serialized
exactly as ``bnb.nn.Linear4bit`` saves them, tokenizer files) that
``AutoModelForCausalLM.from_pretrained(dir)`` loads, and QLoRA fine-tunes, with no dq installed. Beside
it, ``dq_plan.json`` records every module's decision and the measurement behind it.

The NF4 weights written are the ones that were measured: one bitsandbytes call per module.

Example:
    >>> r = quantize_safetensors_bnb("smollm2-dir", "out/smollm2-dyn-nf4")   # doctest: +SKIP
    >>> r.plan.summary()["kept_by_reason"]                                  # doctest: +SKIP
    {'output': 1, 'outlier': 4, 'super_weight': 1}
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

from dq.convert.convert import read_hf_config
from dq.errors import NotAModelError, OutputNotWritableError
from dq.export.bnb_measure import (
    BLOCKSIZE,
    NF4Weight,
    measure_nf4,
    quantize_nf4,
    require_bitsandbytes,
)
from dq.export.bnb_plan import (
    PLAN_FILE,
    BnbPlan,
    ModuleMeasurement,
    measurements_from_analysis,
    module_role,
    select_modules,
)

__all__ = ["SafetensorsQuant", "quantize_safetensors_bnb", "quantization_config", "nf4_nbytes", "DEFAULT_SHARD_BYTES"]

log = logging.getLogger(__name__)

DEFAULT_SHARD_BYTES = 5 * 10**9  # as transformers' save_pretrained ("5GB")
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".ckpt", ".h5", ".msgpack")
_SKIP_FILES = {"config.json", "model.safetensors.index.json", "pytorch_model.bin.index.json", PLAN_FILE}


@dataclass(frozen=True)
class SafetensorsQuant:
    """What :func:`quantize_safetensors_bnb` wrote."""

    path: Path
    plan: BnbPlan
    size_bytes: int  # all *.safetensors files
    n_params: int  # parameters of the model (tied weights counted once)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.size_bytes / self.n_params


def quantization_config(plan: BnbPlan) -> dict:
    """The ``quantization_config`` transformers writes for a bitsandbytes 4-bit model with this plan."""
    import torch
    from transformers import BitsAndBytesConfig

    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=plan.quant_type,
        bnb_4bit_use_double_quant=plan.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, plan.compute_dtype),
        bnb_4bit_quant_storage=torch.uint8,
        llm_int8_skip_modules=plan.skip_modules(),
    ).to_dict()


def _check_source(model_dir: Path) -> dict:
    config = read_hf_config(model_dir)
    if config.get("quantization_config"):
        method = config["quantization_config"].get("quant_method", "?")
        raise NotAModelError(
            f"{model_dir} is already quantized ({method}); pass the 16-bit model it was made from"
        )
    return config


def _prepare_out(out_dir: Path, overwrite: bool) -> None:
    parent = out_dir.parent
    if out_dir.exists() and not overwrite:
        raise OutputNotWritableError(f"{out_dir} already exists; remove it, choose another -o, or pass overwrite=True (--overwrite)")
    if out_dir.exists() and not out_dir.is_dir():
        raise OutputNotWritableError(f"{out_dir} is a file; the safetensors output is a directory, give a directory name")
    if not parent.is_dir():
        raise OutputNotWritableError(f"output directory {parent} does not exist; create it first (mkdir -p {parent})")
    if not os.access(parent, os.W_OK):
        raise OutputNotWritableError(f"{parent} is not writable; choose another output directory")


@contextlib.contextmanager
def _atomic_dir(out_dir: Path):
    """Yield a temporary sibling directory; on success it replaces ``out_dir``, on error it is removed."""
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".tmp", dir=out_dir.parent))
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; give the permissions mkdir would
        for f in tmp.iterdir():
            os.chmod(f, 0o666 & ~umask)
            with open(f, "rb+") as fh:
                os.fsync(fh.fileno())
        old = None
        if out_dir.exists():
            old = out_dir.with_name(f".{out_dir.name}.old-{os.getpid()}")
            os.replace(out_dir, old)
        os.replace(tmp, out_dir)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _model_dtype(config: dict):
    import torch

    name = config.get("dtype") or config.get("torch_dtype") or "bfloat16"
    # Keep 16-bit sources as they are; float32 sources are stored as bf16 (the 16-bit half of the checkpoint).
    return torch.float16 if name == "float16" else torch.bfloat16


def nf4_nbytes(n: int, *, double_quant: bool = True, blocksize: int = BLOCKSIZE) -> int:
    """Bytes bitsandbytes stores for an NF4 weight of ``n`` elements (codes, scales, maps, quant-state JSON)."""
    blocks = -(-n // blocksize)
    if double_quant:  # uint8 scales + fp32 scale-of-scales per 256 blocks, offset, 256-entry map
        scales = blocks + 4 * -(-blocks // 256) + 4 + 4 * 256
    else:
        scales = 4 * blocks
    return -(-n // 2) + scales + 4 * 16 + 200  # + NF4 code map + packed quant_state JSON (~200 B)


def _fraction_for_bytes(target: int, fixed: int, linear: dict[str, int], double_quant: bool) -> float:
    """``keep_fraction`` whose checkpoint is about ``target`` bytes: every kept parameter costs
    2 bytes instead of its NF4 share."""
    from dq.errors import BudgetError

    nf4 = sum(nf4_nbytes(n, double_quant=double_quant) for n in linear.values())
    floor = fixed + nf4
    if target < floor:
        raise BudgetError(
            f"target {target:,} bytes is below the size with every linear module in NF4 ({floor:,} bytes); "
            f"raise --target-size/--target-bpw to at least that"
        )
    total = sum(linear.values())
    per_param = 2.0 - nf4 / total
    return min(0.999, (target - floor) / (per_param * total))


def _write_shards(tensors: dict, tmp: Path, max_shard_bytes: int) -> int:
    from safetensors.torch import save_file

    names = sorted(tensors)  # canonical order
    shards: list[list[str]] = [[]]
    size = total = 0
    for n in names:
        nb = tensors[n].numel() * tensors[n].element_size()
        if shards[-1] and size + nb > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(n)
        size += nb
        total += nb
    if len(shards) == 1:
        save_file({n: tensors[n] for n in names}, tmp / "model.safetensors", metadata={"format": "pt"})
        return total
    weight_map = {}
    for i, shard in enumerate(shards, 1):
        fname = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, tmp / fname, metadata={"format": "pt"})
        weight_map.update({n: fname for n in shard})
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    return total


def _fused_experts(model) -> dict[str, int]:
    """Parameter name -> size of transformers-5 fused expert tensors (3-D), which are no ``nn.Linear``."""
    from dq.analysis.collect import expert_params

    out = {}
    for name, mod in model.named_modules():
        p = expert_params(mod)
        for k, v in (p or {}).items():
            out[f"{name}.{k}"] = v.numel()
    return out


def quantize_safetensors_bnb(
    model_dir: str | Path,
    out_dir: str | Path,
    *,
    keep: Iterable[str] | None = None,
    keep_fraction: float | None = None,
    analysis=None,
    calib_file: str | Path | None = None,
    n_tokens: int = 2048,
    seq_len: int = 512,
    double_quant: bool = True,
    cpu_safe: bool = True,
    overwrite: bool = False,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
    target_bytes: int | None = None,
    dry_run: bool = False,
    progress: Callable[[str, int, int], None] | None = None,
) -> SafetensorsQuant:
    """Write a dynamic NF4 checkpoint of ``model_dir`` to ``out_dir`` (atomically).

    Which modules stay 16-bit is decided, in order of precedence, by ``keep`` (exact module names),
    by ``analysis`` (a ``dq.analysis.Analysis`` of the same model: its 4-bit ``act_err`` and super
    weights), or by dq's own NF4 hook pass over calibration windows from :mod:`dq.calibration` (the
    packaged sets, or ``calib_file``); see :func:`dq.export.bnb_plan.select_modules` for the policy and ``keep_fraction``.

    Args:
        model_dir: a Hugging Face model directory in 16 or 32 bits.
        out_dir: the directory to create (must not exist unless ``overwrite``).
        n_tokens, seq_len: calibration tokens for the hook pass.
        double_quant: quantize the NF4 block scales too (``bnb_4bit_use_double_quant``, as QLoRA).
        cpu_safe: keep modules whose out_features is not a multiple of 32 in 16-bit, because
            bitsandbytes' AVX512-BF16 CPU kernel cannot run them.
        target_bytes: a size budget for the checkpoint instead of ``keep_fraction``: the 16-bit set
            grows, worst NF4 error first, until the files would exceed it (within ~0.1%).
        dry_run: measure and plan, write nothing; ``size_bytes`` is then the tensor payload (the
            files add only their JSON headers).

    Returns:
        A :class:`SafetensorsQuant` with the plan, the bytes written and bits per weight.

    Raises:
        ModelNotFoundError, NotAModelError: ``model_dir`` is not a 16-bit HF model directory.
        OutputNotWritableError: ``out_dir`` exists or its parent cannot be written.
        PlanError, BudgetError: bad ``keep`` names, analysis of another model, impossible ``keep_fraction``.
        BitsAndBytesMissingError: bitsandbytes is not installed.

    Example:
        >>> quantize_safetensors_bnb(path, "out/m-nf4", keep_fraction=0.1).bits_per_weight  # doctest: +SKIP
        5.2
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, out_dir = Path(model_dir).expanduser(), Path(out_dir).expanduser()
    config = _check_source(model_dir)
    if not dry_run:
        _prepare_out(out_dir, overwrite)
    require_bitsandbytes()

    dtype = _model_dtype(config)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    shapes = {n: (m.out_features, m.in_features) for n, m in linears.items()}
    model_name = str(model_dir)
    fused = _fused_experts(model)
    if fused:
        share = sum(fused.values()) / sum(p.numel() for p in model.parameters())
        log.warning("%d fused expert parameter(s) (e.g. %s) hold %.1f%% of the weights: bitsandbytes NF4 quantizes "
                    "nn.Linear modules only, so they stay 16-bit (counted in the size and in dq_plan.json)",
                    len(fused), next(iter(fused)), 100 * share)

    def _quantize(names: list[str]) -> dict[str, NF4Weight]:
        out = {}
        for i, n in enumerate(names):
            out[n] = quantize_nf4(linears[n].weight, double_quant=double_quant)
            if progress:
                progress("quantize", i + 1, len(names))
        return out

    if target_bytes is not None:
        from dq.errors import BudgetError

        if keep is not None or keep_fraction is not None:
            raise BudgetError("give one budget: keep, keep_fraction or target_bytes (--keep, --keep-fraction or --target-size/--target-bpw)")
        linear = {n: shapes[n][0] * shapes[n][1] for n in shapes if module_role(n) != "output"}
        tied_keys = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.get("tie_word_embeddings") else set()
        fixed = sum(v.numel() * v.element_size() for k, v in model.state_dict().items()
                    if k not in tied_keys and k.rsplit(".", 1)[0] not in linear)
        keep_fraction = _fraction_for_bytes(target_bytes, fixed, linear, double_quant)
        log.info("target %s bytes -> keep up to %.2f%% of linear weights in 16-bit", f"{target_bytes:,}", 100 * keep_fraction)

    def _plain(n: str) -> ModuleMeasurement:
        return ModuleMeasurement(n, shapes[n], max_abs_weight=float(linears[n].weight.detach().abs().max()))

    n_tokens_used = 0
    if keep is not None:
        measurements = [_plain(n) for n in shapes]
        plan = select_modules(measurements, model=model_name, keep=keep, cpu_safe=cpu_safe, double_quant=double_quant)
        quantized = _quantize([m.name for m in plan.quantized])
    elif analysis is not None:
        measurements, sw = measurements_from_analysis(analysis, shapes)
        plan = select_modules(measurements, model=model_name, source="analysis", keep_fraction=keep_fraction,
                              super_weights=sw, cpu_safe=cpu_safe, n_tokens=analysis.n_tokens,
                              double_quant=double_quant)
        quantized = _quantize([m.name for m in plan.quantized])
    else:
        from dq.calibration import sample_calibration

        candidates = [n for n in shapes if module_role(n) not in {"output", "vision", "projector", "router"}]
        quantized = _quantize(candidates)
        tokenizer = AutoTokenizer.from_pretrained(model_dir)
        batches = sample_calibration(tokenizer, max(1, n_tokens // seq_len), seq_len, calib_file=calib_file).ids
        n_tokens_used = batches.numel()
        log.info("measuring NF4 activation error of %d modules on %d calibration tokens", len(quantized), n_tokens_used)
        stats = measure_nf4(model, batches, quantized,
                            progress=(lambda i, n: progress("measure", i, n)) if progress else None)
        measurements = [
            ModuleMeasurement(n, shapes[n], max_abs_weight=float(linears[n].weight.detach().abs().max()), **stats[n])
            if n in stats else _plain(n)
            for n in shapes
        ]
        plan = select_modules(measurements, model=model_name, keep_fraction=keep_fraction, cpu_safe=cpu_safe,
                              n_tokens=n_tokens_used, double_quant=double_quant)
        quantized = {m.name: quantized[m.name] for m in plan.quantized}

    if fused:
        plan = replace(plan, fused_experts=tuple(sorted(fused)))
    # State dict: NF4 modules as Linear4bit serializes them, everything else as is; tied copies dropped.
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if config.get("tie_word_embeddings") else set()
    tensors = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if key in tied:
            continue
        if module in quantized and key == f"{module}.weight":
            tensors.update(quantized[module].serialized(key))
        else:
            tensors[key] = value.detach().contiguous()
    missing = sorted(set(quantized) - {k.rsplit(".", 1)[0] for k in tensors if k.endswith(".weight")})
    if missing:
        raise RuntimeError(f"quantized modules absent from the model's state dict: {missing[:3]} (a bug in dq)")

    n_params = sum(p.numel() for p in model.parameters())  # parameters() yields tied weights once
    if dry_run:
        payload = sum(t.numel() * t.element_size() for t in tensors.values())
        return SafetensorsQuant(path=out_dir, plan=plan, size_bytes=payload, n_params=n_params)
    with _atomic_dir(out_dir) as tmp:
        _write_shards(tensors, tmp, max_shard_bytes)
        new_config = {**config, "quantization_config": quantization_config(plan)}
        (tmp / "config.json").write_text(json.dumps(new_config, indent=2, sort_keys=True) + "\n")
        for f in sorted(model_dir.iterdir()):
            if f.is_file() and f.name not in _SKIP_FILES and not f.name.endswith(_WEIGHT_SUFFIXES):
                shutil.copy2(f, tmp / f.name)
        plan.save(tmp / PLAN_FILE)
    size = sum(f.stat().st_size for f in out_dir.glob("*.safetensors"))
    s = plan.summary()
    log.info("wrote %s: %d NF4 + %d 16-bit linear modules (%.1f%% of linear weights kept), %s bytes, %.3f bits/weight",
             out_dir, s["n_quantized"], s["n_kept"], 100 * s["kept_param_fraction"], f"{size:,}", 8.0 * size / n_params)
    return SafetensorsQuant(path=out_dir, plan=plan, size_bytes=size, n_params=n_params)

