"""Which share of an analysis this process does, and the torch.distributed collectives that join the shares.

``dq analyze`` runs as one process or as ``N`` processes started by ``torchrun`` (``dq analyze --nproc N``
starts the same thing). There is one code path: a single process is a world of one, where every collective
returns its input. Under ``torchrun`` the process group comes from its environment (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``), on NCCL when the analysis runs on CUDA (rank ``r`` takes GPU
``LOCAL_RANK``) and on gloo on CPUs.

The work is split two ways (:mod:`dq.analysis.analyze` says where):

- **data parallel**: each rank runs the current block on a contiguous shard of the calibration sequences
  (:meth:`Ranks.shard`); imatrix sums, token and routing counts are summed, spike maxima maxed;
- **work parallel**: the tensors of a block are dealt to ranks by size (:meth:`Ranks.deal`); the owner of a
  tensor gathers its probe gradients and activation samples from every rank, measures it, and rank 0 gathers
  the measurements and alone writes files.

Every collective carries the process group's timeout (``--dist-timeout``): a rank that dies ends the job
with an error instead of a hang (``torchrun`` also stops the other ranks when one exits with an error).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import numpy as np
import torch

__all__ = ["Ranks", "launched_by_torchrun"]

log = logging.getLogger(__name__)


def launched_by_torchrun() -> bool:
    """True inside a process ``torchrun`` started with more than one rank."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


@dataclass(frozen=True)
class Ranks:
    """This process's place in the job: ``rank`` of ``world`` (``local_world`` on this node).

    A default ``Ranks()`` is the single-process world: every collective is the identity.
    """

    rank: int = 0
    world: int = 1
    local_world: int = 1
    device: str = "cpu"

    @classmethod
    def from_env(cls, device: str = "cpu", timeout_s: float = 1800.0) -> Ranks:
        """The world ``torchrun`` set up (initialising the default process group), or a world of one.

        Args:
            device: the analysis device; ``cuda`` selects NCCL and GPU ``LOCAL_RANK``, ``cpu`` gloo.
            timeout_s: how long any collective may wait for the other ranks.
        """
        if not launched_by_torchrun():
            return cls(device=device)
        import torch.distributed as dist

        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
        cuda = str(device).startswith("cuda")
        if cuda:
            local = int(os.environ.get("LOCAL_RANK", "0"))
            if local >= torch.cuda.device_count():
                from dq.errors import AnalysisError

                raise AnalysisError(f"rank {rank} wants GPU {local} but torch sees {torch.cuda.device_count()}; "
                                    f"start at most {torch.cuda.device_count()} processes per node")
            device = f"cuda:{local}"
            torch.cuda.set_device(device)
        else:
            # torchrun sets OMP_NUM_THREADS=1; the node's cores are shared by its ranks instead
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))
        if not dist.is_initialized():
            dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                                    **({"device_id": torch.device(device)} if cuda else {}))
        log.info("rank %d of %d (%s, %s)", rank, world, "nccl" if cuda else "gloo", device)
        return cls(rank, world, local_world, device)

    # -- who does what -----------------------------------------------------------------------------------
    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's contiguous share of ``n`` items (rank order is item order)."""
        return range(n * self.rank // self.world, n * (self.rank + 1) // self.world)

    def deal(self, costs: Sequence[float]) -> list[int]:
        """The rank of each item, dealt largest first to the least loaded rank (the same on every rank)."""
        load = [0.0] * self.world
        owner = [0] * len(costs)
        for k in sorted(range(len(costs)), key=lambda k: (-costs[k], k)):
            r = min(range(self.world), key=lambda r: (load[r], r))
            owner[k] = r
            load[r] += costs[k]
        return owner

    def threads(self, asked: int | None) -> int | None:
        """Quantizer threads per rank: what was asked, else the node's cores shared by its ranks."""
        if asked is not None or self.world == 1:
            return asked
        return max(1, (os.cpu_count() or 1) // self.local_world)

    # -- collectives ---------------------------------------------------------------------------------------
    def _reduce(self, a: np.ndarray, op: str) -> np.ndarray:
        if self.world == 1:
            return a
        import torch.distributed as dist

        t = torch.from_numpy(np.ascontiguousarray(a)).to(self.device)
        dist.all_reduce(t, op=getattr(dist.ReduceOp, op))
        return t.cpu().numpy().astype(a.dtype, copy=False)

    def sum(self, a: np.ndarray) -> np.ndarray:
        """Element-wise sum over ranks (every rank gets it)."""
        return self._reduce(a, "SUM")

    def max(self, a: np.ndarray) -> np.ndarray:
        """Element-wise maximum over ranks (every rank gets it)."""
        return self._reduce(a, "MAX")

    def gather(self, obj: Any, dst: int = 0) -> list[Any] | None:
        """Every rank's ``obj`` in rank order on ``dst``; None elsewhere."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] | None = [None] * self.world if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order, on every rank."""
        if self.world == 1:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, src: int = 0) -> Any:
        """``src``'s ``obj`` on every rank."""
        if self.world == 1:
            return obj
        import torch.distributed as dist

        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def on_main(self, fn: Callable[[], Any]) -> Any:
        """Run ``fn`` on rank 0 only (a conversion, a cache fill, a directory check); every rank returns its
        result, or raises the error it raised, instead of waiting on a rank that failed."""
        if self.world == 1:
            return fn()
        out: tuple[Any, BaseException | None] = (None, None)
        if self.main:
            try:
                out = (fn(), None)
            except Exception as e:  # handed to every rank, raised below
                out = (None, e)
        result, err = self.broadcast(out)
        if err is not None:
            raise err
        return result

    def barrier(self) -> None:
        if self.world > 1:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        """Leave the process group (a no-op in a world of one)."""
        if self.world > 1:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()
