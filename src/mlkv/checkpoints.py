"""Checkpoint folders: which files make one and which travel with the weights.

``TOKENIZER_FILES`` (what defines a tokenizer) and ``COMPANION_FILES`` (what travels with the weights when a
checkpoint is converted or trained), ``has_weights`` / ``require_checkpoint``, ``companion_files`` /
``copy_companions``. Loading a model is ``mlkv.model.loading``; writing files safely is ``mlkv.files``.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

#: Files that define a tokenizer in a checkpoint or tokenizer folder (also hashed into the token cache's key).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "tokenizer.model",
    "spiece.model",
)
#: Files copied beside the weights when a checkpoint is converted or trained: the tokenizer, its chat template
#: (inside ``tokenizer_config.json`` or its own file) and the generation defaults.
COMPANION_FILES = TOKENIZER_FILES + ("chat_template.jinja", "generation_config.json")


def has_weights(folder: str | os.PathLike) -> bool:
    folder = Path(folder)
    return any(folder.glob("*.safetensors")) or any(folder.glob("pytorch_model*.bin"))


def require_checkpoint(folder: str | os.PathLike, what: str = "model") -> Path:
    """``folder`` as a Path if it holds ``config.json`` and weights, else a ``FileNotFoundError`` naming ``what``."""
    path = Path(folder).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{what} {folder}: not a checkpoint directory (no config.json)")
    if not has_weights(path):
        raise FileNotFoundError(f"{what} {folder}: config.json but no weights (*.safetensors); an interrupted save? "
                                "Re-run the command that wrote it")
    return path


def companion_files(source: str | os.PathLike | None) -> dict[str, Path]:
    """``{name in the checkpoint: file}`` for the tokenizer and generation files of ``source``: a folder (its
    ``COMPANION_FILES``), or a single tokenizer file (saved as ``tokenizer.json``)."""
    if not source:
        return {}
    path = Path(source).expanduser()
    if path.is_file():
        return {"tokenizer.json": path}
    return {name: path / name for name in COMPANION_FILES if (path / name).is_file()}


def copy_companions(files: dict[str, Path], folder: Path) -> None:
    """Copy ``companion_files(...)`` into ``folder``."""
    for name, source in files.items():
        shutil.copyfile(source, folder / name)
