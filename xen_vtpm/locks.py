"""Per-VM locks: one xen-vtpm sequence per guest at a time.

flock on a file per VM UUID under the state dir.  The kernel drops the lock
when the holder dies, so a SIGKILLed command never leaves a stale lock — the
journal, not the lock, records what it was doing.  The lock is behind this
small interface so a pool of hosts can later swap in an etcd lease.
"""
from __future__ import annotations

import fcntl
import threading
import time
import os
from pathlib import Path

from .errors import Locked, StorageError


class VmLock:
    def __init__(self, state_dir: Path, vm_uuid: str, label: str) -> None:
        self.path = Path(state_dir) / "locks" / f"{vm_uuid}.lock"
        self.label = label
        self._fd: int | None = None

    def __enter__(self) -> "VmLock":
        try:
            self.path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"{self.path}: cannot create lock file ({exc.strerror}); "
                               "check the state dir is writable") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "another command"
            os.close(fd)
            raise Locked(f"{self.label}: locked by {holder}; wait for it to finish "
                         "(or run `xen-vtpm recover` if it was killed)") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
        self._fd = fd
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing releases the flock
            self._fd = None


class HostLock:
    """Exclusive use of the host TPM and the catalog head, across processes; reentrant within one.

    Without a resource manager (a swtpm socket) every client shares the TPM's few object and
    session slots, and a client flushes what a crashed one left, so two commands must not hold
    TPM objects at once.  And a head advance (settle, pending row, counter increment, promotion)
    must not interleave with another one or with a freshness check, or the counter moves twice
    for one change and a healthy host looks replayed.  Holds are short (an unseal, a counter
    operation), so commands on different VMs still overlap everywhere else.
    """

    _held: dict[str, tuple[int, int]] = {}   # path -> (fd, depth)
    _mutex = threading.RLock()

    def __init__(self, state_dir: Path, timeout: float = 120.0) -> None:
        self.path = str(Path(state_dir) / "locks" / "host.lock")
        self.timeout = timeout

    def __enter__(self) -> "HostLock":
        self._mutex.acquire()
        held = self._held.get(self.path)
        if held:
            self._held[self.path] = (held[0], held[1] + 1)
            return self
        try:
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            self._mutex.release()
            raise StorageError(f"{self.path}: cannot create lock file ({exc.strerror}); "
                               "check the state dir is writable") from None
        deadline = time.monotonic() + self.timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(fd)
                    self._mutex.release()
                    raise Locked(f"host TPM: another xen-vtpm command held it for {self.timeout:g} s; "
                                 "retry, or look for a hung xen-vtpm process") from None
                time.sleep(0.01)
        self._held[self.path] = (fd, 1)
        return self

    def __exit__(self, *exc: object) -> None:
        fd, depth = self._held[self.path]
        if depth > 1:
            self._held[self.path] = (fd, depth - 1)
        else:
            del self._held[self.path]
            os.close(fd)
        self._mutex.release()
