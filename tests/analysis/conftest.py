"""Shared analyses of tiny models (computed once per session; fast settings)."""

from __future__ import annotations

import pytest

from dq.analysis.analyze import AnalyzeOptions

FAST = dict(n_tokens=512, seq_len=128, act_tokens=64, plots=False, ablation_tokens=128, response_tokens=128)


@pytest.fixture(scope="session")
def tiny_analysis(tiny_llama_dir, tmp_path_factory):
    from dq.analysis.analyze import analyze

    out = tmp_path_factory.mktemp("tiny-analysis")
    opts = AnalyzeOptions(candidates=("Q4_K", "IQ2_XXS"), **FAST)
    return analyze(tiny_llama_dir, out, opts), out, opts
