"""The one data-folder resolver: where the shared data (tokenizers, corpus, evaluation sets) is.

Order: an explicit folder (``--data-dir``), else ``$MLKV_DATA``, else ``../shared/data`` beside the working
directory, else a ``shared/data`` beside any folder above this file (a checkout installed with ``pip install -e``).
A non-editable install has no checkout above it: then only the flag, the variable or the working directory count.
"""

from __future__ import annotations

import os
from pathlib import Path

#: Environment variable and command-line flag that set the shared data folder.
DATA_ENV = "MLKV_DATA"
DATA_FLAG = "--data-dir"


class DataFileNotFoundError(FileNotFoundError):
    """A shared data file or folder is missing; the message names it and how to point mlkv at the data."""


def _candidates() -> list[Path]:
    found = [Path.cwd() / ".." / "shared" / "data"]
    found += [parent / ".." / "shared" / "data" for parent in Path(__file__).resolve().parents
              if (parent / "pyproject.toml").is_file()]  # the checkout root of an editable install
    return found


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The shared data folder by the order above. It may not exist (callers check, tests skip)."""
    if data_dir:
        return Path(data_dir).expanduser()
    env = os.environ.get(DATA_ENV)
    if env:
        return Path(env).expanduser()
    candidates = _candidates()
    for candidate in candidates:
        if candidate.is_dir():
            return candidate.resolve()
    return candidates[0]


def _origin(data_dir) -> str:
    return "given" if data_dir else (f"from ${DATA_ENV}" if os.environ.get(DATA_ENV) else "default")


def require_data_dir(data_dir: str | os.PathLike | None = None, holding: str = "corpus/gutenberg",
                     hint: str = "") -> Path:
    """``default_data_dir(data_dir)`` if it holds ``holding``, else a ``DataFileNotFoundError`` naming the folder,
    the flag and the variable."""
    root = default_data_dir(data_dir)
    if (root / holding).exists():
        return root.resolve()
    raise DataFileNotFoundError(
        f"the shared data ({holding}, tokenizers, eval) was not found in {root} ({_origin(data_dir)}); pass "
        f"{DATA_FLAG} DIR or set {DATA_ENV}=DIR{'. ' + hint if hint else ''}")


def data_file(data_dir: str | os.PathLike | None, relative: str) -> Path:
    """``<data folder>/<relative>``; a ``DataFileNotFoundError`` naming the file and the flag/variable to set."""
    root = default_data_dir(data_dir)
    path = root / relative
    if not path.is_file():
        raise DataFileNotFoundError(
            f"evaluation data file not found: {path}. Set {DATA_FLAG} or the {DATA_ENV} environment variable to "
            f"the shared data folder (the one holding eval/ and corpus/); the data folder now is {root} "
            f"({_origin(data_dir)})."
        )
    return path
