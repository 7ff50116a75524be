"""Bad input gives one clear DQError each; --resume skips finished blocks and refuses another model."""

from __future__ import annotations

import json

import pytest

from dq.analysis.analyze import AnalyzeOptions, analyze
from dq.errors import AnalysisError, UnsupportedArchitectureError

from .conftest import FAST


def test_unknown_architecture(tiny_llama_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama_dir, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "nosucharch", ["NoSuchArchForCausalLM"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedArchitectureError, match="unknown architecture.*nosucharch"):
        analyze(bad, tmp_path / "out", AnalyzeOptions(**FAST))


def test_empty_calibration_file(tiny_llama_dir, tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(AnalysisError, match="empty"):
        analyze(tiny_llama_dir, tmp_path / "out", AnalyzeOptions(calib_file=str(empty), **FAST))


def test_zero_tokens():
    with pytest.raises(AnalysisError, match="--tokens must be a positive"):
        AnalyzeOptions(n_tokens=0)


def test_unknown_candidate():
    with pytest.raises(AnalysisError, match="unknown candidate type 'Q9_K'"):
        AnalyzeOptions(candidates=("Q4_K", "Q9_K"))


def test_cli_turns_bad_input_into_exit_code(tiny_llama_dir, tmp_path, capsys):
    from dq.cli import main

    assert main(["analyze", str(tiny_llama_dir), "-o", str(tmp_path / "o"), "--tokens", "0"]) == 2
    assert "--tokens must be a positive" in capsys.readouterr().err


def test_resume_skips_finished_blocks_and_refuses_another_model(tiny_analysis, tiny_llama_dir, tmp_path, caplog):
    from dq.testing import tiny_llama

    class Stop(Exception):
        pass

    def stop_after(stage: str, n: int):
        def progress(s: str, done: int, total: int) -> None:
            if s == stage and done == n:
                raise Stop
        return progress

    analysis, out, opts = tiny_analysis
    work = tmp_path / "work"
    caplog.set_level("INFO")
    with pytest.raises(Stop):  # killed after the first block of the forward sweep
        analyze(tiny_llama_dir, work, opts, progress=stop_after("forward", 1))
    with pytest.raises(Stop):  # then after the first block of the backward sweep
        analyze(tiny_llama_dir, work, opts, resume=True, progress=stop_after("measure", 1))
    assert "resuming the forward sweep at layer 1 of 2" in caplog.text
    done = (work / "blocks" / "layer_0001.json").stat().st_mtime_ns
    again = analyze(tiny_llama_dir, work, opts, resume=True)
    assert "resuming the backward sweep at layer 0" in caplog.text
    assert (work / "blocks" / "layer_0001.json").stat().st_mtime_ns == done  # not measured again
    assert [t.to_dict() for t in again.tensors] == [t.to_dict() for t in analysis.tensors]

    other = tiny_llama(tmp_path / "other", seed=1, intermediate=768)
    with pytest.raises(AnalysisError, match="resume directory .* holds an analysis of"):
        analyze(other, work, opts, resume=True)


def test_unsupported_architecture_fails_before_analysis(tmp_path):
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    from dq.errors import UnsupportedArchitectureError
    from dq.testing import train_sentencepiece

    model = tmp_path / "opt"
    train_sentencepiece(model, 512)
    cfg = OPTConfig(vocab_size=512, hidden_size=256, ffn_dim=512, num_hidden_layers=2, num_attention_heads=4,
                    word_embed_proj_dim=256)
    cfg.architectures = ["OPTForCausalLM"]
    OPTForCausalLM(cfg).to(torch.bfloat16).save_pretrained(model)
    with pytest.raises(UnsupportedArchitectureError, match="does not support the architecture 'OPTForCausalLM'"):
        analyze(model, tmp_path / "out")
    assert not (tmp_path / "out" / "blocks").exists() or not any((tmp_path / "out" / "blocks").iterdir())


def test_names_that_miss_the_conversion_fail_before_analysis(smollm2_dir, tmp_path, monkeypatch):
    """DeepSeek's kv_b_proj only meets the converter's attn_k_b/attn_v_b through dq's split table: without
    it, dq stops before measuring anything and names the architectures it supports."""
    from dq.analysis import coverage
    from dq.errors import UnsupportedArchitectureError
    from dq.testing_archs import tiny_arch

    model = tiny_arch("deepseek_v3", tmp_path / "ds", bpe_tokenizer_dir=smollm2_dir)
    monkeypatch.setattr(coverage, "split_of", lambda *a: None)
    with pytest.raises(UnsupportedArchitectureError, match=r"attn_kv_b.*supported: llama, mistral, qwen2"):
        analyze(model, tmp_path / "out")
    assert not (tmp_path / "out" / "blocks").exists() or not any((tmp_path / "out" / "blocks").iterdir())
