"""analyze -> plan -> quantize on a tiny real model: the written file is the plan, to the byte."""

from __future__ import annotations

import json

import numpy as np
import pytest
from gguf import GGUFReader

from dq.cli import main
from dq.plan.artifact import QuantPlan


def test_plan_then_quantize_writes_exactly_the_plan(tiny_analysis_dir, tiny_llama_dir, tmp_path, capsys):
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(tiny_analysis_dir), "--target-bpw", "5.0", "-o", str(plan_path)]) == 0
    out = capsys.readouterr().out
    assert "llama-quantize" in out and "--tensor-type '^blk\\.0\\.attn_q\\.weight$=" in out
    plan = QuantPlan.load(plan_path)
    assert plan.total_bytes <= plan.budget_bytes
    gguf = tmp_path / "m.gguf"
    assert main(["quantize", str(tiny_llama_dir), "--plan", str(plan_path), "-o", str(gguf)]) == 0
    assert gguf.stat().st_size == plan.total_bytes
    written = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    assert written == {name: t.type.value for name, t in plan.tensors.items()}
    import llama_cpp

    llm = llama_cpp.Llama(str(gguf), n_ctx=64, logits_all=True, verbose=False)
    llm.eval(llm.tokenize(b"The quick brown fox"))
    assert np.isfinite(np.array(llm.scores[:4])).all()
    llm.close()


def test_more_bits_more_bytes_less_predicted_damage(tiny_analysis_dir, tmp_path, capsys):
    plans = []
    for bpw in ("5.0", "7.0"):
        assert main(["plan", str(tiny_analysis_dir), "--target-bpw", bpw, "-o", str(tmp_path / f"{bpw}.json"), "--json"]) == 0
        plans.append(json.loads(capsys.readouterr().out))
    assert plans[0]["total_bytes"] < plans[1]["total_bytes"]
    assert plans[0]["predicted_damage"] > plans[1]["predicted_damage"]


def test_impossible_budget_states_the_smallest_size(tiny_analysis_dir, tmp_path, capsys):
    assert main(["plan", str(tiny_analysis_dir), "--target-size", "100KB", "-o", str(tmp_path / "p.yaml")]) == 2
    err = capsys.readouterr().err
    assert "below the smallest achievable file" in err and "bytes" in err
    assert not (tmp_path / "p.yaml").exists()


def test_plan_from_another_model_is_refused(tiny_analysis_dir, tmp_path, capsys):
    from dq.testing import tiny_llama

    other = tiny_llama(tmp_path / "other", intermediate=768)
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(tiny_analysis_dir), "--target-bpw", "6", "-o", str(plan_path)]) == 0
    capsys.readouterr()
    assert main(["quantize", str(other), "--plan", str(plan_path), "-o", str(tmp_path / "x.gguf")]) == 2
    assert "another model" in capsys.readouterr().err
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.parametrize("argv,needle", [
    (["--target-size", "80XB"], "cannot read size"),
    ([], "exactly one of --target-size"),
    (["--target-size", "1MB", "--target-bpw", "3"], "exactly one of --target-size"),
])
def test_budget_argument_errors(tiny_analysis_dir, tmp_path, capsys, argv, needle):
    assert main(["plan", str(tiny_analysis_dir), "-o", str(tmp_path / "p.yaml"), *argv]) == 2
    assert needle in capsys.readouterr().err


def test_quantize_plan_auto_with_an_existing_analysis(tiny_analysis_dir, tiny_llama_dir, tmp_path):
    out = tmp_path / "auto.gguf"
    assert main(["quantize", str(tiny_llama_dir), "--plan", "auto", "--analysis", str(tiny_analysis_dir),
                 "--target-size", "950KB", "-o", str(out)]) == 0
    assert out.stat().st_size <= 950_000
    plan = QuantPlan.load(tmp_path / "auto.plan.yaml")
    assert plan.total_bytes == out.stat().st_size


def test_plan_auto_needs_a_budget(tiny_analysis_dir, tiny_llama_dir, tmp_path, capsys):
    assert main(["quantize", str(tiny_llama_dir), "--plan", "auto", "--analysis", str(tiny_analysis_dir),
                 "-o", str(tmp_path / "a.gguf")]) == 2
    assert "needs a budget" in capsys.readouterr().err


def test_tensor_type_overrides_apply_on_top_of_a_plan(tiny_analysis_dir, tiny_llama_dir, tmp_path, caplog):
    plan_path = tmp_path / "plan.yaml"
    assert main(["plan", str(tiny_analysis_dir), "--target-bpw", "4", "-o", str(plan_path)]) == 0
    plan = QuantPlan.load(plan_path)
    gguf = tmp_path / "m.gguf"
    assert main(["quantize", str(tiny_llama_dir), "--plan", str(plan_path), "--tensor-type", "attn_v=Q8_0",
                 "--tensor-type", "nothing_matches=Q2_K", "-o", str(gguf)]) == 0
    assert "'nothing_matches' matched no tensor" in caplog.text
    written = {t.name: t.tensor_type.name for t in GGUFReader(gguf).tensors}
    for name, t in plan.tensors.items():
        assert written[name] == ("Q8_0" if ".attn_v." in name else t.type.value), name
