"""A simulated Xen host in a temporary directory, always torn down.

Use the fixtures ``sim_host`` (one host per test) or ``sim_host_module`` (one
host shared by a test module) by importing them into a test file::

    from sim_fixture import sim_host  # noqa: F401

``SimHost.xl(...)`` runs the host's ``xl``; ``SimHost.tool(...)`` runs
``xen-vtpm`` with the host's config and environment.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from xen_vtpm_sim import domains, host


@dataclasses.dataclass
class SimHost:
    dir: Path
    env: dict[str, str]

    @property
    def config(self) -> Path:
        return self.dir / "config.ini"

    def run(self, argv: list[str], check: bool = True, timeout: float = 60,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
        proc = subprocess.run(argv, env=dict(self.env, **(env or {})), capture_output=True, text=True,
                              timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{argv} exited {proc.returncode}: {proc.stderr.strip()}")
        return proc

    def xl(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run([str(self.dir / "bin" / "xl"), *args], check=check, timeout=timeout)

    def tool(self, *args: str, check: bool = True, timeout: float = 60) -> subprocess.CompletedProcess:
        return self.run([sys.executable, "-m", "xen_vtpm", *args], check=check, timeout=timeout)

    def domid(self, name: str) -> int:
        return int(self.xl("domid", name).stdout)

    def create_guest(self, name: str, memory: int = 16, vtpm: bool | str = True, tpm_version: str = "2.0") -> None:
        """vtpm: True (a stub domain), "swtpm"/"stubdom", or False (none); tpm_version: the stub's TPM."""
        kind = ["--vtpm", vtpm] if isinstance(vtpm, str) else ([] if vtpm else ["--no-vtpm"])
        self.tool("sim", "create", name, "--memory", str(memory), "--tpm-version", tpm_version, *kind)


def swtpm_home(sim: SimHost, guest: str = "guest1") -> Path:
    """The tool's directory of the swtpm vTPM made for `guest` (state_dir/swtpm/<uuid>)."""
    for home in (sim.dir / "state" / "swtpm").iterdir():
        if json.loads((home / "vtpm.json").read_text())["guest"] == guest:
            return home
    raise AssertionError(f"{guest}: no swtpm vTPM registered")


def swtpm_state_fingerprints(sim: SimHost, guest: str = "guest1") -> tuple[str | None, ...]:
    """SHA-256 of each of swtpm's state files (None when absent): they change with every write."""
    state = swtpm_home(sim, guest) / "state"
    return tuple(hashlib.sha256((state / n).read_bytes()).hexdigest() if (state / n).exists() else None
                 for n in ("tpm2-00.permall", "tpm2-00.volatilestate", "tpm2-00.savestate"))


def swtpm_pid(sim: SimHost, guest: str = "guest1") -> int | None:
    """The running swtpm of `guest`'s vTPM (its pid file, if the process lives)."""
    pidfile = sim.dir / host.SWTPM_RUN / f"{swtpm_home(sim, guest).name}.pid"
    try:
        pid = int(pidfile.read_text())
    except (OSError, ValueError):
        return None
    return pid if domains.is_alive(pid) else None


def start_sim_host(path: Path, stock_manager: bool = False, **platform: object) -> SimHost:
    """Start a host in path (keep it short: Unix socket paths are limited to 107 bytes); ``platform`` are
    `host.up`'s options for the Xen traps (xsm=, provisioned=, console_log=, release_delay=)."""
    exports = host.up(path, stock_manager=stock_manager, **platform)
    env = dict(os.environ, **exports)
    return SimHost(dir=Path(exports["XEN_VTPM_SIM_DIR"]), env=env)


def stop_sim_host(sim: SimHost) -> None:
    host.down(sim.dir)
    assert domains.owned_pids(sim.dir) == [], "sim down left processes behind"


@contextlib.contextmanager
def initialised_host(path: Path, *guests: str) -> Iterator[SimHost]:
    """A host after `xen-vtpm init`, with `guests` running (16 MiB each); always taken down."""
    sim = start_sim_host(path)
    try:
        sim.tool("init")
        for guest in guests:
            sim.create_guest(guest)
        yield sim
    finally:
        stop_sim_host(sim)


@pytest.fixture
def sim_host(tmp_path):
    sim = start_sim_host(tmp_path / "h")
    try:
        yield sim
    finally:
        stop_sim_host(sim)


@pytest.fixture(scope="module")
def sim_host_module(tmp_path_factory):
    sim = start_sim_host(tmp_path_factory.mktemp("simhost") / "h")
    try:
        yield sim
    finally:
        stop_sim_host(sim)
