"""Component and storage faults on a simulated host: kill a daemon or domain, restart what a real
host restarts, mount small, read-only or torn storage under the tool's state dir.

Everything mounted here is unmounted by the context manager that mounted it, also on failure; every
process started here is one of the simulated host's own daemons (pid file in run/, owner marker in
its environment), so `sim down` stops it with the rest of the host.
"""
from __future__ import annotations

import contextlib
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import crash_helpers as ch
from sim_fixture import SimHost

from xen_vtpm.config import Config
from xen_vtpm_sim import domains, host

# Components a test can kill, and what a real dom0 does about each:
#   xenstored  the host's XenStore daemon: comes back (systemd restarts it; in the simulator its state
#              is in memory, so "comes back" is modelled as an outage — stopped, then continued)
#   hosttpm    the swtpm behind the tool's host TPM: comes back (hardware / resource manager)
#   vtpm       the guest's vTPM stub domain: a domain that crashed stays dead until re-created
#   vtpmmgr    the vTPM manager domain: stays dead; every vTPM must be re-created with it
COMPONENTS = ("xenstored", "hosttpm", "vtpm", "vtpmmgr")
COMES_BACK = {"xenstored", "hosttpm"}


def pid_of(sim: SimHost, component: str) -> int:
    if component in ("xenstored", "hosttpm"):
        return int((sim.dir / "run" / f"{component}.pid").read_text())
    name = f"vtpm-{ch.GUEST}" if component == "vtpm" else "vtpmmgr"
    dom = domains.find(domains.snapshot(sim.dir), name)
    assert dom is not None and dom.get("pid"), f"{name}: not in the domain table"
    return int(dom["pid"])


def fault_argv(sim: SimHost, at: str, component: str, log: Path) -> list[str]:
    """xen-vtpm whose test hook takes `component` down right after journaling `at`; its arguments follow.
    The hook logs the fault command's outcome to `log` (``prove_fault`` reads it)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), str(sim.dir), component]
    return ch.faulty_argv(faults=[(at, shlex.join(cmd))], log=log)


def take_down(sim: SimHost, component: str) -> int:
    """xenstored: stopped (an outage: it answers nothing); the others: killed with their helpers.
    Returns the pid taken down, once it is observed down."""
    pid = pid_of(sim, component)
    if component == "xenstored":
        domains.kill_group(pid, sim.dir, 19)     # SIGSTOP
        assert domains.wait_until(lambda: domains.is_stopped(pid), 10), f"{component}: {pid} did not stop"
        return pid
    domains.kill_group(pid, sim.dir)
    assert domains.wait_until(lambda: not domains.is_alive(pid), 10), f"{component}: {pid} survived SIGKILL"
    return pid


def is_down(component: str, pid: int) -> bool:
    return domains.is_stopped(pid) if component == "xenstored" else not domains.is_alive(pid)


def prove_fault(log: Path, point: str, component: str) -> int:
    """The fault really happened: the hook ran the fault command at `point`, the command exited 0 after
    seeing the component down (its last stderr line names the pid, the hook logs it), and the component
    is still down now.  Returns its pid.  A fault that injected nothing fails here, loudly."""
    lines = ch.hook_log(log)
    ran = [ln for ln in lines if ln.startswith(f"reached {point} ")]
    assert ran, f"the fault point {point} was never reached: {lines}"
    m = re.fullmatch(rf"reached {re.escape(point)} fault-exit 0 'down {component} pid (\d+)'", ran[-1])
    assert len(ran) == 1 and m, f"the fault command at {point} did not take {component} down: {ran}"
    pid = int(m.group(1))
    assert is_down(component, pid), f"{component} ({pid}) is up again right after the fault"
    return pid


def bring_back(sim: SimHost, component: str) -> None:
    """What a real host restarts by itself: xenstored continues, the host TPM's swtpm restarts on
    the same port with the same state."""
    if component == "xenstored":
        pid = pid_of(sim, component)
        domains.kill_group(pid, sim.dir, 18)  # SIGCONT
        assert domains.wait_until(lambda: not domains.is_stopped(pid), 10), f"{component}: {pid} stays stopped"
        return
    assert component == "hosttpm", component
    tcti = Config.load(sim.config).tcti
    port = int(tcti.rsplit("port=", 1)[1])
    pid = host._daemon(sim.dir, "hosttpm", [
        "swtpm", "socket", "--tpm2", "--server", f"type=tcp,port={port}", "--ctrl",
        f"type=tcp,port={port + 1}", "--flags", "not-need-init,startup-clear",
        "--tpmstate", f"dir={sim.dir / 'hosttpm'}"])
    host._wait_connect(("127.0.0.1", port), socket.AF_INET, 10, "swtpm hosttpm", pid)


def set_timeouts(sim: SimHost, xenstore: float = 3.0, manager: float = 5.0) -> None:
    """Short waits for a component that never answers, so a failing case ends quickly."""
    cfg = Config.load(sim.config)
    cfg.xenstore_timeout, cfg.manager_timeout = xenstore, manager
    cfg.save(sim.config)


def assert_one_line_error(proc: subprocess.CompletedProcess, codes: tuple[int, ...], what: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode in codes, f"{what}: exit {proc.returncode}, expected one of {codes}: {err}"
    assert err and "\n" not in err and "Traceback" not in err, f"{what}: not a one-line error: {err!r}"
    return err


def guest_and_vtpm_running(sim: SimHost) -> None:
    """guest1 and its vTPM stub are listed, not paused, and their link is Connected."""
    rows = ch.xl_rows(sim)
    for name in (ch.GUEST, f"vtpm-{ch.GUEST}"):
        assert name in rows, f"{name}: not running"
        assert "p" not in rows[name], f"{name}: left paused ({rows[name]})"
    ch.wait_connected(sim, ch.GUEST)


# --- storage -------------------------------------------------------------------------------
def _mount(*argv: str) -> None:
    subprocess.run(["mount", *argv], check=True, capture_output=True, timeout=30)


def _umount(target: Path) -> None:
    for _ in range(50):
        if subprocess.run(["umount", str(target)], capture_output=True, timeout=30).returncode == 0:
            return
        time.sleep(0.1)                    # a tool process may still be closing its files
    subprocess.run(["umount", "-l", str(target)], check=True, capture_output=True, timeout=30)


def _swap_contents(src: Path, dst: Path) -> None:
    for entry in src.iterdir():
        target = dst / entry.name
        if entry.is_dir():
            shutil.copytree(entry, target, symlinks=True)
        else:
            shutil.copy2(entry, target)


def state_usage(sim: SimHost) -> int:
    return sum(p.stat().st_size for p in ch.state_dir(sim).rglob("*") if p.is_file())


@contextlib.contextmanager
def state_on_tmpfs(sim: SimHost, size_bytes: int) -> Iterator[Path]:
    """The tool's state dir moved onto a tmpfs of `size_bytes`; moved back (and unmounted) at the end."""
    state = ch.state_dir(sim)
    aside = state.with_name("state.aside")
    shutil.copytree(state, aside, symlinks=True)
    _mount("-t", "tmpfs", "-o", f"size={size_bytes},mode=0700", "tmpfs", str(state))
    try:
        _swap_contents(aside, state)
        yield state
    finally:
        kept = state.with_name("state.kept")
        with contextlib.suppress(OSError):
            shutil.copytree(state, kept, symlinks=True)
        _umount(state)
        shutil.rmtree(aside, ignore_errors=True)
        if kept.is_dir():
            shutil.rmtree(state)
            state.mkdir(mode=0o700)
            _swap_contents(kept, state)
            shutil.rmtree(kept)


@contextlib.contextmanager
def read_only(path: Path) -> Iterator[Path]:
    """`path` made read-only with a read-only bind mount of itself (root ignores mode bits)."""
    _mount("--bind", str(path), str(path))
    try:
        _mount("-o", "remount,bind,ro", str(path))
        yield path
    finally:
        _umount(path)


def is_mounted(path: Path) -> bool:
    target = os.path.realpath(path)
    with open("/proc/self/mounts") as fh:
        return any(line.split()[1] == target for line in fh)


if __name__ == "__main__":      # the fault hook's command: fault_helpers.py SIM_DIR COMPONENT
    taken = take_down(SimHost(dir=Path(sys.argv[1]), env=dict(os.environ)), sys.argv[2])
    print(f"down {sys.argv[2]} pid {taken}", file=sys.stderr)   # the hook logs this line: prove_fault
