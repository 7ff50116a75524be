"""llama.cpp's split GGUF layout (``gguf-split``, gguf-py's ``GGUFWriter(split_max_size=...)``).

A model too large for one file (the Hub takes files up to 50 GB; a 671B MoE at 1.6 bits is ~130 GB) is
written as shards ``<stem>-00001-of-0000N.gguf``. As gguf-py lays them out: tensors stay in file order and a
new shard starts before the tensor that would take the current one (counting raw payload bytes) over the
limit; the first shard holds every metadata key, then ``split.no``, ``split.count`` and
``split.tensors.count``; later shards hold only those three keys. llama.cpp loads the set from the first
shard's path.

Example:
    >>> shard_paths(Path("m.gguf"), 3)[0].name    # doctest: +SKIP
    'm-00001-of-00003.gguf'
"""

from __future__ import annotations

import re
import struct
from collections.abc import Sequence
from pathlib import Path

from gguf import GGUFValueType, Keys

from dq.errors import BudgetError

__all__ = ["HUB_MAX_FILE_BYTES", "DEFAULT_SPLIT_BYTES", "parse_split_size", "plan_shards", "shard_paths",
           "split_kvs", "is_first_shard"]

HUB_MAX_FILE_BYTES = 50 * 1000**3  # the Hugging Face Hub's largest file
DEFAULT_SPLIT_BYTES = 48 * 1000**3  # shard size when a file would exceed the Hub's limit (headers fit beside)
_SHARD_NAME = "{:s}-{:05d}-of-{:05d}.gguf"  # gguf-py's SHARD_NAME_FORMAT
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMGT]?)\s*$", re.IGNORECASE)


def parse_split_size(text: str | int) -> int:
    """``50G`` -> 50e9 bytes (K/M/G/T are powers of 1000, as llama.cpp's converter and gguf-split read them).

    Raises:
        BudgetError: not a size.
    """
    if isinstance(text, int):
        return text
    m = _SIZE.match(str(text))
    if not m:
        raise BudgetError(f"--split-max-size {text!r} is not a size; write e.g. 50G, 4000M or a byte count")
    return int(float(m.group(1)) * 1000 ** " KMGT".index(m.group(2).upper() or " "))


def plan_shards(nbytes: Sequence[int], max_bytes: int) -> list[list[int]]:
    """Tensor indices per shard: a new shard before the tensor that would take a non-empty one over
    ``max_bytes`` of payload (gguf-py's rule; a tensor larger than the limit gets a shard of its own)."""
    shards: list[list[int]] = [[]]
    size = 0
    for i, n in enumerate(nbytes):
        if shards[-1] and max_bytes > 0 and size + n > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += n
    return shards


def shard_paths(path: str | Path, n: int) -> list[Path]:
    """The shard files of ``path`` (itself when ``n`` is 1)."""
    path = Path(path)
    if n == 1:
        return [path]
    return [path.with_name(_SHARD_NAME.format(path.stem, i + 1, n)) for i in range(n)]


def is_first_shard(path: str | Path) -> bool:
    return re.search(r"-00001-of-\d{5}\.gguf$", str(path)) is not None


def _kv(key: str, vtype: GGUFValueType, fmt: str, value) -> bytes:
    k = key.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", vtype) + struct.pack("<" + fmt, value)


def split_kvs(shard: int, n_shards: int, n_tensors: int) -> dict[str, bytes]:
    """The three split keys of shard ``shard`` (0-based), as serialised KV pairs."""
    return {
        Keys.Split.LLM_KV_SPLIT_NO: _kv(Keys.Split.LLM_KV_SPLIT_NO, GGUFValueType.UINT16, "H", shard),
        Keys.Split.LLM_KV_SPLIT_COUNT: _kv(Keys.Split.LLM_KV_SPLIT_COUNT, GGUFValueType.UINT16, "H", n_shards),
        Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT: _kv(Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT, GGUFValueType.INT32, "i",
                                                   n_tensors),
    }
