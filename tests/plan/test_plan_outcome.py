"""The planner's outcome on a real model: at the stock IQ2_XXS file's size, dq's plan of SmolLM2-135M
measures a lower KLD than llama.cpp's IQ2_XXS mix, with the same imatrix, by llama.cpp's own inference.

The analysis is the one `dq eval --check evals/thresholds.yaml` uses (its ``settings.analyze``), cached,
so CI analyses SmolLM2 once for both.
"""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

THRESHOLDS = Path(__file__).resolve().parents[2] / "evals" / "thresholds.yaml"
STOCK = "IQ2_XXS"
MARGIN = 0.5  # dq's mean KLD must be at most this fraction of the stock mix's


def test_dq_plan_beats_the_stock_mix_at_its_size(smollm2_dir):
    from dq.analysis.artifact import imatrix_beside
    from dq.convert.source import source_gguf
    from dq.evals.kld import KLDConfig, run_kld
    from dq.evals.thresholds import auto_analysis, auto_plan, build_plan_quant, build_quant, load_thresholds
    from dq.plan.artifact import QuantPlan

    th = load_thresholds(THRESHOLDS)
    adir = auto_analysis("smollm2-135m", th.analyze)
    stock = build_quant(smollm2_dir, STOCK, imatrix=imatrix_beside(adir / "analysis.json"))
    stock_size = stock.stat().st_size
    plan_path = auto_plan("smollm2-135m", th.analyze, stock_size, None)
    plan = QuantPlan.load(plan_path)
    assert plan.total_bytes <= stock_size
    ours = build_plan_quant(smollm2_dir, plan_path)
    assert ours.stat().st_size == plan.total_bytes
    cfg = KLDConfig(ctx=512, chunks=th.kld.chunks)
    base = source_gguf(smollm2_dir)
    k_dq, k_stock = run_kld(ours, base, cfg).kld_mean, run_kld(stock, base, cfg).kld_mean
    print(f"mean KLD at {stock_size:,} bytes: dq {k_dq:.4f}, stock {STOCK} {k_stock:.4f} ({k_dq / k_stock:.2f}x)")
    assert k_dq <= MARGIN * k_stock, (k_dq, k_stock)
