"""Start the simulated xenstored for a test: ``start_xenstored`` or the ``xenstored`` fixture.

Use from a test module with ``from xs_fixture import xenstored, start_xenstored``
(tests/ is on sys.path under pytest's default import mode).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

READY_TIMEOUT = 15.0


def _accepting(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        try:
            probe.connect(path)
        except OSError:
            return False
    return True


def start_xenstored(tmp_path: Path) -> tuple[str, Callable[[], None]]:
    """Run ``python -m xen_vtpm_sim.xenstored`` on tmp_path/xs.sock.

    Returns the socket path and a stop function (idempotent) that SIGTERMs the
    daemon, SIGKILLs it if it does not go, and closes its log
    (tmp_path/xenstored.log).
    """
    sock = str(tmp_path / "xs.sock")     # short: domain sockets add ".d<domid>" within sun_path's 108 bytes
    log = open(tmp_path / "xenstored.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "xen_vtpm_sim.xenstored", "--socket", sock],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=log)

    def stop() -> None:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.close()

    deadline = time.monotonic() + READY_TIMEOUT
    while not (os.path.exists(sock) and _accepting(sock)):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop()
            text = (tmp_path / "xenstored.log").read_text(errors="replace")
            raise RuntimeError(f"simulated xenstored did not come up on {sock}: {text.strip()[-500:]}")
        time.sleep(0.02)
    stop.proc = proc  # type: ignore[attr-defined]  # for tests that signal the daemon
    return sock, stop


@pytest.fixture
def xenstored(tmp_path: Path) -> Iterator[str]:
    """The socket path of a fresh simulated xenstored, stopped after the test."""
    sock, stop = start_xenstored(tmp_path)
    try:
        yield sock
    finally:
        stop()
