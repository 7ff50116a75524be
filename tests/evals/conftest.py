"""Fixtures for dq eval tests: SmolLM2 quants built once (cached in DQ_CACHE by ``build_quant``)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # _eval_helpers

# llama.cpp's OpenMP threads spin-wait: on a shared 2-core box one thread is ~3x faster than two.
os.environ.setdefault("DQ_THREADS", "1")

# Every slow test shares these settings so the cached base pass is computed once.
FAST_CTX = 512
FAST_CHUNKS = 2


@pytest.fixture(scope="session")
def fast_kld_cfg():
    from dq.evals.kld import KLDConfig

    return KLDConfig(ctx=FAST_CTX, chunks=FAST_CHUNKS)


@pytest.fixture(scope="session")
def smollm2_quant(smollm2_dir, smollm2_bf16_gguf):
    """preset -> GGUF of SmolLM2 made by dq's quantizer (IQ1_S with a quick torch imatrix)."""
    from _eval_helpers import torch_imatrix

    from dq.data import calibration_text
    from dq.evals.thresholds import build_quant
    from dq.quant.imatrix import write_imatrix

    made: dict[str, object] = {}

    def get(preset: str):
        if preset not in made:
            imatrix = None
            if preset.startswith("IQ1") or preset.startswith("IQ2"):
                from dq.cache import cache_dir

                imatrix = cache_dir() / "evals" / "smollm2-test.imatrix.gguf"
                if not imatrix.is_file():
                    imatrix.parent.mkdir(parents=True, exist_ok=True)
                    write_imatrix(imatrix, torch_imatrix(smollm2_dir, calibration_text(("c4",)), n_tokens=512))
            made[preset] = build_quant(smollm2_dir, preset, imatrix=imatrix)
        return made[preset]

    return get


@pytest.fixture(scope="session")
def broken_gguf(smollm2_bf16_gguf, tmp_path_factory):
    """SmolLM2 BF16 with the super weights of layers 1 and 2 zeroed."""
    from _eval_helpers import zero_super_weights

    dst = tmp_path_factory.mktemp("broken") / "smollm2-superweights-zeroed.gguf"
    zeroed = zero_super_weights(smollm2_bf16_gguf, dst)
    assert [z[1][0] for z in zeroed] == [507, 507], zeroed  # the super-weight channel
    return dst
