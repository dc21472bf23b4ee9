"""Simulated xenconsoled: every domain's console output to a pty, and to a log file with ``--log=guest``.

`python -m xen_vtpm_sim.xenconsoled --socket SOCK --log guest|none --log-dir DIR`

As in Xen's ``tools/console/daemon/io.c`` (docs/xen-internals.md §7.5):

* each domain gets a pty; its slave name is written to ``/local/domain/<domid>/console/tty`` and the
  daemon keeps the slave open itself, so output waits in the pty until someone opens the slave
  (`xl console`, or xen-vtpm when logging is off);
* with ``--log=guest`` the output is also appended to ``<log-dir>/guest-<name>.log`` (``O_APPEND``,
  mode 0644; the name read from ``/local/domain/<domid>/name``), one file for every boot of that name;
  ``--log=none`` (the upstream default) writes no file at all.

The simulated hypervisor has no console rings: `xl` hands the daemon the read end of a pipe that is
the domain process's stdout (over ``SOCK`` with SCM_RIGHTS), which plays the part of the ring.
"""
from __future__ import annotations

import argparse
import os
import select
import signal
import socket
import sys
import threading
import tty
from pathlib import Path

from xen_vtpm.errors import XenVtpmError
from xen_vtpm.xen.xenstore import XenStore

# What the daemon keeps for a pty nobody reads, like xenconsoled's buffer with a `limit`.
PENDING_LIMIT = 1 << 20
READ_SIZE = 4096


def tty_node(domid: int) -> str:
    return f"/local/domain/{domid}/console/tty"


class Console(threading.Thread):
    """One domain: copy its output to its pty and, if logging, to its log file, until it exits."""

    def __init__(self, domid: int, ring: int, log_dir: Path | None) -> None:
        super().__init__(daemon=True, name=f"console-{domid}")
        self.domid, self.ring, self.log_dir = domid, ring, log_dir
        self.master, self.slave = os.openpty()
        tty.setraw(self.slave)                     # io.c: cfmakeraw on the slave
        os.set_blocking(self.master, False)
        self.pending = bytearray()
        self.log: int | None = None

    def publish(self) -> None:
        with XenStore() as xs:
            name = xs.read_or(f"/local/domain/{self.domid}/name")
            xs.write(tty_node(self.domid), os.ttyname(self.slave))
        if self.log_dir is not None and name:
            self.log = os.open(self.log_dir / f"guest-{name}.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def _to_pty(self) -> None:
        try:
            sent = os.write(self.master, self.pending)
        except BlockingIOError:
            sent = 0
        del self.pending[:sent]
        if len(self.pending) > PENDING_LIMIT:        # nobody reads the pty: drop the oldest output
            del self.pending[:len(self.pending) - PENDING_LIMIT]

    def run(self) -> None:
        try:
            while True:
                # Output that did not fit the pty goes out as soon as a reader makes room.
                readable, _, _ = select.select([self.ring], [self.master] if self.pending else [], [])
                if self.pending:
                    self._to_pty()
                if not readable:
                    continue
                data = os.read(self.ring, READ_SIZE)
                if not data:
                    return
                if self.log is not None:
                    os.write(self.log, data)
                self.pending += data
                self._to_pty()
        finally:
            for fd in (self.ring, self.master, self.slave, self.log):
                if fd is not None:
                    os.close(fd)


def serve(sock_path: Path, log_dir: Path | None) -> None:
    sock_path.unlink(missing_ok=True)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen(16)
    print(f"xenconsoled: logging {'to ' + str(log_dir) if log_dir else 'off'}", flush=True)
    while True:
        conn, _ = listener.accept()
        with conn:
            try:
                msg, fds, _, _ = socket.recv_fds(conn, 64, 1)
                if not msg:
                    continue                          # a readiness probe: connected and closed
                domid = int(msg.decode().strip())
                if len(fds) != 1:
                    raise ValueError(f"expected one ring descriptor, got {len(fds)}")
                console = Console(domid, fds[0], log_dir)
                console.publish()
                console.start()
                conn.sendall(b"ok\n")
            except (OSError, ValueError, XenVtpmError) as exc:
                print(f"xenconsoled: refused a console: {exc}", flush=True)


def attach(sock_path: Path, domid: int, ring: int, timeout: float = 10.0) -> bool:
    """`xl`'s side: hand the daemon a new domain's output; False when no xenconsoled runs."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as conn:
            conn.settimeout(timeout)
            conn.connect(str(sock_path))
            socket.send_fds(conn, [f"{domid}\n".encode()], [ring])
            return conn.recv(3) == b"ok\n"
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="xenconsoled")
    ap.add_argument("--socket", required=True, type=Path)
    ap.add_argument("--log", choices=("guest", "none"), default="none")
    ap.add_argument("--log-dir", type=Path)
    args = ap.parse_args(argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    serve(args.socket, args.log_dir if args.log == "guest" else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
