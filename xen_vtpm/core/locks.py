"""Per-VM locks: one xen-vtpm sequence per guest at a time.

flock on a file per VM UUID under the state dir.  The kernel drops the lock
when the holder dies, so a SIGKILLed command never leaves a stale lock — the
journal, not the lock, records what it was doing.  The lock is behind this
small interface so a pool of hosts can later swap in an etcd lease.
"""
from __future__ import annotations

import fcntl
import os
from pathlib import Path

from xen_vtpm.durable import open_lock
from xen_vtpm.errors import Locked


class VmLock:
    def __init__(self, state_dir: Path, vm_uuid: str, label: str) -> None:
        self.path = Path(state_dir) / "locks" / f"{vm_uuid}.lock"
        self.label = label
        self._fd: int | None = None

    def __enter__(self) -> VmLock:
        fd = open_lock(self.path.parent, self.path.name)
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
