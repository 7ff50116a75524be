"""A GGUF evaluated by transformers: every tensor dequantized by dq's kernels, on the GPU when there is one.

``dq eval QUANT.gguf --base HF_DIR --device cuda`` runs here. The model is the base's transformers class,
built on the meta device (:class:`~dq.analysis.loader.ModelSkeleton`); each parameter is read from the GGUF
(gguf-py's memory-mapped reader, one tensor at a time), dequantized on ``device`` by
:func:`dq.kernels.api.dequantize` (a Triton kernel for every GGML type on CUDA, the torch reference on the CPU),
and put back into the layout the converter changed, in float32. The GGUF's name for each parameter is dq's
own (:class:`~dq.analysis.names.NameMapper`, checked against the file: a parameter with no tensor, or a
tensor of another size, is an error before anything is computed).

What the converter changes and this module undoes (``convert_hf_to_gguf.py``, the pinned sdist):

- ``LlamaModel.permute`` of ``q_proj``/``k_proj`` rows for llama-family classes (``undo_permute``);
- ``+ 1`` on Gemma's RMSNorm weights (``Gemma3Model.norm_shift``, Gemma2's ``modify_tensors``).

Dense text models of these families are supported (llama, mistral, qwen2, qwen3, gemma2, gemma3: what a
GPU evaluation of a published quant needs); MoE and vision GGUFs stay on llama.cpp (the CPU path), and are
refused here with that advice. Agreement with llama.cpp is a test (``tests/evals/test_gguf_torch.py``) and,
on the GPU, ``bench/eval_gpu.py``.

Example:
    >>> with GGUFTorchLogits(resolve_model_ref("m-Q2_K.gguf"), "smollm2-dir", device="cuda") as m:  # doctest: +SKIP
    ...     z = m.logits(m.tokenize("Hello world"))
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from dq.errors import UnsupportedArchitectureError
from dq.evals.backends import ModelRef, TorchLogits, default_threads

__all__ = ["GGUFTorchLogits", "load_gguf_weights", "TORCH_EVAL_FAMILIES"]

log = logging.getLogger(__name__)

# model_type -> (q/k rows permuted by the converter, norm weights shifted by +1)
TORCH_EVAL_FAMILIES: dict[str, tuple[bool, bool]] = {
    "llama": (True, False), "mistral": (True, False), "qwen2": (False, False), "qwen3": (False, False),
    "gemma2": (False, True), "gemma3_text": (False, True), "gemma3": (False, True),
}


def _unpermute(w, n_head: int):
    """Inverse of ``LlamaModel.permute`` (rows ``[n_head, 2, half]`` -> ``[n_head, half, 2]`` in the file)."""
    shape = w.shape
    return w.reshape(n_head, shape[0] // n_head // 2, 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def load_gguf_weights(sk, gguf_path: Path, device: str) -> int:
    """Set every parameter of ``sk``'s text model and head from ``gguf_path``, dequantized on ``device``.

    Returns the number of GGUF tensors read.

    Raises:
        UnsupportedArchitectureError: the model family is not one this path undoes the converter for.
        CorruptFileError: a parameter has no GGUF tensor, or one of another size.
    """
    import gguf
    import torch

    from dq.analysis.names import NameMapper
    from dq.errors import CorruptFileError
    from dq.kernels.api import dequantize
    from dq.quant.formats import parse_format

    cfg = sk.text_config
    family = TORCH_EVAL_FAMILIES.get(cfg.model_type)
    if family is None or sk.vision_params() or getattr(cfg, "num_experts", None) or getattr(
            cfg, "num_local_experts", None):
        raise UnsupportedArchitectureError(
            f"`dq eval --device cuda` reads dense text GGUFs of {', '.join(sorted(TORCH_EVAL_FAMILIES))} into "
            f"transformers; {cfg.model_type!r} (MoE or vision included) is evaluated by llama.cpp: drop --device")
    permuted, shifted = family
    head = sk.output_head_path()
    mapper = NameMapper(cfg.model_type, sk.n_layers, sk.text_model_path, head)
    by_name = {t.name: t for t in gguf.GGUFReader(str(gguf_path)).tensors}
    n_head, n_kv = int(cfg.num_attention_heads), int(getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads)
    names = [n for n, _ in sk.model.named_parameters() if mapper.canonical(n.rpartition(".")[0]) is not None]
    tied_head = None
    read = 0
    for name in names:
        gname = mapper.gguf_name(name)
        t = by_name.get(gname)
        if t is None and head is not None and name == f"{head}.weight" and "output.weight" not in by_name:
            tied_head = name  # llama.cpp ties the head to token_embd when the file has no output.weight
            continue
        want = tuple(int(d) for d in sk.module_param(name).shape)
        if t is None:
            raise CorruptFileError(f"{gguf_path} has no tensor {gname} for {name}; was it converted from this model?")
        shape = tuple(int(d) for d in reversed(t.shape.tolist()))  # gguf-py lists ggml's order (fastest first)
        if int(np.prod(shape)) != int(np.prod(want)):
            raise CorruptFileError(f"{gguf_path}: {gname} has shape {shape}, {name} needs {want}")
        fmt = parse_format(t.tensor_type.name)
        raw = torch.from_numpy(np.array(t.data, copy=True).view(np.uint8).reshape(-1)).to(device)
        w = dequantize(raw, fmt, shape).reshape(want)
        del raw
        if permuted and name.endswith(("q_proj.weight", "q_proj.bias")):
            w = _unpermute(w, n_head)
        elif permuted and name.endswith(("k_proj.weight", "k_proj.bias")):
            w = _unpermute(w, n_kv)
        if shifted and name.endswith("norm.weight"):
            w = w - 1
        sk._set_param(name, w.float())
        read += 1
    if tied_head is not None:
        emb = sk.model.get_input_embeddings().weight
        sk._set_param(tied_head, emb.detach())
    still = [n for n in names if sk.module_param(n).is_meta]
    if still:
        raise CorruptFileError(f"{gguf_path} left {len(still)} parameter(s) unset, e.g. {still[:3]}")
    return read


class GGUFTorchLogits(TorchLogits):
    """A GGUF's weights in the base's transformers model, computed by torch on ``device``.

    Args:
        ref: the GGUF.
        hf_dir: the Hugging Face directory it was converted from (config, tokenizer, model class).
        device: ``cuda`` (or ``cpu``, the same code path, for tests).
        n_threads: torch CPU threads.
        tokenizer_only: load only the tokenizer (``logits`` unavailable).
    """

    def __init__(self, ref: ModelRef, hf_dir: str | Path, *, device: str = "cuda", n_threads: int | None = None,
                 tokenizer_only: bool = False):
        import torch
        from transformers import AutoTokenizer

        from dq.analysis.loader import ModelSkeleton
        from dq.convert.source import check_gguf

        check_gguf(ref.path)
        torch.set_num_threads(n_threads or default_threads())
        self.ref, self.device = ref, device
        self._set_tokenizer(AutoTokenizer.from_pretrained(hf_dir))
        sk = ModelSkeleton.open(hf_dir, device=device)
        self.n_vocab = int(sk.text_config.vocab_size)
        self.model = None
        if not tokenizer_only:
            n = load_gguf_weights(sk, ref.path, device)
            self.model = sk.model.to(device).eval()
            log.info("%s: %d tensors dequantized on %s into %s", ref.path.name, n, device, type(self.model).__name__)
