"""`dq eval --check` on an entry that names a `dq plan` file: the plan is quantized and held to its bounds."""

from __future__ import annotations

import yaml

from dq.cli import main


def test_check_plan_entry_passes_and_fails(tiny_analysis_dir, tiny_llama_dir, tmp_path, capsys):
    plan = tmp_path / "plan.yaml"
    assert main(["plan", str(tiny_analysis_dir), "--target-bpw", "6", "-o", str(plan)]) == 0
    capsys.readouterr()

    def write(bound):
        doc = {"version": 1, "settings": {"ctx": 128, "chunks": 2},
               "entries": [{"name": "tiny plan", "model": str(tiny_llama_dir), "plan": str(plan),
                            "bounds": {"kld_mean": bound}}]}
        path = tmp_path / "th.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path

    assert main(["eval", "--check", str(write({"max": 5.0}))]) == 0
    capsys.readouterr()
    assert main(["eval", "--check", str(write({"max": 1e-9}))]) == 1  # any real quant has KLD > 1e-9
    assert "tiny plan: kld_mean" in capsys.readouterr().err
