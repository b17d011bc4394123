"""Upload of a publish folder to the Hugging Face Hub (`huggingface_hub.HfApi.create_repo` / `upload_folder`)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from hf_r2.hub.model_card import CARD_FILE
from hf_r2.hub.publish_folder import PUBLISH_MARKER


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    token: str | None = None,
    private: bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload hf_r2 checkpoint",
    endpoint: str | None = None,
    api: Any = None,
) -> Any:
    """Creates `repo_id` (if it does not exist) and uploads `folder` to it as one commit.

    Args:
        folder (`str` or `os.PathLike`): A folder written by `prepare_publish_folder`.
        repo_id (`str`): `"user/name"` or `"org/name"`.
        token (`str`, *optional*): Hub token; defaults to the logged-in one.
        private (`bool`, *optional*): Visibility when the repository is created.
        revision (`str`, *optional*): Branch to commit to.
        commit_message (`str`, *optional*): Commit message.
        endpoint (`str`, *optional*): Hub endpoint (e.g. a private Hub); defaults to huggingface.co / `HF_ENDPOINT`.
        api (`huggingface_hub.HfApi`, *optional*): Client to use instead of `HfApi(endpoint, token)`.

    Returns:
        The `CommitInfo` of the upload.

    Raises:
        FileNotFoundError: If `folder` lacks the card, the config or the safetensors weights.
    """
    folder = Path(folder)
    missing = [n for n in (CARD_FILE, "config.json") if not (folder / n).is_file()]
    if not list(folder.glob("*.safetensors")):
        missing.append("*.safetensors")
    if missing:
        raise FileNotFoundError(f"{folder} is not a publish folder: {missing} missing (use prepare_publish_folder).")
    if not isinstance(repo_id, str) or not repo_id.strip("/") or repo_id.count("/") > 1:
        raise ValueError(f"repo_id must look like 'name' or 'user/name', got {repo_id!r}.")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(endpoint=endpoint, token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    target = getattr(url, "repo_id", None) or repo_id
    return api.upload_folder(
        repo_id=target,
        folder_path=str(folder),
        commit_message=commit_message,
        revision=revision,
        repo_type="model",
        ignore_patterns=[PUBLISH_MARKER],
    )
