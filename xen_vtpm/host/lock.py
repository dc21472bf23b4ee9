"""The host lock: one command at a time on the host TPM and the catalog head."""
from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from xen_vtpm.durable import open_lock
from xen_vtpm.errors import Locked, StorageError


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

    def __enter__(self) -> HostLock:
        self._mutex.acquire()
        held = self._held.get(self.path)
        if held:
            self._held[self.path] = (held[0], held[1] + 1)
            return self
        try:
            fd = open_lock(Path(self.path).parent, Path(self.path).name)
        except StorageError:
            self._mutex.release()
            raise
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
