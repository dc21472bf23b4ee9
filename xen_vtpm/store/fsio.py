"""Durable file operations and the mapping of OS failures to StorageError.

Every file the store publishes is written under a temporary name, fsync'd,
renamed into place and its directory fsync'd, so a crash leaves either the
old name or the complete new file, never a torn one.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from ..errors import DiskFull, StorageError

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_error(exc: BaseException, path: os.PathLike | str, action: str) -> StorageError:
    """One-line error naming the path, the OS cause and what to do next."""
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if "full" in text:
            return DiskFull(f"{path}: {action} failed: disk full ({text}); free space, then run `xen-vtpm recover`")
        return StorageError(f"{path}: {action} failed: {text}; check the file and its permissions, "
                            "then run `xen-vtpm recover`")
    code = getattr(exc, "errno", None)
    cause = os.strerror(code) if code else str(exc)
    if code in _SPACE_ERRNOS:
        return DiskFull(f"{path}: {action} failed: {cause}; free space, then run `xen-vtpm recover`")
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return StorageError(f"{path}: {action} failed: {cause}; make the state dir writable by this user, "
                            "then run `xen-vtpm recover`")
    return StorageError(f"{path}: {action} failed: {cause}; check the disk, then run `xen-vtpm recover`")


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_atomic(path: Path, data: bytes) -> None:
    """Publish ``data`` at ``path`` durably (temp name, fsync, rename, fsync dir)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise storage_error(exc, path, "writing") from None


def unlink_if_present(path: Path) -> bool:
    """Remove ``path``; a file already gone is not an error (recovery re-runs this)."""
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise storage_error(exc, path, "removing") from None


def _unlink_quietly(path: Path) -> None:
    # Best effort while already reporting a failure: the original error is the useful one.
    try:
        os.unlink(path)
    except OSError:
        pass
