"""Publishing quants to the Hugging Face Hub: collect the files, render the model card, upload.

``collect_quant`` (artifacts) -> ``render_card`` (card) -> ``plan_upload``/``upload`` (upload).
huggingface_hub is imported only when an upload or a repo-id check runs.
"""

from dq.hub.errors import HubAuthError, HubOfflineError, HubUploadError, InvalidRepoIdError, NotAQuantError

__all__ = ["HubAuthError", "HubOfflineError", "HubUploadError", "InvalidRepoIdError", "NotAQuantError"]
