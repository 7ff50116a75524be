"""``dq upload`` and the model card, on real quants of the tiny Llama, against a local Hub.

The Hub is ``tests/hub/fake_hub.py``: a threaded http.server on 127.0.0.1 speaking the protocol of the
calls huggingface_hub makes (repo create, preupload, LFS batch + basic PUT, commit). huggingface_hub's
Xet transfer (its default on the real Hub when hf_xet is installed) is switched off here, so the bytes
go through the LFS "basic" path; the Xet path itself is not exercised by these tests.
"""

from __future__ import annotations

import hashlib
import json
import re

import pytest

from dq.cli import main
from dq.hub.artifacts import FileRole, QuantKind, collect_quant
from dq.hub.card import CARD_MARKER, parse_front_matter
from dq.hub.errors import HubAuthError, HubOfflineError, HubUploadError, InvalidRepoIdError, NotAQuantError
from dq.hub.upload import plan_upload, upload, validate_repo_id
from tests.hub.fake_hub import FakeHub

TOKEN = "hf_test_token"
_FILE_RX = re.compile(r"`([\w.\-/]+\.(?:gguf|safetensors|json|md|jinja|model|dat))`")


@pytest.fixture
def hub_env(monkeypatch, tmp_path):
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(c, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    with FakeHub(TOKEN) as hub:
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        yield hub


@pytest.fixture(scope="module")
def gguf_quant(tiny_llama_dir, tiny_bf16_gguf, tmp_path_factory):
    """A real Q4_K_M GGUF of the tiny Llama made by the dq CLI with an imatrix, its plan and a dq eval-style report."""
    from dq.data import calibration_text
    from dq.quant.imatrix import write_imatrix
    from tests.imatrix_oracle import torch_imatrix

    out = tmp_path_factory.mktemp("gguf-quant")
    im = write_imatrix(out / "tiny-Q4_K_M.imatrix.gguf", torch_imatrix(tiny_llama_dir, calibration_text()[:4000], n_tokens=256))
    gguf = out / "tiny-Q4_K_M.gguf"
    assert main(["quantize", str(tiny_bf16_gguf), "-o", str(gguf), "--type", "Q4_K_M", "--imatrix", str(im)]) == 0
    import contextlib
    import io

    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        assert main(["quantize", str(tiny_bf16_gguf), "--type", "Q4_K_M", "--dry-run", "--json"]) == 0
    (out / "tiny-Q4_K_M.plan.json").write_text(buf.getvalue())
    # The shape of a `dq eval` report (dq.evals.report); the numbers are placeholders, not a measurement.
    (out / "tiny-Q4_K_M.eval.json").write_text(json.dumps({
        "version": 1, "quant": {"path": str(gguf)}, "base": {"path": str(tiny_llama_dir)},
        "metrics": {"kld_mean": 0.0123, "same_top": 0.951, "ppl_ratio": 1.021}}))
    return out


@pytest.fixture(scope="module")
def st_quant(tiny_llama_dir, tmp_path_factory):
    from dq.export.safetensors_bnb import quantize_safetensors_bnb

    out = tmp_path_factory.mktemp("st-quant") / "tiny-dyn-nf4"
    return quantize_safetensors_bnb(tiny_llama_dir, out, n_tokens=256,
                                    seq_len=128, keep_fraction=0.15).path


def _check_card(plan) -> dict:
    card = plan.card_path.read_text()
    assert CARD_MARKER in card
    fm = parse_front_matter(card)
    assert {"base_model", "tags", "quantized_by"} <= set(fm)
    named = set(_FILE_RX.findall(card))
    uploaded = {f.path_in_repo for f in plan.files}
    assert named, "the card names no files"
    assert named <= uploaded, f"card names files that are not uploaded: {named - uploaded}"
    for f in plan.files:
        assert f.path.is_file()
    return fm


def test_card_for_real_gguf_quant(gguf_quant):
    plan = plan_upload(gguf_quant, "dq-test/tiny-llama-GGUF", base_model="dq-test/tiny-llama")
    fm = _check_card(plan)
    assert fm["base_model"] == "dq-test/tiny-llama" and fm["base_model_relation"] == "quantized"
    assert fm["quantized_by"] == "dq-test" and fm["library_name"] == "gguf"
    assert {"gguf", "dq", "q4_k_m"} <= set(fm["tags"])
    roles = {f.path_in_repo: f.role for f in plan.files}
    assert roles == {"tiny-Q4_K_M.gguf": FileRole.MODEL, "tiny-Q4_K_M.imatrix.gguf": FileRole.IMATRIX,
                     "tiny-Q4_K_M.plan.json": FileRole.PLAN, "tiny-Q4_K_M.eval.json": FileRole.EVAL,
                     "README.md": FileRole.CARD}
    card = plan.card_path.read_text()
    model = plan.artifacts.by_role(FileRole.MODEL)[0]
    row = next(ln for ln in card.splitlines() if ln.startswith("| `tiny-Q4_K_M.gguf`"))
    assert f"{model.bits_per_weight:.3f}" in row and "0.0123" in row and "95.1%" in row
    assert 4.0 < model.bits_per_weight < 6.5
    assert "llama-cli --hf-repo dq-test/tiny-llama-GGUF --hf-file tiny-Q4_K_M.gguf" in card
    assert "ollama run hf.co/dq-test/tiny-llama-GGUF:Q4_K_M" in card
    assert "gguf_file=\"tiny-Q4_K_M.gguf\"" in card


def test_card_for_real_safetensors_quant(st_quant):
    plan = plan_upload(st_quant, "dq-test/tiny-llama-bnb-4bit", base_model="dq-test/tiny-llama")
    fm = _check_card(plan)
    assert fm["library_name"] == "transformers" and {"bitsandbytes", "nf4"} <= set(fm["tags"])
    art = plan.artifacts
    assert art.kind is QuantKind.SAFETENSORS
    names = {f.path_in_repo for f in plan.files}
    assert {"model.safetensors", "config.json", "dq_plan.json", "tokenizer.model", "README.md"} <= names
    card = plan.card_path.read_text()
    for m in json.loads((st_quant / "dq_plan.json").read_text())["modules"]:
        assert (f"| {m['name']} |" in card) == (not m["quantize"])
    # bits per weight from the real parameter count (packed 4-bit tensors counted by their true shape)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(st_quant)
    n_linear = cfg.num_hidden_layers * (2 * 256 * 256 + 2 * 256 * 128 + 3 * 256 * 512)
    n_expect = n_linear + 2 * cfg.vocab_size * 256 + (2 * cfg.num_hidden_layers + 1) * 256
    assert art.by_role(FileRole.MODEL)[0].n_params == n_expect


def test_upload_gguf_to_local_hub_and_resume(gguf_quant, hub_env):
    assert main(["upload", str(gguf_quant), "--repo", "me/tiny-GGUF", "--base-model", "dq-test/tiny-llama",
                 "--token", TOKEN]) == 0
    files = hub_env.state.repos["me/tiny-GGUF"]
    local = {p.name: p.read_bytes() for p in gguf_quant.iterdir() if not p.name.endswith("README.md")}
    local["README.md"] = (gguf_quant / "README.md").read_bytes()
    assert files == local
    assert hub_env.state.puts == 2  # the .gguf model and imatrix went through LFS
    calls = [c for c in hub_env.state.calls if c[0] == "POST"]
    assert calls[0] == ("POST", "/api/repos/create") and calls[-1][1].endswith("/commit/main")
    assert hub_env.state.validated[0]["base_model"] == "dq-test/tiny-llama"

    # a second run: the repo exists (409 is fine) and nothing already stored is sent again
    assert main(["upload", str(gguf_quant), "--repo", "me/tiny-GGUF", "--base-model", "dq-test/tiny-llama",
                 "--token", TOKEN]) == 0
    assert hub_env.state.puts == 2 and len(hub_env.state.commits) == 2


def test_upload_safetensors_resumes_after_failed_commit(st_quant, hub_env, monkeypatch):
    import dq.hub.upload as up

    monkeypatch.setattr(up, "LARGE_FILE_BYTES", 400_000)  # the tiny checkpoint counts as large
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    plan = plan_upload(st_quant, "me/tiny-bnb", base_model="dq-test/tiny-llama")
    assert [op.path_in_repo for op in plan.ops if op.action == "upload_large"] == ["model.safetensors"]
    hub_env.state.fail_next_commit = True
    with pytest.raises(HubUploadError, match="HTTP 400"):
        upload(plan)
    assert hub_env.state.puts == 1 and hub_env.state.repos["me/tiny-bnb"] == {}
    url = upload(plan)
    assert hub_env.state.puts == 1, "the large file was sent again instead of resuming"
    assert url.startswith(hub_env.endpoint + "/me/tiny-bnb/commit/")
    files = hub_env.state.repos["me/tiny-bnb"]
    assert files["model.safetensors"] == (st_quant / "model.safetensors").read_bytes()
    assert hashlib.sha256(files["README.md"]).digest() == hashlib.sha256(plan.card_path.read_bytes()).digest()
    assert set(files) == {f.path_in_repo for f in plan.files}


def test_dry_run_prints_every_operation_and_writes_card(gguf_quant, tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    (gguf_quant / "README.md").unlink(missing_ok=True)
    assert main(["upload", str(gguf_quant / "tiny-Q4_K_M.gguf"), "--repo", "me/x", "--dry-run",
                 "--base-model", "a/b"]) == 0
    out = capsys.readouterr().out
    assert "create repo me/x" in out and "commit to me/x@main" in out
    for name in ("tiny-Q4_K_M.gguf", "tiny-Q4_K_M.imatrix.gguf", "tiny-Q4_K_M.plan.json", "tiny-Q4_K_M.eval.json"):
        assert f"-> me/x/{name}" in out
    card = gguf_quant / "tiny-Q4_K_M.README.md"
    assert card.is_file() and "-> me/x/README.md" in out
    assert not (gguf_quant / "README.md").exists()


def test_user_written_readme_is_kept(st_quant, tmp_path):
    import shutil

    d = tmp_path / "q"
    shutil.copytree(st_quant, d)
    (d / "README.md").write_text("---\nbase_model: a/b\n---\n# mine\n")
    plan = plan_upload(d, "me/x")
    assert plan.card_path.read_text() == "---\nbase_model: a/b\n---\n# mine\n"
    assert [f.path_in_repo for f in plan.files].count("README.md") == 1


# --- bad input ------------------------------------------------------------------------------------

@pytest.mark.parametrize("repo", ["noslash", "a/b/c", "me/bad name", "me/x--y", "-me/x", "me/x.git", "me/", "me/" + "a" * 97])
def test_invalid_repo_id(repo):
    with pytest.raises(InvalidRepoIdError, match="e.g. --repo"):
        validate_repo_id(repo)


def test_invalid_repo_id_cli(st_quant, capsys):
    assert main(["upload", str(st_quant), "--repo", "not a repo", "--dry-run"]) == 2
    assert "namespace/name" in capsys.readouterr().err


def test_not_a_quant(tiny_llama_dir, tiny_bf16_gguf, tmp_path, capsys):
    with pytest.raises(NotAQuantError, match="not a quant"):
        collect_quant(tiny_llama_dir)  # a 16-bit HF checkpoint
    with pytest.raises(NotAQuantError, match="unquantized GGUF"):
        collect_quant(tiny_bf16_gguf)
    (tmp_path / "notes.txt").write_text("hello")
    assert main(["upload", str(tmp_path), "--repo", "me/x", "--dry-run"]) == 2
    assert "dq quantize" in capsys.readouterr().err
    (tmp_path / "fake.gguf").write_bytes(b"not a gguf at all")
    assert main(["upload", str(tmp_path), "--repo", "me/x", "--dry-run"]) == 2


def test_no_token_offline_unreachable_and_refused(st_quant, hub_env, monkeypatch):
    import huggingface_hub.constants as c

    plan = plan_upload(st_quant, "me/t", base_model="a/b")
    with pytest.raises(HubAuthError, match="hf auth login"):
        upload(plan)
    with pytest.raises(HubAuthError, match="refused the token"):
        upload(plan, token="hf_wrong")
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubOfflineError, match="HF_HUB_OFFLINE"):
        upload(plan, token=TOKEN)
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", False)
    with pytest.raises(HubOfflineError, match="cannot reach"):
        upload(plan, token=TOKEN, endpoint="http://127.0.0.1:9")
    assert hub_env.state.commits == []


def test_upload_sends_every_shard_of_a_split(tiny_bf16_gguf, hub_env, tmp_path):
    out = tmp_path / "split"
    out.mkdir()
    assert main(["quantize", str(tiny_bf16_gguf), "-o", str(out / "tiny-Q8_0.gguf"), "--type", "Q8_0",
                 "--split-max-size", "300K"]) == 0
    shards = sorted(out.glob("tiny-Q8_0-*-of-*.gguf"))
    assert len(shards) >= 3
    art = collect_quant(shards[0])
    assert [f.path for f in art.by_role(FileRole.MODEL)] == shards
    assert main(["upload", str(shards[0]), "--repo", "me/tiny-split", "--base-model", "dq-test/tiny-llama",
                 "--token", TOKEN]) == 0
    stored = hub_env.state.repos["me/tiny-split"]
    assert all(stored[s.name] == s.read_bytes() for s in shards)
