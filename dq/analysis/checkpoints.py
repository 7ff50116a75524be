"""What ``dq analyze`` keeps under ``OUT/blocks/`` so an interrupted run resumes where it stopped.

Every file is written to a temporary name and renamed (:func:`dq.atomic.atomic_path`), so a file
that exists is complete. The sweeps leave:

- forward sweep, per block ``i``: ``fwd_i.npz`` (imatrix sums and counts, max |hidden|) and ``fwd_i.json``
  (down-projection spikes); ``input_i.pt``, the block's input for the probe sequences (the backward sweep
  deletes it once block ``i`` is done); ``hidden.pt``, every sequence's hidden state after the last
  finished block;
- head: ``head.npz``/``head.json`` (the LM head's imatrix and measurement);
- backward sweep, per block ``i``: ``layer_i.json`` (the block's measurements) and ``grad.pt``, the
  gradient arriving at the output of the next block to do.

Under torch.distributed (:mod:`dq.analysis.ranks`) rank 0 alone writes the joined statistics and
measurements; the tensors of a rank's own sequences (``input_i``, ``hidden``, ``grad``) are that rank's files
(``.rankR`` in the name). ``hidden`` and ``grad`` are *steps*: each save keeps the one before it, so ranks
that died one block apart resume at the newest step all of them hold (:meth:`Checkpoints.steps`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from dq.analysis.artifact import TensorMeasurement
from dq.analysis.superweights import Spike
from dq.atomic import atomic_path
from dq.quant.imatrix import ImatrixEntry

__all__ = ["Found", "Checkpoints", "BLOCKS"]

BLOCKS = "blocks"


@dataclass
class Found:
    """What one stage found: tensor measurements, imatrix entries, down-projection spikes."""

    tensors: list[TensorMeasurement] = field(default_factory=list)
    imatrix: dict[str, ImatrixEntry] = field(default_factory=dict)
    spikes: list[Spike] = field(default_factory=list)

    def merge(self, other: Found) -> None:
        self.tensors.extend(other.tensors)
        self.imatrix.update(other.imatrix)
        self.spikes.extend(other.spikes)


class Checkpoints:
    """Save and load the per-block files of one analysis directory."""

    def __init__(self, out_dir: Path, rank: int = 0) -> None:
        self.dir = Path(out_dir) / BLOCKS
        self.rank = rank

    def clear(self) -> None:
        if self.dir.is_dir():
            for f in self.dir.iterdir():
                f.unlink()
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str) -> Path:
        return self.dir / name

    # -- forward statistics ----------------------------------------------------------------------------
    def save_stats(self, key: str, found: Found, hidden_max: np.ndarray | None = None) -> None:
        arrays = {f"{k}|sums": e.sums for k, e in found.imatrix.items()}
        arrays.update({f"{k}|counts": e.counts for k, e in found.imatrix.items()})
        if hidden_max is not None:
            arrays["hidden_max"] = hidden_max
        with atomic_path(self._path(f"{key}.npz")) as tmp:
            with open(tmp, "wb") as fh:
                np.savez(fh, **arrays)
        with atomic_path(self._path(f"{key}.json")) as tmp:
            tmp.write_text(json.dumps({"tensors": [t.to_dict() for t in found.tensors],
                                       "spikes": [s.to_dict() for s in found.spikes]}))

    def load_stats(self, key: str) -> tuple[Found, np.ndarray | None] | None:
        npz, js = self._path(f"{key}.npz"), self._path(f"{key}.json")
        if not (npz.is_file() and js.is_file()):
            return None
        d = json.loads(js.read_text())
        with np.load(npz) as z:
            names = sorted({k.rsplit("|", 1)[0] for k in z.files if "|" in k})
            imatrix = {n: ImatrixEntry(z[f"{n}|sums"], z[f"{n}|counts"]) for n in names}
            hidden_max = z["hidden_max"] if "hidden_max" in z.files else None
        found = Found([TensorMeasurement.from_dict(t) for t in d["tensors"]], imatrix,
                      [Spike(**s) for s in d["spikes"]])
        return found, hidden_max

    # -- tensors -----------------------------------------------------------------------------------------
    def save_tensor(self, name: str, **payload) -> None:
        with atomic_path(self._path(name)) as tmp:
            torch.save(payload, tmp)

    def load_tensor(self, name: str) -> dict | None:
        path = self._path(name)
        return torch.load(path, weights_only=True) if path.is_file() else None

    def drop(self, name: str) -> None:
        self._path(name).unlink(missing_ok=True)

    # -- this rank's tensors ------------------------------------------------------------------------------
    def _mine(self, name: str) -> str:
        stem, dot, ext = name.rpartition(".")
        return f"{stem}.rank{self.rank}.{ext}" if dot else f"{name}.rank{self.rank}"

    def save_mine(self, name: str, **payload) -> None:
        self.save_tensor(self._mine(name), **payload)

    def load_mine(self, name: str) -> dict | None:
        return self.load_tensor(self._mine(name))

    def drop_mine(self, name: str) -> None:
        self.drop(self._mine(name))

    def save_step(self, name: str, step: int, previous: int | None = None, **payload) -> None:
        """Save this rank's ``name`` at ``step``; of its other steps only ``previous`` is kept."""
        self.save_tensor(f"{name}.step{step}.rank{self.rank}.pt", **payload)
        for old in self.steps(name):
            if old not in (step, previous):
                self.drop(f"{name}.step{old}.rank{self.rank}.pt")

    def steps(self, name: str) -> list[int]:
        """The steps of ``name`` this rank holds, sorted."""
        pre = f"{name}.step"
        return sorted(int(f.name[len(pre):].split(".")[0]) for f in self.dir.glob(f"{pre}*.rank{self.rank}.pt"))

    def load_step(self, name: str, step: int) -> dict | None:
        return self.load_tensor(f"{name}.step{step}.rank{self.rank}.pt")

    def drop_steps(self, name: str) -> None:
        for s in self.steps(name):
            self.drop(f"{name}.step{s}.rank{self.rank}.pt")

    # -- measurements of the backward sweep ---------------------------------------------------------------
    def save_layer(self, i: int, tensors: list[TensorMeasurement]) -> None:
        with atomic_path(self._path(f"layer_{i:04d}.json")) as tmp:
            tmp.write_text(json.dumps([t.to_dict() for t in tensors]))

    def load_layer(self, i: int) -> list[TensorMeasurement] | None:
        path = self._path(f"layer_{i:04d}.json")
        if not path.is_file():
            return None
        return [TensorMeasurement.from_dict(t) for t in json.loads(path.read_text())]
