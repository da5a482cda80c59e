"""The pipeline's progress log and stage markers (``done.json``)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from mlkv.files import atomic_json, clean_stale_temps, folder_lock

__all__ = ["say", "read_done", "mark_done"]


def say(msg: str) -> None:
    """One line of the pipeline's progress log, timestamped."""
    print(f"[mlkv reproduce {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def read_done(folder: Path) -> dict | None:
    """The ``done.json`` marker of a finished stage or run (what it recorded), or None if it is not finished."""
    marker = folder / "done.json"
    return json.loads(marker.read_text()) if marker.is_file() else None


def mark_done(folder: Path, info: dict) -> None:
    """Mark ``folder`` finished, recording ``info`` (atomically: a marker is whole or absent), holding the folder's
    lock; the temporary marker of a run killed while marking it is removed first."""
    with folder_lock(folder, "mlkv reproduce"):
        clean_stale_temps(folder / "done.json")
        atomic_json(folder / "done.json", info)
