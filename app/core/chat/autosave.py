"""The conversation held with each model, kept between runs so that quitting never loses it.

One file per model in a folder the app chooses, named by a digest of the model's resolved folder
(or Hub id), so that opening the same model again finds its conversation. Files are replaced
whole, never half-written; an empty conversation removes its file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

from app.core.chat.session import Conversation


def model_key(model: str) -> str:
    """The same for every way of naming one model folder; a Hub id stays as it is."""
    folder = Path(model).expanduser()
    return str(folder.resolve()) if folder.exists() else model


def autosave_path(folder: Path, model: str) -> Path:
    digest = hashlib.sha256(model_key(model).encode("utf-8")).hexdigest()[:20]
    return Path(folder) / f"{digest}.json"


def autosave_conversation(conversation: Conversation, folder: Path, model: str) -> None:
    """Keep the conversation held with model, replacing what was kept before; an empty one removes it."""
    path = autosave_path(folder, model)
    if not conversation.messages:
        path.unlink(missing_ok=True)
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    conversation.save(partial)
    os.replace(partial, path)


def restore_conversation(folder: Path, model: str) -> Conversation | None:
    """The conversation last held with model, or None. Raises FrankenMoEError for a file it cannot read."""
    path = autosave_path(folder, model)
    return Conversation.load(path) if path.is_file() else None
