"""An in-process lm-eval backend over ``llama_cpp.Llama`` (loglikelihood and rolling loglikelihood).

lm-eval's own ``gguf`` backend talks to a server (~1 s a request) and cannot do perplexity. This one
subclasses lm-eval's ``TemplateLM``, so context/continuation are split into tokens exactly as the HF
backend splits them (``TemplateLM._encode_pair``: trailing spaces move to the continuation; the pair is
encoded whole and cut at the context's length); only the tokenizer differs, and ``dq eval`` checks the
two agree. Scoring is one causal pass over ``(context + continuation)[-(max_length+1):][:-1]``, the
HF backend's window.

Requests are sorted by their token sequence, so requests that share a prefix (the 4 answers of one
MMLU question, the few-shot preamble of one subject) reuse llama.cpp's KV cache: only the tokens after
the common prefix are evaluated.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from dq.evals.backends import default_threads

__all__ = ["LlamaCppLM"]

log = logging.getLogger(__name__)


def _template_lm():
    from lm_eval.api.model import TemplateLM

    return TemplateLM


class _LlamaCppLMBase:
    """Implementation; :class:`LlamaCppLM` mixes it with lm-eval's ``TemplateLM`` on first use so that
    importing this module does not import lm-eval."""

    def __init__(self, path: str | Path, *, max_length: int = 2048, n_threads: int | None = None,
                 n_batch: int = 512) -> None:
        import llama_cpp

        from dq.convert.source import check_gguf

        super().__init__()
        check_gguf(Path(path))
        threads = n_threads or default_threads()
        self.path = Path(path)
        self.llm = llama_cpp.Llama(str(path), n_ctx=max_length, n_batch=n_batch, n_ubatch=n_batch,
                                   logits_all=True, verbose=False, n_threads=threads, n_threads_batch=threads)
        self._max_length = max_length
        vocab = llama_cpp.llama_model_get_vocab(self.llm.model)
        self.add_bos = bool(llama_cpp.llama_vocab_get_add_bos(vocab))
        self._bos = int(self.llm.token_bos())
        self._eos = int(self.llm.token_eos())

    # --- lm-eval interface -------------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self._eos

    @property
    def prefix_token_id(self) -> int:
        return self._bos if self._bos >= 0 else self._eos

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return f"llama.cpp:{self.path.name}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        add = self.add_bos if add_special_tokens is None else add_special_tokens
        return list(self.llm.tokenize(string.encode("utf-8"), add_bos=add, special=False))

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.llm.detokenize(list(tokens)).decode("utf-8", "replace")

    def _logprobs_after(self, seq: list[int], start: int) -> np.ndarray:
        """Log-softmax of the logits at positions ``start..len(seq)-1``, reusing the KV cache for the
        prefix this sequence shares with the previous one."""
        llm = self.llm
        n_old = llm.n_tokens
        old = llm.input_ids[:n_old]
        common = 0
        limit = min(n_old, len(seq))
        while common < limit and old[common] == seq[common]:
            common += 1
        # logits at positions >= start must exist: positions < common are cached (logits_all keeps scores)
        if common >= len(seq):
            common = len(seq) - 1  # re-evaluate the last token to be safe about stale rows
        llm.n_tokens = common
        llm.eval(seq[common:])
        logits = np.asarray(llm.scores[start:len(seq)], dtype=np.float64)
        m = logits.max(-1, keepdims=True)
        return logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        out: list[tuple[float, bool] | None] = [None] * len(requests)
        windows = []
        for i, (_, context_enc, continuation_enc) in enumerate(requests):
            whole = (list(context_enc) + list(continuation_enc))[-(self._max_length + 1):]
            inp = whole[:-1]
            n_cont = len(continuation_enc)
            windows.append((inp, n_cont, whole[-n_cont:], i))
        order = sorted(range(len(windows)), key=lambda j: windows[j][0])
        from tqdm import tqdm

        for j in tqdm(order, desc="llama.cpp loglikelihood", disable=disable_tqdm or None):
            inp, n_cont, cont, i = windows[j]
            lp = self._logprobs_after(inp, len(inp) - n_cont)
            picked = lp[np.arange(n_cont), cont]
            greedy = bool((lp.argmax(-1) == np.asarray(cont)).all())
            out[i] = (float(picked.sum()), greedy)
        return out  # type: ignore[return-value]

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        from lm_eval import utils

        results = []
        for (string,) in [req.args for req in requests]:
            windows = list(map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self._max_length, context_len=1)))
            reqs = [(None, ctx, cont) for ctx, cont in windows]
            results.append(sum(ll for ll, _ in self._loglikelihood_tokens(reqs, disable_tqdm=True)))
        return results

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        raise NotImplementedError("dq's llama.cpp backend scores log-likelihoods only; generative tasks are not supported")

    def close(self) -> None:
        if getattr(self, "llm", None) is not None:
            self.llm.close()
            self.llm = None


_CLASS = None


def LlamaCppLM(path: str | Path, **kwargs):  # noqa: N802 - a class factory that reads like a class
    """Create the lm-eval backend for a GGUF.

    Args:
        path: the GGUF file.
        max_length: context window (default 2048; longer inputs are left-truncated as in the HF backend).
        n_threads: CPU threads.

    Returns:
        An ``lm_eval.api.model.TemplateLM`` instance.
    """
    global _CLASS
    if _CLASS is None:
        _CLASS = type("LlamaCppLM", (_LlamaCppLMBase, _template_lm()), {})
    return _CLASS(path, **kwargs)
