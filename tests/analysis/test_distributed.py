"""`dq analyze` under torch.distributed: 2 CPU processes on gloo give the one-process analysis and plan.

Each run is the real thing: `dq analyze --nproc 2`, which re-starts itself under `torchrun --nproc-per-node 2`.
What may differ between the two is only the order of float sums (imatrix sums, Fisher mass, the probe
gradients' float32 GEMMs on one thread instead of two): errors and predicted KLDs agree within the measured
tolerances below, token and routing counts are exact, and the plans are the same.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from dq.analysis.analyze import AnalyzeOptions, analyze
from dq.analysis.artifact import Analysis
from dq.quant.imatrix import read_imatrix

# The ranks' activations come from float32 GEMMs of other shapes and thread counts (one thread per rank,
# half the sequences), saved between blocks in the model's bf16, so the imatrix sums agree within 1e-4, not
# bitwise; libggml's imatrix-weighted scale search is discontinuous, and on SmolLM2's dequantized-Q4_1
# weights many Q4_K/Q6_K blocks sit near a tie. Measured on a 2-core laptop (2026-12-07): imatrix sums
# 1.4e-5 apart; per tensor, weight errors up to 1.0e-2, act errors 1.2e-2 and predicted KLDs 6.4e-2 apart
# (Q4_K ffn_down, whose error is 3e-4); summed over the model per type, 5e-3 at most. Different seeds move
# per-tensor predictions by ~20%; a rank's tokens dropped or counted twice breaks the exact token counts.
TENSOR_RTOL = 0.15
TOTAL_RTOL = 2e-2
IMATRIX_RTOL = 1e-4
CANDS = ("Q6_K", "Q4_K", "Q2_K", "IQ2_XXS")
ARGS = ["--tokens", "768", "--seq-len", "128", "--grad-tokens", "384", "--act-tokens", "64", "--max-elements", "65536",
        "--ablation-tokens", "128", "--response-tokens", "256", "--no-plots", "--candidates", ",".join(CANDS)]


def _options() -> AnalyzeOptions:
    return AnalyzeOptions(n_tokens=768, seq_len=128, grad_tokens=384, act_tokens=64, max_elements=65536,
                          ablation_tokens=128, response_tokens=256, plots=False, candidates=CANDS)


def _dq_analyze(model, out: Path, *extra: str, timeout: float = 900) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "dq", "analyze", str(model), "-o", str(out), *ARGS, *extra],
                          capture_output=True, text=True, timeout=timeout, env=env)


def _assert_same(one: Path, two: Path) -> None:
    a1, a2 = Analysis.load(one / "analysis.json"), Analysis.load(two / "analysis.json")
    t1, t2 = a1.by_name(), a2.by_name()
    assert t1.keys() == t2.keys()
    totals: dict[tuple[str, str], list[float]] = {}
    for name, x in t1.items():
        y = t2[name]
        assert (x.shape, x.role, x.max_abs) == (y.shape, y.role, y.max_abs), name
        assert len(x.errors) == len(y.errors), name
        for e1, e2 in zip(x.errors, y.errors):
            assert (e1.requested, e1.stored, e1.nbytes) == (e2.requested, e2.stored, e2.nbytes), name
            for f in ("weight_err", "weighted_err", "act_err", "kld"):
                v1, v2 = getattr(e1, f), getattr(e2, f)
                assert (v1 is None) == (v2 is None), (name, f)
                if v1 is not None:
                    assert v2 == pytest.approx(v1, rel=TENSOR_RTOL, abs=1e-12), (name, e1.requested, f)
                    tot = totals.setdefault((f, e1.requested.name), [0.0, 0.0])
                    tot[0], tot[1] = tot[0] + v1, tot[1] + v2
    for key, (s1, s2) in totals.items():
        assert s2 == pytest.approx(s1, rel=TOTAL_RTOL), key
    im1, im2 = read_imatrix(one / "imatrix.gguf"), read_imatrix(two / "imatrix.gguf")
    assert im1.entries.keys() == im2.entries.keys()
    for k, e in im1.entries.items():
        np.testing.assert_array_equal(e.counts, im2.entries[k].counts)  # token and routing counts: exact
        np.testing.assert_allclose(im2.entries[k].sums, e.sums, rtol=IMATRIX_RTOL)
    assert [(s.layer, s.row, s.col) for s in a1.super_weights] == [(s.layer, s.row, s.col) for s in a2.super_weights]
    s1, s2 = a1.extra["spikes"], a2.extra["spikes"]  # maxima over ranks, the earliest token on a tie
    assert len(s1) == len(s2)
    for x, y in zip(s1, s2):
        assert x.keys() == y.keys()
        for k, v in x.items():  # where the spikes are: exact; their sizes: float32 apart
            assert y[k] == (pytest.approx(v, rel=1e-5) if isinstance(v, float) else v), (x["tensor"], k)
    assert a2.extra["options"] == a1.extra["options"]


def _plan_types(adir: Path, bpw: float) -> dict[str, str]:
    from dq.plan.planner import budget_bytes, load_plan_inputs, make_plan

    inputs = load_plan_inputs(adir)
    n = sum(int(np.prod(s.shape)) for s in inputs.sources)
    plan = make_plan(inputs, budget_bytes(None, bpw, n))
    return {k: t.type.value for k, t in plan.tensors.items()}


def _check(model, root: Path, bpw: float) -> None:
    analyze(model, root / "one", _options())
    r = _dq_analyze(model, root / "two", "--nproc", "2")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "rank 1 of 2" in r.stderr  # two processes really ran
    _assert_same(root / "one", root / "two")
    assert _plan_types(root / "one", bpw) == _plan_types(root / "two", bpw)


@pytest.mark.slow
def test_two_processes_equal_one_on_smollm2(smollm2_dir, tmp_path):
    _check(smollm2_dir, tmp_path, 4.5)  # SmolLM2's widths fall back to 32-blocks: ~4.2 at least


def test_two_processes_equal_one_on_an_upcycled_moe(tiny_llama_dir, tmp_path):
    from dq.testing_moe import upcycle_moe

    moe = upcycle_moe(tiny_llama_dir, tmp_path / "mixtral", kind="mixtral", n_experts=4, top_k=2)
    _check(moe, tmp_path, 3.0)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            out.append(int(stat.parent.name))
    return out


def _rank_of(pid: int) -> int | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return None
    for kv in env:
        if kv.startswith(b"RANK="):
            return int(kv[5:])
    return None


def test_a_killed_rank_ends_the_job_and_resume_finishes_it(tiny_llama_dir, tmp_path):
    """Rank 1 is SIGKILLed in the backward sweep: the job exits non-zero without hanging, and `--resume` with
    the same two processes completes the analysis, equal to one process's."""
    from dq.testing import tiny_llama

    model = tiny_llama(tmp_path / "llama6", layers=6)
    out = tmp_path / "two"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[2]), os.environ.get("PYTHONPATH", "")])}
    job = subprocess.Popen([sys.executable, "-m", "dq", "analyze", str(model), "-o", str(out), *ARGS, "--nproc", "2",
                            "--dist-timeout", "60"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env=env)
    killed = False
    t0 = time.time()
    while job.poll() is None and time.time() - t0 < 600:
        if (out / "blocks" / "layer_0004.json").is_file():  # two of six blocks measured
            for p in (c for w in _children(job.pid) for c in [w, *_children(w)]):
                if _rank_of(p) == 1:
                    os.kill(p, signal.SIGKILL)
                    killed = True
            break
        time.sleep(0.05)
    _, err = job.communicate(timeout=300)
    assert killed, "the analysis finished before rank 1 could be killed"
    assert job.returncode != 0
    assert "exitcode" in err and "Signal 9" in err, err[-3000:]  # torchrun names the rank that died and why
    assert not (out / "analysis.json").exists()  # nothing half-written
    r = _dq_analyze(model, out, "--nproc", "2", "--resume")
    assert r.returncode == 0, r.stderr[-4000:]
    assert "resuming the backward sweep" in r.stderr
    analyze(model, tmp_path / "one", _options())
    _assert_same(tmp_path / "one", out)


def test_resume_with_another_process_count_is_refused(tiny_analysis, tmp_path):
    _, out, _ = tiny_analysis
    import json
    import shutil

    from dq.analysis.analyze import STATE_FILE

    shutil.copytree(out, tmp_path / "a")
    state = json.loads((tmp_path / "a" / STATE_FILE).read_text())
    assert state["processes"] == 1
    state["processes"] = 2
    (tmp_path / "a" / STATE_FILE).write_text(json.dumps(state))
    from dq.errors import AnalysisError

    with pytest.raises(AnalysisError, match="--nproc 2"):
        analyze(Analysis.load(out / "analysis.json").model, tmp_path / "a", tiny_analysis[2], resume=True)


def test_shards_cover_the_sequences_in_order_and_deal_balances():
    from dq.analysis.ranks import Ranks

    for world in (1, 2, 3, 8):
        got = [i for r in range(world) for i in Ranks(r, world).shard(13)]
        assert got == list(range(13))
    # largest first, each to the least loaded rank (ties: the lower rank): 10 -> 0, 8 -> 1, 2 -> 1, 1 -> 0, 1 -> 1
    assert Ranks(0, 2).deal([10, 1, 1, 8, 2]) == [0, 0, 1, 1, 1]
    assert Ranks().deal([3, 2]) == [0, 0]


def test_steps_keep_the_previous_save_only(tmp_path):
    import torch

    from dq.analysis.checkpoints import Checkpoints

    ck = Checkpoints(tmp_path, rank=1)
    ck.clear()
    for step, prev in ((5, None), (4, 5), (3, 4), (2, 3)):
        ck.save_step("grad", step, previous=prev, grad=torch.full((1,), float(step)))
    assert ck.steps("grad") == [2, 3]
    assert float(ck.load_step("grad", 3)["grad"]) == 3.0
    assert Checkpoints(tmp_path, rank=0).steps("grad") == []  # another rank's files are not this rank's
    ck.drop_steps("grad")
    assert ck.steps("grad") == []
