"""Writing files without leaving half of one, and one writer per output folder: the bottom floor of the package.

The atomic writers ``atomic_write`` / ``atomic_json`` / ``atomic_dir`` (a temporary name in the same folder, then
``os.replace``), the output-folder lock ``folder_lock``, ``clean_stale_temps`` / ``clean_stale_temps_under`` for
the temporary files a killed writer left, and ``sha256_file`` (checkpoint integrity, the GGUF cache's key). Imports
nothing of mlkv but its error type, so every subpackage can use it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import os
import shutil
import socket
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mlkv.errors import UsageError


def sha256_file(path: str | os.PathLike) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


# ---- atomic writes --------------------------------------------------------------------------------------------------
def temp_path(path: str | os.PathLike) -> Path:
    """A unique hidden name next to ``path`` (same file system, so ``os.replace`` is atomic)."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def atomic_write(path: str | os.PathLike, content: str | bytes | Callable[[IO[bytes]], Any]) -> Path:
    """Write ``content`` (text, bytes, or a function given the open binary file) to a temporary file beside
    ``path``, flush it to disk, then rename it onto ``path``: readers see the old file or the new one, never part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            if callable(content):
                content(f)
            else:
                f.write(content.encode("utf-8") if isinstance(content, str) else content)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _json_default(obj: Any) -> Any:
    """JSON for numpy scalars, sets, dtypes, paths and callables (as their ``item()`` or ``str``)."""
    if hasattr(obj, "item") and callable(obj.item):
        with contextlib.suppress(TypeError, ValueError):
            return obj.item()
    if isinstance(obj, (set, frozenset)):
        return list(obj)
    return str(obj)


def atomic_json(path: str | os.PathLike, obj: Any, indent: int | None = 2) -> Path:
    """``atomic_write`` of ``obj`` as JSON (UTF-8, non-ASCII kept, numpy scalars and the like converted)."""
    return atomic_write(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=_json_default) + "\n")


class FolderInUseError(UsageError):
    """Another live process holds the folder's lock; the message names it."""


def _lock_path(folder: Path) -> Path:
    return folder.parent / f".{folder.name}.lock"


@contextlib.contextmanager
def folder_lock(folder: str | os.PathLike, command: str = "mlkv", wait: bool = False) -> Iterator[Path]:
    """Hold an exclusive OS lock on ``folder`` (existing or not) while the block runs.

    The lock is ``flock`` on ``.<name>.lock`` beside the folder: the kernel releases it when the holder exits, even
    by ``kill -9``, so a lock never goes stale. A second writer gets a ``FolderInUseError`` naming the holder's
    pid, command and start time, or with ``wait`` blocks until the holder is done (saying so on stderr). The holder
    removes the file when it is done; a taker checks that the file it locked is still the one at the path (the
    usual unlink race), so two processes never both hold it."""
    folder = Path(folder).expanduser().absolute()
    path = _lock_path(folder)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        fd = _take_lock(path, folder, wait)
    except OSError as exc:
        if exc.errno not in (errno.EROFS, errno.EACCES, errno.EPERM):
            raise
        raise UsageError(f"{folder}: cannot write there ({os.strerror(exc.errno)}: {exc.filename or path}); "
                         "choose an output folder on a writable file system") from None
    try:
        info = (f"pid {os.getpid()} on {socket.gethostname()} ({command}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')})")
        os.ftruncate(fd, 0)
        os.pwrite(fd, info.encode(), 0)
        yield folder
    finally:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()  # still holding the lock: a process waiting on this inode re-checks and retries
        os.close(fd)  # releases the lock


def _take_lock(path: Path, folder: Path, wait: bool = False) -> int:
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 4096, 0).decode("utf-8", "replace").strip() or "another process"
            if wait:
                print(f"mlkv: waiting for {folder}, in use by {holder}", file=sys.stderr, flush=True)
                fcntl.flock(fd, fcntl.LOCK_EX)
            else:
                os.close(fd)
                raise FolderInUseError(f"{folder} is in use by {holder}; wait for it to finish or choose another "
                                       "output folder") from None
        try:
            if os.fstat(fd).st_ino == os.stat(path).st_ino:
                return fd
        except FileNotFoundError:
            pass
        os.close(fd)  # the holder removed this file after we opened it: take the new one


def clean_stale_temps(dst: str | os.PathLike) -> list[Path]:
    """Remove the hidden ``.<name>.tmp-*`` folders and files a killed writer of ``dst`` left behind.

    Call it only while holding ``folder_lock(dst)``: then no live writer owns them. Says what it removed."""
    dst = Path(dst)
    stale = sorted(dst.parent.glob(f".{dst.name}.tmp-*")) + sorted(dst.parent.glob(f".{dst.name}.old.tmp-*"))
    for path in stale:
        shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
        print(f"mlkv: removed {path}, left by an interrupted earlier run", file=sys.stderr)
    return stale


def clean_stale_temps_under(folder: str | os.PathLike) -> list[Path]:
    """``clean_stale_temps`` for every file and folder anywhere under ``folder``: the hidden ``.<name>.tmp-*``
    leftovers of writers killed inside it. Call it only while holding ``folder_lock(folder)`` in a program whose
    writers under ``folder`` all work for the lock's holder (``mlkv reproduce`` and its evaluation processes), so
    that none is alive when a new holder starts (an orphaned evaluation process of a killed run could still be:
    its lost result file is made again). Says what it removed."""
    stale = sorted(p for p in Path(folder).rglob(".*.tmp-*") if p.exists())
    for path in stale:
        if path.exists():  # not inside a stale folder removed just before
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
            print(f"mlkv: removed {path}, left by an interrupted earlier run", file=sys.stderr)
    return stale


@contextlib.contextmanager
def atomic_dir(dst: str | os.PathLike, overwrite: bool = False, command: str = "mlkv") -> Iterator[Path]:
    """Yield a temporary folder beside ``dst``; on success it becomes ``dst`` by one rename.

    The whole write holds ``folder_lock(dst)``, so two writers of one destination cannot both succeed, and stale
    temporary folders of a killed writer are removed first. With ``overwrite``, an existing ``dst`` is renamed
    aside and deleted only after the new folder is in place, so a crash at any point leaves the old folder or the
    new one. On an exception the temporary folder is removed and ``dst`` is untouched."""
    dst = Path(dst)
    with folder_lock(dst, command):
        if dst.exists() and not overwrite:
            raise FileExistsError(f"{dst} already exists; pass --overwrite to replace it")
        clean_stale_temps(dst)
        tmp = temp_path(dst)
        tmp.mkdir()
        try:
            yield tmp
            old = None
            if dst.exists():
                old = temp_path(dst.with_name(dst.name + ".old"))
                os.replace(dst, old)
            os.replace(tmp, dst)
            if old is not None:
                shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
