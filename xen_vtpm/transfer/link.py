"""The other host of a move, reached like `xl migrate` reaches it: ``sh -c "exec SSHCOMMAND HOST xen-vtpm ARGS"``
(docs/xen-internals.md §18)."""
from __future__ import annotations

import collections
import contextlib
import shlex
import subprocess
import threading

from xen_vtpm.errors import MigrationError

from .wire import Wire

REMOTE_TOOL = "xen-vtpm"


class Remote:
    """`xen-vtpm ARGS` on HOST through the ssh command; its stdin/stdout carry the protocol, its
    stderr is kept for messages (drained on a thread, so it can never block the remote)."""

    def __init__(self, ssh: str, host: str, args: list[str]) -> None:
        # As xl_migrate.c builds its "rune" for `sh -c`: SSHCOMMAND is shell text; empty, HOST is the command.
        tail = " ".join(shlex.quote(a) for a in args)
        rune = f"exec {ssh} {shlex.quote(host)} {REMOTE_TOOL} {tail}" if ssh.strip() else f"exec {host} {tail}"
        self.host = host
        try:
            self.proc = subprocess.Popen(["sh", "-c", rune], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, start_new_session=True)
        except OSError as exc:
            raise MigrationError(f"{host}: cannot run sh for {ssh!r} ({exc.strerror})") from None
        self._err: collections.deque[str] = collections.deque(maxlen=20)
        self._drain = threading.Thread(target=self._read_stderr, name="remote-stderr", daemon=True)
        self._drain.start()
        assert self.proc.stdout is not None and self.proc.stdin is not None
        self.wire = Wire(self.proc.stdout, self.proc.stdin, host)

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._err.append(line.decode(errors="replace").rstrip())

    def last_error(self) -> str:
        """The remote's last message line (its xen-vtpm prints one on failure)."""
        self._drain.join(timeout=2)
        lines = [ln for ln in self._err if ln.strip()]
        return lines[-1].removeprefix("xen-vtpm: ") if lines else ""

    def close(self, timeout: float = 30.0) -> None:
        with contextlib.suppress(OSError):
            assert self.proc.stdin is not None
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._drain.join(timeout=2)
