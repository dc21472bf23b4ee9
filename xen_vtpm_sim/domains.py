"""The simulated hypervisor's domain table: DIR/run/domains.json under flock.

It plays the part of Xen's own domain list: which domids exist, which process
runs each domain, where its memory lives.  Every xl invocation is a separate
process, so the table is read and written under an exclusive lock and
replaced atomically.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Marks every process the simulator starts, so `sim down` can prove none is left.
OWNER_ENV = "XEN_VTPM_SIM_OWNER"
DOMID_ENV = "XEN_VTPM_SIM_DOMID"


def run_dir(sim_dir: str | os.PathLike) -> Path:
    return Path(sim_dir) / "run"


@contextlib.contextmanager
def locked(sim_dir: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """Yield the table; changes are written back when the block ends without error."""
    rdir = run_dir(sim_dir)
    rdir.mkdir(parents=True, exist_ok=True)
    with open(rdir / "domains.lock", "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        table = _load(rdir)
        before = json.dumps(table, sort_keys=True)
        yield table
        if json.dumps(table, sort_keys=True) != before:
            tmp = rdir / "domains.json.tmp"
            tmp.write_text(json.dumps(table, indent=1, sort_keys=True))
            os.replace(tmp, rdir / "domains.json")


def snapshot(sim_dir: str | os.PathLike) -> dict[str, Any]:
    with locked(sim_dir) as table:
        return json.loads(json.dumps(table))


def _load(rdir: Path) -> dict[str, Any]:
    try:
        return json.loads((rdir / "domains.json").read_text())
    except FileNotFoundError:
        return {"next_domid": 1, "domains": {}}


def find(table: dict[str, Any], ident: str) -> dict[str, Any] | None:
    """Look a domain up by name or by domid (xl accepts both everywhere)."""
    doms = table["domains"]
    if ident.isdigit() and ident in doms:
        return doms[ident]
    for dom in doms.values():
        if dom["name"] == ident:
            return dom
    return None


def proc_state(pid: int) -> str | None:
    """Kernel state letter of pid (R, S, T, Z, …), None if it is gone."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            stat = fh.read()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2]


def is_alive(pid: int) -> bool:
    return proc_state(pid) not in (None, "Z", "X")


def is_stopped(pid: int) -> bool:
    return proc_state(pid) in ("T", "t")


def owned_by(pid: int, sim_dir: str | os.PathLike) -> bool:
    """True if pid carries this sim dir's owner marker (guards against pid reuse)."""
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False
    return f"{OWNER_ENV}={os.path.abspath(sim_dir)}".encode() in env


def owned_pids(sim_dir: str | os.PathLike) -> list[int]:
    """Every live process started by this simulated host."""
    me = os.getpid()
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit() and int(entry) != me and is_alive(int(entry)) and owned_by(int(entry), sim_dir):
            pids.append(int(entry))
    return pids


def wait_until(predicate: Callable[[], bool], timeout: float, interval: float = 0.01) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if predicate():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


def kill_group(pid: int, sim_dir: str | os.PathLike, sig: int = signal.SIGKILL) -> None:
    """Signal the domain's process group (its helpers, e.g. swtpm, die with it)."""
    if not owned_by(pid, sim_dir):
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)
