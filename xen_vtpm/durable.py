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

Nothing under the state dir is opened through a symbolic link: the state dir must belong to this
user and be closed to everyone else (``check_private_dir``), and the lock files, which are opened
for writing on every command, are opened with ``O_NOFOLLOW`` inside a directory opened with
``O_DIRECTORY|O_NOFOLLOW`` (``open_lock``), so a link planted there cannot make root write elsewhere.
"""
from __future__ import annotations

import errno
import os
import sqlite3
import stat
from pathlib import Path

from .errors import DiskFull, PreconditionFailed, StorageError

_SPACE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def storage_error(exc: BaseException, path: os.PathLike[str] | str, action: str) -> StorageError:
    """One-line error naming the path, the OS (or SQLite) cause and what to do next."""
    if isinstance(exc, sqlite3.Error):
        text = str(exc)
        if "full" not in text and (free := _free_bytes(path)) is not None and free < _NEARLY_FULL:
            # SQLite reports a failed write to its WAL or shared-memory file as a "disk I/O error".
            text = f"{text} with {free // 1024} KiB free on its file system"
        if "full" in text or "free on its file system" in text:
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


_NEARLY_FULL = 1 << 20


def _free_bytes(path: os.PathLike[str] | str) -> int | None:
    try:
        st = os.statvfs(path if os.path.isdir(path) else os.path.dirname(path) or ".")
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


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


def check_private_dir(path: Path) -> None:
    """``path`` is a directory owned by this user that nobody else may enter (checked at start:
    whoever may write into the state dir can plant links and swap files under it)."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise PreconditionFailed(f"{path}: state dir missing; run `xen-vtpm init` first") from None
    except OSError as exc:
        raise storage_error(exc, path, "checking the state dir") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StorageError(f"{path}: the state dir is not a directory; fix state_dir in the config")
    if st.st_uid != os.geteuid():
        raise StorageError(f"{path}: the state dir belongs to uid {st.st_uid}, not to this user "
                           f"({os.geteuid()}); `chown {os.geteuid()} {path}` if it is really yours")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise StorageError(f"{path}: state dir is accessible to other users; `chmod 700 {path}`")


def open_lock(directory: Path, name: str) -> int:
    """Open (creating) lock file ``directory/name`` for flock, never through a symbolic link: the
    directory (made 0700 if missing) with O_DIRECTORY|O_NOFOLLOW, the file with O_NOFOLLOW, and the
    file must be a plain file with a single link (a hard link to another file is refused too)."""
    path = directory / name
    if "/" in name or name in ("", ".", ".."):
        raise StorageError(f"{path}: not a valid lock file name; check the VM's uuid in XenStore")
    try:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        dfd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise _lock_error(exc, directory) from None
    try:
        fd = os.open(name, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dfd)
    except OSError as exc:
        raise _lock_error(exc, path) from None
    finally:
        os.close(dfd)
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
        os.close(fd)
        raise StorageError(f"{path}: not a plain lock file (a hard link or a device; planted?); remove it — "
                           "xen-vtpm never writes through links in its state dir")
    return fd


def _lock_error(exc: OSError, path: Path) -> StorageError:
    # ELOOP: the last component is a link; ENOTDIR/EEXIST: a link (or a file) where a directory belongs.
    if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EEXIST):
        return StorageError(f"{path}: is a symbolic link or not what xen-vtpm made it (planted?); remove it — "
                            "xen-vtpm never follows links in its state dir")
    return storage_error(exc, path, "opening the lock file")
