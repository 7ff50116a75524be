"""The calibration sampler: every source, round-robin, disjoint purposes, the user's file, chat template."""

from __future__ import annotations

import pytest

from dq.calibration import Purpose, calibration_sources, sample_calibration
from dq.data import CALIBRATION_SETS
from dq.errors import AnalysisError


@pytest.fixture(scope="module")
def tok(tiny_llama_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_llama_dir)


def test_draws_from_every_source_round_robin(tok):
    cal = sample_calibration(tok, 8, 128)
    assert cal.ids.shape == (8, 128)
    assert [w.source for w in cal.windows] == list(CALIBRATION_SETS) * 2
    assert (cal.ids[:, 0] == tok.bos_token_id).all()
    # each row is the source's own tokens at the recorded offset
    sources = dict(calibration_sources())
    for row, w in zip(cal.ids.tolist(), cal.windows):
        stream = tok(sources[w.source], add_special_tokens=False)["input_ids"]
        assert row[1:] == stream[w.start : w.start + w.n_tokens]
    assert cal.describe()["sequences_per_source"] == {s: 2 for s in CALIBRATION_SETS}


def test_purposes_never_share_a_window(tok):
    seen = {}
    for p in Purpose:
        cal = sample_calibration(tok, 40, 128, purpose=p)
        seen[p] = {(w.source, w.start) for w in cal.windows}
    assert not seen[Purpose.ANALYSIS] & seen[Purpose.PROBE]
    assert not seen[Purpose.ANALYSIS] & seen[Purpose.ACCEPT]
    assert not seen[Purpose.PROBE] & seen[Purpose.ACCEPT]
    assert sample_calibration(tok, 8, 128, seed=1).ids.tolist() != sample_calibration(tok, 8, 128).ids.tolist()


def test_users_file_and_bad_input(tok, tmp_path):
    text = " ".join(f"word{i}" for i in range(3000))
    f = tmp_path / "mine.txt"
    f.write_text(text)
    cal = sample_calibration(tok, 3, 64, calib_file=f)
    assert {w.source for w in cal.windows} == {"mine.txt"} and cal.ids.shape == (3, 64)
    with pytest.raises(AnalysisError, match="does not exist"):
        sample_calibration(tok, 1, 64, calib_file=tmp_path / "nope.txt")
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(AnalysisError, match="is empty"):
        sample_calibration(tok, 1, 64, calib_file=tmp_path / "empty.txt")
    (tmp_path / "short.txt").write_text("too short")
    with pytest.raises(AnalysisError, match="no window of 64 tokens"):
        sample_calibration(tok, 1, 64, calib_file=tmp_path / "short.txt")


@pytest.mark.slow
def test_chat_template_wraps_each_window(smollm2_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2_dir)
    cal = sample_calibration(tok, 4, 128, chat_template=True)
    start = tok.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False).split("x")[0]
    for row in cal.ids.tolist():
        assert tok.decode(row).startswith(start)
