"""Room on the disk: a full disk recognised in whatever error a write raised, and a write that cannot fit refused
before any work starts.

A full disk surfaces as ``OSError(ENOSPC)``, inside ``torch.save``'s ``RuntimeError``, or as safetensors' own
error ("No space left on device (os error 28)"), which would otherwise read as a corrupt file. ``check_room`` is
the early form: given a lower bound of what a command will write, it refuses at once rather than after the work.
"""

from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

from mlkv.errors import UsageError

__all__ = ["DiskSpaceError", "disk_full", "free_space", "check_room"]


class DiskSpaceError(UsageError):
    """What a command will write does not fit the free space of its file system; the message says both."""


def disk_full(exc: BaseException | None) -> bool:
    """Whether ``exc`` (or an error it was raised from) is a full disk: ``OSError(ENOSPC)``, also inside
    ``torch.save``'s RuntimeError, or safetensors' "No space left on device"."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or "No space left on device" in str(exc):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _existing(path: Path) -> Path:
    """``path`` or its nearest existing ancestor (where a folder about to be made will live)."""
    path = Path(path).expanduser().absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def free_space(path: str | os.PathLike) -> str:
    """``"the file system of /mnt: 3 MiB free"`` for the file system that holds ``path`` (or would)."""
    path = _existing(Path(path))
    mount = path
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    return f"the file system of {mount}: {shutil.disk_usage(path).free / 2**20:.0f} MiB free"


def check_room(folder: str | os.PathLike, needed: int, what: str) -> None:
    """Raise ``DiskSpaceError`` when ``needed`` bytes (a lower bound of ``what`` a command writes into ``folder``)
    exceed the free space of ``folder``'s file system."""
    if shutil.disk_usage(_existing(Path(folder))).free < needed:
        raise DiskSpaceError(f"{folder}: no room on the disk for {what} (at least {needed / 2**20:.0f} MiB; "
                             f"{free_space(folder)}): free some disk space or write elsewhere")
