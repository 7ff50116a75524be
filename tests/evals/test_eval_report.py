"""Reports, --compare, thresholds parsing, and --check failing on a deliberately broken quant."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from dq.cli import main
from dq.evals.errors import ReportError, ThresholdsError
from dq.evals.kld import KLDResult
from dq.evals.lmeval import TaskComparison
from dq.evals.report import EvalReport, read_report, write_report
from dq.evals.thresholds import load_thresholds

REPO = Path(__file__).resolve().parents[2]


def _report(kld_mean: float, lost: int, label: str) -> EvalReport:
    k = KLDResult(n_tokens=510, ppl_quant=12.0, ppl_base=11.5, ppl_ratio=12 / 11.5, kld_mean=kld_mean,
                  kld_median=kld_mean / 2, kld_p99=kld_mean * 8, kld_p999=kld_mean * 20, kld_max=kld_mean * 40,
                  same_top=0.9 - kld_mean, same_top_stderr=0.01, delta_p_mean=-0.01, delta_p_rms=0.05,
                  settings={"ctx": 512, "chunks": 2, "text": "wiki"})
    t = TaskComparison("mmlu", 20, acc_base=0.3, acc_quant=0.3 - lost / 20, lost=lost, gained=0)
    return EvalReport(quant={"path": f"/x/{label}.gguf", "kind": "gguf"}, base={"path": "/x/base"}, kld=k,
                      tasks={"mmlu": t}, label=label)


def test_report_roundtrip_and_compare(tmp_path, capsys):
    a, b = _report(0.05, 1, "q4"), _report(0.4, 3, "q2")
    pa, pb = write_report(tmp_path / "a.json", a), write_report(tmp_path / "b.json", b)
    assert read_report(pa).to_dict() == a.to_dict()
    assert main(["eval", "--compare", str(pa), str(pb), "--json"]) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["kld_mean"]["better"] == "a" and rows["kld_mean"]["delta"] == pytest.approx(0.35)
    assert rows["same_top"]["better"] == "a" and rows["mmlu_lost"]["b"] == 3
    assert main(["eval", "--compare", str(pa), str(pb)]) == 0
    assert "kld_mean" in capsys.readouterr().out


def test_not_a_report(tmp_path):
    p = tmp_path / "r.json"
    p.write_text(json.dumps({"hello": 1}))
    with pytest.raises(ReportError, match="not a dq eval report"):
        read_report(p)
    p.write_text("{")
    with pytest.raises(ReportError, match="not JSON"):
        read_report(p)


def test_repo_thresholds_parse():
    from dq.evals.thresholds import AUTO

    th = load_thresholds(REPO / "evals" / "thresholds.yaml")
    assert {e.preset for e in th.entries} >= {"Q4_K_M", "Q2_K", "IQ2_XXS"}
    assert all(e.model == "smollm2-135m" for e in th.entries)
    # dq's plan at the stock IQ2_XXS file's size is checked beside that file, quantized with the same imatrix
    stock = next(e for e in th.entries if e.preset == "IQ2_XXS")
    assert stock.imatrix == AUTO
    assert any(e.plan == AUTO and e.target_size == 83826368 for e in th.entries)


@pytest.mark.parametrize("doc, match", [
    ({"entries": [{"model": "m", "preset": "Q4_K_M", "bounds": {"kld_avg": {"max": 1}}}]}, "unknown metric 'kld_avg'"),
    ({"entries": [{"model": "m", "preset": "Q4_K_M"}]}, "has no bounds"),
    ({"entries": [{"model": "m", "preset": "Q4_K_M", "bounds": {"kld_mean": {}}}]}, "neither 'min' nor 'max'"),
    ({"entries": [{"model": "m", "preset": "Q9_X", "bounds": {"kld_mean": {"max": 1}}}]}, "unknown llama.cpp preset"),
    ({"entries": [{"model": "m", "bounds": {"kld_mean": {"max": 1}}}]}, "exactly one of 'preset'"),
    ({"entries": [{"model": "m", "preset": "Q4_K_M", "bound": {}}]}, "unknown key"),
    ({"settings": {"chunk": 3}, "entries": []}, "unknown key"),
    ({"entries": [{"model": "m", "plan": "p.json", "preset": "Q4_K_M", "bounds": {"kld_mean": {"max": 1}}}]},
     "exactly one of 'preset'"),
])
def test_bad_thresholds(tmp_path, doc, match):
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump(doc))
    with pytest.raises(ThresholdsError, match=match):
        load_thresholds(p)


def test_cli_bad_input_exit_2(tmp_path, capsys):
    assert main(["eval"]) == 2
    assert "give exactly one of" in capsys.readouterr().err
    assert main(["eval", str(tmp_path / "missing.gguf"), "--base", str(tmp_path)]) == 2
    assert "does not exist" in capsys.readouterr().err
    p = tmp_path / "t.yaml"
    p.write_text(yaml.safe_dump({"entries": [{"model": "m", "preset": "Q4_K_M", "bounds": {"foo": {"max": 1}}}]}))
    assert main(["eval", "--check", str(p)]) == 2
    assert "unknown metric 'foo'" in capsys.readouterr().err


@pytest.mark.slow
def test_check_fails_on_zeroed_super_weights(broken_gguf, smollm2_quant, smollm2_dir, tmp_path, capsys):
    """A BF16 SmolLM2 with two weights zeroed (the super weights of layers 1 and 2, hidden channel 507)
    is worse than Q2_K (measured mean KLD ~1.1, PPL x2.9). The repo's Q4_K_M KLD/PPL bounds catch it;
    the real Q4_K_M passes the same bounds."""
    repo = load_thresholds(REPO / "evals" / "thresholds.yaml")
    q4 = next(e for e in repo.entries if e.preset == "Q4_K_M")
    bounds = {b.metric: {k: v for k, v in (("min", b.min), ("max", b.max)) if v is not None}
              for b in q4.bounds if not b.metric.startswith("mmlu")}
    settings = {"ctx": 512, "chunks": 2}  # the settings of the other slow tests: one cached base pass
    doc = {"version": 1, "settings": settings, "entries": [
        {"name": "broken", "model": str(smollm2_dir), "quant": str(broken_gguf), "bounds": bounds},
    ]}
    p = tmp_path / "broken.yaml"
    p.write_text(yaml.safe_dump(doc))
    assert main(["eval", "--check", str(p), "--json"]) == 1
    captured = capsys.readouterr()
    out = json.loads(captured.out)
    failed = {r["metric"] for r in out["rows"] if not r["ok"]}
    assert {"kld_mean", "same_top", "ppl_ratio"} <= failed, out["rows"]
    assert "regression: broken: kld_mean" in captured.err
    doc["entries"][0] = {"name": "q4", "model": str(smollm2_dir), "quant": str(smollm2_quant("Q4_K_M")),
                         "bounds": bounds}
    p.write_text(yaml.safe_dump(doc))
    assert main(["eval", "--check", str(p)]) == 0
    assert "REGRESSED" not in capsys.readouterr().out


def test_lean_imports():
    """Importing the eval library and CLI pulls in neither lm-eval, llama.cpp nor transformers."""
    import subprocess
    import sys

    code = ("import sys, dq.evals.runner, dq.evals.thresholds, dq.cli.eval; "
            "bad = [m for m in ('lm_eval', 'llama_cpp', 'transformers', 'datasets') if m in sys.modules]; "
            "assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.slow
def test_cli_eval_then_compare(smollm2_quant, smollm2_dir, tmp_path, capsys):
    """``dq eval QUANT --base BASE -o r.json`` writes a report that ``--compare`` lines up with another."""
    q2 = tmp_path / "q2.json"
    rc = main(["eval", str(smollm2_quant("Q2_K")), "--base", str(smollm2_dir), "--tasks", "kld,ppl",
               "--chunks", "2", "-o", str(q2), "--label", "Q2_K"])
    assert rc == 0
    table = capsys.readouterr().out
    assert "mean KLD" in table and "same top token" in table and "PPL ratio" in table
    good = write_report(tmp_path / "good.json", _report(0.05, 0, "good"))
    assert main(["eval", "--compare", str(good), str(q2), "--json"]) == 0
    rows = {r["metric"]: r for r in json.loads(capsys.readouterr().out)["rows"]}
    assert rows["kld_mean"]["better"] == "a" and rows["ppl_ratio"]["better"] == "a"
    assert 0.2 < rows["kld_mean"]["b"] < 0.6
