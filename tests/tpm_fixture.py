"""A real swtpm (TPM 2.0) for tests: started on free ports in a temp dir, always stopped.

Fixtures:
  swtpm_session  one swtpm for the whole session (give each test its own counter index)
  swtpm          a pristine swtpm for one test (lockout and PCR-extend tests)
  host_cfg       a Config + config file for a fresh state dir on the session swtpm
  fresh_cache    drops provision's per-process TPM/key cache after each test (autouse in our modules)
"""
from __future__ import annotations

import itertools
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from xen_vtpm.config import Config
from xen_vtpm.host import provision, session

_counter_indices = itertools.count(0x01500100)


def _free_port_pair() -> int:
    """A port P with P+1 also free (swtpm wants server and ctrl ports)."""
    for _ in range(50):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port >= 65535:
            continue
        with socket.socket() as s2:
            try:
                s2.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for swtpm")


class Swtpm:
    def __init__(self, state_dir: Path) -> None:
        assert shutil.which("swtpm"), "swtpm not installed: run `make setup` (it installs Debian's swtpm)"
        self.state_dir = state_dir
        state_dir.mkdir(parents=True, exist_ok=True)
        self.proc: subprocess.Popen | None = None
        self.start()

    def start(self) -> None:
        """Start (or, after stop(), restart) on the same state dir; the port may change."""
        for _ in range(5):  # another process may grab the port between probe and bind
            self.port = _free_port_pair()
            self.proc = subprocess.Popen(
                ["swtpm", "socket", "--tpm2",
                 "--server", f"type=tcp,port={self.port},bindaddr=127.0.0.1",
                 "--ctrl", f"type=tcp,port={self.port + 1},bindaddr=127.0.0.1",
                 "--flags", "not-need-init,startup-clear", "--tpmstate", f"dir={self.state_dir}"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            if self._wait_listening():
                return
            self.stop()
        raise RuntimeError("swtpm did not start")

    def _wait_listening(self) -> bool:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            try:
                # The ctrl port answers without occupying the one-client server port.
                with socket.create_connection(("127.0.0.1", self.port + 1), timeout=1):
                    return True
            except OSError:
                time.sleep(0.02)
        return False

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def make_cfg(tmp_path: Path, tcti: str, **overrides: object) -> Config:
    """A config file in tmp_path for state dir tmp_path/state, with a counter index unique to the test."""
    cfg = Config(state_dir=tmp_path / "state", tcti=tcti, counter_index=next(_counter_indices))
    for key, value in overrides.items():
        setattr(cfg, key, value)
    path = tmp_path / "xen-vtpm.conf"
    cfg.save(path)
    return Config.load(path)


@pytest.fixture(scope="session")
def swtpm_session(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path_factory.mktemp("swtpm"))
    try:
        yield tpm
    finally:
        session.close_all()
        tpm.stop()


@pytest.fixture
def swtpm(tmp_path: Path) -> Iterator[Swtpm]:
    tpm = Swtpm(tmp_path / "swtpm")
    try:
        yield tpm
    finally:
        session.close_all()
        tpm.stop()


@pytest.fixture(autouse=True)
def fresh_cache() -> Iterator[None]:
    yield
    session.close_all()


@pytest.fixture
def host_cfg(tmp_path: Path, swtpm_session: Swtpm) -> Config:
    return make_cfg(tmp_path, swtpm_session.tcti)
