"""Local model loaders (CLIP, WD14, BLIP). Shared here: telling a folder from a hub id, and the download hint."""

from __future__ import annotations

import re
from pathlib import Path

_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


def looks_like_path(model: str) -> bool:
    """Written as a path (./x, ../x, /x, ~/x, x/, a/b/c, a Windows path), so never a Hugging Face repo id."""
    m = model.replace("\\", "/")
    return (
        m.startswith(("./", "../", "/", "~"))
        or m in (".", "..")
        or m.endswith("/")
        or m.count("/") >= 2
        or bool(re.match(r"^[A-Za-z]:/", m))
    )


def is_hub_id(model: str) -> bool:
    """``owner/name`` as the Hub spells repo ids, not written as a path and not an existing file or folder."""
    return bool(_HUB_ID.match(model)) and not looks_like_path(model) and not Path(model).expanduser().exists()


def hf_download(repo: str, files: tuple[str, ...] = (), local_dir: str | None = None) -> str:
    """The `hf download` command (huggingface_hub >= 0.34 installs `hf`) that fetches ``files`` of ``repo``."""
    parts = ["hf", "download", repo, *files]
    if local_dir:
        parts += ["--local-dir", local_dir]
    return " ".join(parts)


def local_dir_for(repo: str) -> str:
    """A folder name for a downloaded repo: its name part (``owner/name`` -> ``name``)."""
    return repo.rstrip("/").split("/")[-1] or "model"
