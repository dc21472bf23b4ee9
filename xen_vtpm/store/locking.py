"""File locks of the store (flock, so the kernel drops them when a process dies).

``store.lock``: every writer and reader holds it shared; delete and compaction take it
exclusive, so chunks are never freed or moved under a write that counts on them or a read
that already looked up their place.  ``<token>.lock``: held exclusive by the process that owns
the journal row naming that token; recovery takes over a row only when it can lock it,
i.e. when its owner is dead.
"""
from __future__ import annotations

import fcntl
import os
import secrets
import time
from pathlib import Path

from ..errors import Locked
from .fsio import storage_error

POLL = 0.05


def _open(path: Path) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise storage_error(exc, path, "opening lock file") from None


def _try(fd: int, mode: int) -> bool:
    try:
        fcntl.flock(fd, mode | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


class StoreLock:
    """The shared/exclusive store lock, released by ``release``."""

    def __init__(self, lock_dir: Path, exclusive: bool, timeout: float) -> None:
        path = lock_dir / "store.lock"
        self._fd = _open(path)
        mode = fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH
        deadline = time.monotonic() + timeout
        while not _try(self._fd, mode):
            if time.monotonic() >= deadline:
                os.close(self._fd)
                raise Locked(f"{path}: the checkpoint store is busy ({'a write or read' if exclusive else 'a delete'}"
                             f" in progress for {timeout:.0f} s); retry when it finishes")
            time.sleep(POLL)

    def release(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class OwnerLock:
    """Marks a journal row as owned by a live process; bundled with the store lock it needs."""

    def __init__(self, lock_dir: Path, store_lock: StoreLock) -> None:
        self.token = secrets.token_hex(8)
        self.path = lock_dir / f"{self.token}.lock"
        # Locked under a private name, then renamed: a file at the public name is always held,
        # so recovery can never mistake a starting owner for a dead one.  This rename is about
        # what other live processes see, not about the disk, so it is not a durable publish: a
        # crash or power cut ends every flock, and a lock file that is then missing and one that
        # is present but unheld both mean "owner dead" to recovery.
        tmp = lock_dir / f"{self.token}.lock.new"
        self._fd = _open(tmp)
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            os.rename(tmp, self.path)
        except OSError as exc:
            os.close(self._fd)
            raise storage_error(exc, self.path, "creating lock file") from None
        self._store_lock = store_lock

    def release(self) -> None:
        if self._fd >= 0:
            try:
                os.unlink(self.path)
            except OSError:
                pass  # a leftover lock file is swept by recover; not worth failing a finished operation
            os.close(self._fd)
            self._fd = -1
        self._store_lock.release()


def owner_alive(lock_dir: Path, token: str) -> bool:
    """True while the process that owns ``token`` holds its lock."""
    try:
        fd = os.open(lock_dir / f"{token}.lock", os.O_RDWR)
    except FileNotFoundError:
        return False
    except OSError as exc:
        raise storage_error(exc, lock_dir / f"{token}.lock", "opening lock file") from None
    try:
        return not _try(fd, fcntl.LOCK_EX)
    finally:
        os.close(fd)
