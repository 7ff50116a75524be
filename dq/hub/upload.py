"""Publish a quant to the Hugging Face Hub with huggingface_hub: repo, files, plan, imatrix, model card.

The upload is one commit. Large files (>= ``LARGE_FILE_BYTES``) are sent first, one at a time, with
``HfApi.preupload_lfs_files``: if the process dies, running ``dq upload`` again skips every file the Hub
already holds (the LFS batch endpoint answers "present"; on the real Hub, Xet storage additionally
deduplicates chunks of a half-sent file), so an interrupted multi-GB upload resumes file by file. Then
``create_commit`` adds everything at once, so the repo never shows a half-published quant.

``dry_run`` makes no network call: it writes the card locally and returns the operations.

Example:
    >>> p = plan_upload("out/smollm2-Q4_K_M.gguf", "me/SmolLM2-135M-GGUF")   # doctest: +SKIP
    >>> upload(p)                                                           # doctest: +SKIP
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from dq.atomic import atomic_path
from dq.hub.artifacts import FileRole, QuantArtifacts, QuantFile, collect_quant
from dq.hub.card import CARD_MARKER, render_card
from dq.hub.errors import HubAuthError, HubOfflineError, HubUploadError, InvalidRepoIdError

__all__ = ["LARGE_FILE_BYTES", "UploadOp", "UploadPlan", "validate_repo_id", "resolve_token", "plan_upload",
           "upload"]

log = logging.getLogger(__name__)

LARGE_FILE_BYTES = 10 * 2**20  # the Hub stores files above 10 MiB (and binaries) in LFS/Xet
_NAME = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9._-]{0,94}[A-Za-z0-9])?$")


def validate_repo_id(repo_id: str) -> str:
    """Check ``namespace/name`` the way the Hub does (``huggingface_hub.utils.validate_repo_id`` plus the
    namespace the upload needs).

    Raises:
        InvalidRepoIdError: with the rule that was broken and an example.
    """
    example = "e.g. --repo your-user/SmolLM2-135M-dq-GGUF"
    if not isinstance(repo_id, str) or repo_id.count("/") != 1:
        raise InvalidRepoIdError(f"repo id {repo_id!r} must be namespace/name (one '/'); {example}")
    ns, name = repo_id.split("/")
    for part, what in ((ns, "namespace"), (name, "name")):
        if not _NAME.match(part) or "--" in part or ".." in part:
            raise InvalidRepoIdError(
                f"repo id {repo_id!r}: {what} {part!r} may hold only letters, digits, '-', '_', '.', must start and "
                f"end with a letter or digit, be at most 96 characters and contain no '--' or '..'; {example}"
            )
    if name.endswith(".git"):
        raise InvalidRepoIdError(f"repo id {repo_id!r} must not end with .git; {example}")
    from huggingface_hub.utils import HFValidationError
    from huggingface_hub.utils import validate_repo_id as hf_validate

    try:
        hf_validate(repo_id)
    except HFValidationError as exc:
        raise InvalidRepoIdError(f"repo id {repo_id!r} is not valid on the Hub ({exc}); {example}") from exc
    return repo_id


def _offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def resolve_token(token: str | None = None) -> str:
    """The token to use: ``token``, else huggingface_hub's usual places (``HF_TOKEN``, the token file that
    ``hf auth login`` writes).

    Raises:
        HubOfflineError: ``HF_HUB_OFFLINE`` is set.
        HubAuthError: no token anywhere.
    """
    if _offline():
        raise HubOfflineError("HF_HUB_OFFLINE is set, so nothing can be uploaded; unset it (or use --dry-run)")
    from huggingface_hub import get_token

    token = token or get_token()
    if not token:
        raise HubAuthError(
            "no Hugging Face token found; run `hf auth login`, or set HF_TOKEN, or pass --token "
            "(a token with write access: https://huggingface.co/settings/tokens)"
        )
    return token


@dataclass(frozen=True)
class UploadOp:
    """One step of an upload, as ``--dry-run`` prints it."""

    action: str  # "create_repo", "upload_large", "add", "commit"
    path_in_repo: str | None = None
    local_path: Path | None = None
    size: int | None = None

    def describe(self, repo_id: str) -> str:
        if self.action == "create_repo":
            return f"create repo {repo_id} (model; skipped if it exists)"
        if self.action == "commit":
            return f"commit to {repo_id}@main: {self.path_in_repo}"
        how = "pre-upload (LFS/Xet, resumable per file)" if self.action == "upload_large" else "add"
        return f"{how} {self.local_path} -> {repo_id}/{self.path_in_repo} ({self.size:,} bytes)"


@dataclass(frozen=True)
class UploadPlan:
    repo_id: str
    artifacts: QuantArtifacts
    card_path: Path  # the local README written for this upload (or the user's own)
    files: tuple[QuantFile, ...]  # everything to upload, README.md included
    ops: tuple[UploadOp, ...]
    private: bool = False
    commit_message: str = "Upload quant with dq"

    def describe(self) -> list[str]:
        return [op.describe(self.repo_id) for op in self.ops]


def plan_upload(
    path: str | Path,
    repo_id: str,
    *,
    base_model: str | None = None,
    quantized_by: str | None = None,
    imatrix: list[Path] | None = None,
    plan: Path | None = None,
    evals: list[Path] | None = None,
    private: bool = False,
) -> UploadPlan:
    """Collect the quant, write its model card locally, and list the upload's operations (no network).

    The card goes to ``PATH/README.md`` for a directory (a README.md without dq's marker line is the
    user's and is kept) and to ``<stem>.README.md`` beside a single GGUF; it is uploaded as README.md.

    Raises:
        InvalidRepoIdError, NotAQuantError, ModelNotFoundError.
    """
    validate_repo_id(repo_id)
    art = collect_quant(path, imatrix=imatrix, plan=plan, evals=evals)
    path = Path(path).expanduser()
    user_card = next((f for f in art.files if f.role is FileRole.CARD), None)
    if user_card is not None:
        card_path = user_card.path
        log.info("keeping the existing %s (no dq marker line)", card_path)
        files = art.files
    else:
        card_path = path / "README.md" if path.is_dir() else path.with_name(f"{path.stem}.README.md")
        text = render_card(art, repo_id, base_model=base_model, quantized_by=quantized_by)
        assert CARD_MARKER in text
        with atomic_path(card_path) as tmp:
            tmp.write_text(text, encoding="utf-8")
        files = art.files + (QuantFile(card_path, "README.md", FileRole.CARD, card_path.stat().st_size),)
    ops = [UploadOp("create_repo")]
    ops += [UploadOp("upload_large", f.path_in_repo, f.path, f.size) for f in files if f.size >= LARGE_FILE_BYTES]
    ops += [UploadOp("add", f.path_in_repo, f.path, f.size) for f in files if f.size < LARGE_FILE_BYTES]
    ops.append(UploadOp("commit", f"{len(files)} files"))
    return UploadPlan(repo_id=repo_id, artifacts=art, card_path=card_path, files=files, ops=tuple(ops),
                      private=private)


def _transport_errors() -> tuple[type[BaseException], ...]:
    """Connection-level exception classes of whichever HTTP client this huggingface_hub uses
    (httpx2 in 2.x, httpx in 1.x, requests before)."""
    import importlib

    out: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module, name in (("httpx2", "TransportError"), ("httpx", "TransportError"),
                         ("requests", "ConnectionError"), ("requests", "Timeout")):
        try:
            out.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(out)


def _hub_call(what: str, endpoint: str, fn, *args, **kwargs):
    """Run a huggingface_hub call, turning its failures into dq errors that say what to do."""
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    try:
        return fn(*args, **kwargs)
    except OfflineModeIsEnabled as exc:
        raise HubOfflineError(f"{what}: HF_HUB_OFFLINE is set; unset it to upload") from exc
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else None
        if status in (401, 403):
            raise HubAuthError(
                f"{what}: the Hub refused the token (HTTP {status}); use a token with write access to the "
                f"namespace (`hf auth login`, or HF_TOKEN)"
            ) from exc
        raise HubUploadError(f"{what}: the Hub answered HTTP {status}: {exc}") from exc
    except ValueError as exc:  # e.g. "Invalid metadata in README.md" from the Hub's YAML check
        raise HubUploadError(f"{what}: {exc}") from exc
    except _transport_errors() as exc:
        raise HubOfflineError(f"{what}: cannot reach {endpoint} ({exc}); check the connection or HF_ENDPOINT") from exc


def upload(plan: UploadPlan, *, token: str | None = None, endpoint: str | None = None,
           progress=None) -> str:
    """Run the upload; returns the commit URL.

    Args:
        plan: from :func:`plan_upload`.
        token: overrides huggingface_hub's token lookup.
        endpoint: overrides ``HF_ENDPOINT`` (default https://huggingface.co).
        progress: ``progress(done_files, total_files, path_in_repo)`` after each large file.

    Raises:
        HubAuthError, HubOfflineError, HubUploadError.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, constants

    token = resolve_token(token)
    # HF_ENDPOINT is read by huggingface_hub at import; honour it when it is set later (tests, notebooks).
    endpoint = (endpoint or os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")
    api = HfApi(endpoint=endpoint, token=token)
    repo = plan.repo_id
    url = _hub_call("create repo", endpoint, api.create_repo, repo, repo_type="model", private=plan.private,
                    exist_ok=True)
    log.info("repo %s", url)
    ops = {f.path_in_repo: CommitOperationAdd(path_in_repo=f.path_in_repo, path_or_fileobj=str(f.path))
           for f in plan.files}
    large = [f for f in plan.files if f.size >= LARGE_FILE_BYTES]
    for i, f in enumerate(large, 1):
        log.info("uploading %s (%s bytes)", f.path_in_repo, f"{f.size:,}")
        _hub_call(f"upload {f.path_in_repo}", endpoint, api.preupload_lfs_files, repo, [ops[f.path_in_repo]])
        if progress:
            progress(i, len(large), f.path_in_repo)
    info = _hub_call("commit", endpoint, api.create_commit, repo, operations=list(ops.values()),
                     commit_message=plan.commit_message)
    log.info("committed %d files: %s", len(ops), info.commit_url)
    return str(info.commit_url)
