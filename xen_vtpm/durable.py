"""Publishing a file so that a crash or a power cut leaves the old file or the complete new one.

A rename is atomic but not durable: until the directory itself is fsync'd, the new entry lives
only in the page cache, and a power cut can bring back the old name — or no name at all for a
file that did not exist before.  So every file the tool publishes (the sealed host key, the
config, packs, pack indexes, manifests, a vTPM image put back) goes through the same four
steps: write under a temporary name → fsync the file → rename over the final name → fsync the
directory.  Orders that depend on one publish reaching the disk before another (the sealed key
only after the catalog head, a vTPM image before the manager entry that names it) hold only
because ``publish`` returns after the directory fsync.

OS failures become one-line ``StorageError``s (``DiskFull`` for a full disk or quota) naming the
path, the cause and the next step.
"""
from __future__ import annotations

import errno
import os
import sqlite3
from pathlib import Path

from .errors import DiskFull, StorageError

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_error(exc: BaseException, path: os.PathLike[str] | str, action: str) -> StorageError:
    """One-line error naming the path, the OS (or SQLite) cause and what to do next."""
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


def fsync_dir(path: os.PathLike[str] | str) -> None:
    """Make the entries of directory ``path`` (a rename, a create, an unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: os.PathLike[str] | str, mode: int = 0o777, *, what: str = "creating the directory") -> None:
    """``mkdir -p`` whose new entries survive a power cut: each directory it creates is followed by
    an fsync of its parent, since a file published durably inside a directory whose own entry
    was lost is lost with it.  ``mode`` applies to the last one, as with ``Path.mkdir``."""
    path = Path(path)
    missing = []
    while not path.is_dir():
        missing.append(path)
        path = path.parent
    try:
        for d in reversed(missing):
            d.mkdir(mode if d == missing[0] else 0o777, exist_ok=True)
            fsync_dir(d.parent)
    except OSError as exc:
        raise storage_error(exc, missing[0], what) from None


def publish(tmp: Path, path: Path) -> None:
    """Rename an already fsync'd ``tmp`` over ``path`` and make the rename durable."""
    try:
        os.replace(tmp, path)
        fsync_dir(path.parent)
        if tmp.parent != path.parent:
            fsync_dir(tmp.parent)
    except OSError as exc:
        raise storage_error(exc, path, "publishing") from None


def write_all(fd: int, data: bytes | memoryview) -> None:
    """``os.write`` until every byte is written: a write may be short (a signal, a pipe, a quota)."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def write_atomic(path: Path, data: bytes, *, mode: int = 0o600) -> None:
    """Publish ``data`` at ``path`` durably: temp name, fsync, rename, fsync the directory.

    The temporary file is opened with O_NOFOLLOW and O_EXCL after removing a stale one, so a
    symlink planted at the temporary name cannot redirect the write."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        _unlink_quietly(tmp)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
        try:
            os.fchmod(fd, mode)   # the umask must not widen or narrow what the caller asked for
            write_all(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as exc:
        _unlink_quietly(tmp)
        raise storage_error(exc, path, "writing") from None
    try:
        publish(tmp, path)
    except StorageError:
        _unlink_quietly(tmp)
        raise


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
