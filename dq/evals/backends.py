"""Next-token logits from a GGUF (``llama_cpp.Llama``) or a Hugging Face directory (transformers), one
interface for both, so the KLD pass treats base and quant the same way.

Both backends take token ids, never text: ``dq eval`` tokenizes once with the base model and checks the
quant's tokenizer gives the same ids (:func:`dq.evals.kld.check_tokenizers`).

Example:
    >>> with open_logits_model("m-Q4_K_M.gguf", n_ctx=512) as m:   # doctest: +SKIP
    ...     logits = m.logits(m.tokenize("Hello world"))          # [n_tokens, n_vocab] float32
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

import numpy as np

from dq.cache import files_key
from dq.errors import CorruptFileError, DataPackageMissingError, ModelNotFoundError, NotAModelError

__all__ = [
    "ModelKind",
    "ModelRef",
    "resolve_model_ref",
    "LogitsModel",
    "GGUFLogits",
    "HFLogits",
    "open_logits_model",
    "default_threads",
]

log = logging.getLogger(__name__)


class ModelKind(str, Enum):
    GGUF = "gguf"
    HF = "hf"


def default_threads() -> int:
    """Threads for llama.cpp and torch: ``DQ_THREADS`` or the CPUs this process may use."""
    env = os.environ.get("DQ_THREADS")
    if env:
        return max(1, int(env))
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # pragma: no cover - not Linux
        return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class ModelRef:
    """A model on disk: its path, kind and a fingerprint (path + size + mtime of its files) for cache keys."""

    path: Path
    kind: ModelKind
    fingerprint: str

    def to_dict(self) -> dict:
        return {"path": str(self.path), "kind": self.kind.value, "fingerprint": self.fingerprint}


def resolve_model_ref(model: str | Path) -> ModelRef:
    """Classify a CLI model argument: a ``.gguf`` file, a HF directory, or a packaged model name.

    Raises:
        ModelNotFoundError: the path does not exist.
        NotAModelError: it exists but is neither a GGUF file nor a directory with ``config.json``.
    """
    from dq.models import resolve_model

    path = resolve_model(str(model)) if not Path(model).exists() else Path(model).expanduser()
    if not path.exists():  # pragma: no cover - resolve_model raises first
        raise ModelNotFoundError(f"model path {str(path)!r} does not exist")
    if path.is_file():
        with open(path, "rb") as fh:
            magic = fh.read(4)
        if magic != b"GGUF":
            raise NotAModelError(
                f"{path} is not a GGUF file (magic {magic!r}); pass a .gguf file or a Hugging Face model directory"
            )
        return ModelRef(path, ModelKind.GGUF, files_key(path))
    if not (path / "config.json").is_file():
        raise NotAModelError(
            f"{path} is a directory without config.json; pass a Hugging Face model directory "
            f"(config.json + *.safetensors + tokenizer) or a .gguf file"
        )
    return ModelRef(path, ModelKind.HF, files_key(path))


class LogitsModel:
    """Common interface: ``tokenize``, ``logits``, ``n_vocab``, ``add_bos``/``bos_id``; a context manager."""

    ref: ModelRef
    n_vocab: int
    add_bos: bool
    bos_id: int | None

    def tokenize(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens (no BOS)."""
        raise NotImplementedError

    def logits(self, tokens: Sequence[int], keep_last: int | None = None) -> np.ndarray:
        """Logits ``[n, n_vocab]`` float32 after each of ``tokens`` (a fresh sequence, no cache);
        only the last ``keep_last`` rows when given."""
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class GGUFLogits(LogitsModel):
    """A GGUF through ``llama_cpp.Llama(logits_all=True)`` (CPU)."""

    def __init__(self, ref: ModelRef, *, n_ctx: int, n_threads: int | None = None, n_batch: int = 512,
                 tokenizer_only: bool = False):
        import llama_cpp

        from dq.convert.source import check_gguf

        check_gguf(ref.path)
        self.ref = ref
        try:
            self.llm = llama_cpp.Llama(
                str(ref.path), n_ctx=n_ctx, n_batch=min(n_batch, n_ctx), n_ubatch=min(n_batch, n_ctx),
                logits_all=True, verbose=False, n_threads=n_threads or default_threads(),
                n_threads_batch=n_threads or default_threads(), vocab_only=tokenizer_only,
            )
        except ValueError as exc:
            raise CorruptFileError(f"llama.cpp cannot load {ref.path} ({exc}); is it a complete model GGUF?") from exc
        self.n_ctx = n_ctx
        self.n_vocab = int(self.llm.n_vocab())
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        bos = int(self.llm.token_bos())
        self.bos_id = bos if bos >= 0 else None
        self.eos_id = int(self.llm.token_eos())

    def tokenize(self, text: str) -> list[int]:
        return list(self.llm.tokenize(text.encode("utf-8"), add_bos=False, special=False))

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", "replace")

    def logits(self, tokens: Sequence[int], keep_last: int | None = None) -> np.ndarray:
        if len(tokens) > self.n_ctx:
            raise ValueError(f"{len(tokens)} tokens do not fit the context of {self.n_ctx}")
        self.llm.reset()
        self.llm.eval(list(tokens))
        n = len(tokens)
        start = n - (keep_last if keep_last is not None else n)
        return np.array(self.llm.scores[start:n], dtype=np.float32)

    def close(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is not None:
            llm.close()
            self.llm = None


class TorchLogits(LogitsModel):
    """A transformers model and tokenizer on ``device``: what :class:`HFLogits` and the torch GGUF backend
    (:class:`~dq.evals.gguf_torch.GGUFTorchLogits`) share once their model is built."""

    tok: object
    model: object | None
    device: str

    def _set_tokenizer(self, tok) -> None:
        self.tok = tok
        probe = tok("a").input_ids
        self.bos_id = tok.bos_token_id
        self.add_bos = bool(self.bos_id is not None and probe and probe[0] == self.bos_id)
        self.eos_id = tok.eos_token_id

    def tokenize(self, text: str) -> list[int]:
        return list(self.tok(text, add_special_tokens=False).input_ids)

    def detokenize(self, tokens: Sequence[int]) -> str:
        return self.tok.decode(list(tokens))

    def logits(self, tokens: Sequence[int], keep_last: int | None = None) -> np.ndarray:
        if self.model is None:
            raise RuntimeError("opened with tokenizer_only=True")
        import torch

        with torch.inference_mode():
            ids = torch.tensor([list(tokens)], dtype=torch.long, device=self.device)
            kw = {"logits_to_keep": keep_last} if keep_last is not None else {}
            out = self.model(input_ids=ids, use_cache=False, **kw).logits[0]
            if keep_last is not None:
                out = out[-keep_last:]
            return out.float().cpu().numpy()

    def close(self) -> None:
        self.model = None
        if self.device.startswith("cuda"):
            import torch

            torch.cuda.empty_cache()


class HFLogits(TorchLogits):
    """A Hugging Face directory through transformers (float32 compute by default), on ``device``."""

    def __init__(self, ref: ModelRef, *, dtype: str = "float32", n_threads: int | None = None,
                 tokenizer_only: bool = False, device: str = "cpu"):
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        if dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"hf dtype {dtype!r} is not one of float32, bfloat16, float16")
        torch.set_num_threads(n_threads or default_threads())
        self.ref, self.device = ref, device
        self._set_tokenizer(AutoTokenizer.from_pretrained(ref.path))
        if tokenizer_only:
            self.model = None
            config = AutoConfig.from_pretrained(ref.path)
            config = getattr(config, "get_text_config", lambda: config)()
            self.n_vocab = int(config.vocab_size)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(ref.path, dtype=getattr(torch, dtype)).to(device).eval()
            self.n_vocab = int(self.model.get_output_embeddings().weight.shape[0])


def open_logits_model(
    model: str | Path | ModelRef,
    *,
    n_ctx: int = 512,
    n_threads: int | None = None,
    hf_dtype: str = "float32",
    tokenizer_only: bool = False,
    device: str = "cpu",
    gguf_backend: str = "auto",
    hf_dir: str | Path | None = None,
) -> LogitsModel:
    """Open a GGUF or HF model for logits.

    Args:
        model: path, packaged model name, or a :class:`ModelRef`.
        n_ctx: the longest sequence :meth:`LogitsModel.logits` will be given (GGUF context size).
        n_threads: CPU threads (default :func:`default_threads`).
        hf_dtype: compute dtype for HF models.
        tokenizer_only: load only the tokenizer and vocabulary size (``logits`` is unavailable): cheap,
            for tokenizing and checking tokenizers before a cached pass.
        device: ``cpu`` or ``cuda``: where HF models (and GGUFs on the torch backend) run.
        gguf_backend: ``auto`` (llama.cpp on CPU, else torch), ``llama.cpp`` or ``torch``
            (:class:`~dq.evals.gguf_torch.GGUFTorchLogits`: dq's kernels dequantize the file into transformers).
        hf_dir: the HF directory a GGUF came from, which the torch backend needs.

    Returns:
        A :class:`GGUFLogits` or :class:`HFLogits`; close it (or use ``with``) to free memory.
    """
    ref = model if isinstance(model, ModelRef) else resolve_model_ref(model)
    torch_gguf = gguf_backend == "torch" or (gguf_backend == "auto" and device != "cpu")
    if ref.kind is ModelKind.GGUF and torch_gguf:
        if hf_dir is None:
            from dq.evals.errors import EvalConfigError

            raise EvalConfigError(
                f"evaluating {ref.path.name} on {device} builds it in its base's transformers model: pass the "
                f"Hugging Face directory it came from as --base (or use --device cpu for llama.cpp)")
        from dq.evals.gguf_torch import GGUFTorchLogits

        return GGUFTorchLogits(ref, hf_dir, device=device, n_threads=n_threads, tokenizer_only=tokenizer_only)
    if ref.kind is ModelKind.GGUF:
        try:
            import llama_cpp  # noqa: F401
        except ImportError as exc:  # pragma: no cover - a core dependency
            raise DataPackageMissingError("GGUF evaluation needs `pip install llama-cpp-python==0.3.36`") from exc
        return GGUFLogits(ref, n_ctx=n_ctx, n_threads=n_threads, tokenizer_only=tokenizer_only)
    return HFLogits(ref, dtype=hf_dtype, n_threads=n_threads, tokenizer_only=tokenizer_only, device=device)
