"""Bring a simulated Xen host up and down inside one directory.

``up`` starts the daemons dom0 would have (xenstored, xenconsoled, the host TPM
for the tool, the physical TPM the vTPM manager seals with), writes the tool's
config and an ``xl`` command, and creates the vtpmmgr domain.  Every process
carries an owner marker in its environment, so ``down`` can prove that nothing
it started is left behind.

With no options the host is a correctly configured Xen 4.17 dom0 for xen-vtpm
(FLASK, a provisioned manager with the checkpoint extension, console logging);
each option reproduces one way a real host differs (see ``platform``).
"""
from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import uuid as uuidlib
from pathlib import Path
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import PreconditionFailed, UsageError, XenError, XenVtpmError
from xen_vtpm.xen.xlcfg import load_cfg
from xen_vtpm_sim import boot, domains, platform, xl

from .domains import OWNER_ENV

IMAGE_SIZE = 2 << 20  # like `dd if=/dev/zero bs=2M count=1`
SWTPM_RUN = "sw"      # where the tool's swtpm sockets and pid files live (its swtpm_run_dir, by a short link)
DAEMONS = ("xenconsoled", "xenstored", "hosttpm", "ptpm")   # stopped in this order
# A TPM 2.0 host's manager, provisioned on its first start: sealed to the boot chain (PCRs 0-7) or
# a boot the host's policy authority approves (boot.authority), letting vTPM stub domains with the
# label every simulated frontend has reload their state (vtpmmgr/README.md, docs/real-xen.md).
# tpmlocality=2 as xen-vtpmmgr(7) recommends: dom0's driver keeps locality 0.
MANAGER_EXTRA = "tpm2=1 tpmlocality=2 tpm2_pcrs=0-7 vtpm_label=system_u:system_r:vtpm_t"


def swtpm_run_link(sim_dir: Path) -> Path:
    """A short name for ``sim_dir/sw``: swtpm's socket is ``<run dir>/<vTPM uuid>.sock``, and a Unix socket
    path must fit 107 bytes, which a deep test directory would not leave room for.  Always under /tmp:
    $TMPDIR may itself be deep (the demo's tests point it into theirs)."""
    return Path("/tmp") / f"xvsw-{hashlib.sha256(str(sim_dir).encode()).hexdigest()[:12]}"


def _dirs(sim_dir: Path) -> None:
    for sub in ("run", "logs", "images", "state", "hosttpm", "ptpm", "bin"):
        (sim_dir / sub).mkdir(parents=True, exist_ok=True)


def _env(sim_dir: Path) -> dict[str, str]:
    env = dict(os.environ, XEN_VTPM_SIM_DIR=str(sim_dir), XENSTORED_PATH=str(sim_dir / "xenstored.sock"))
    env[OWNER_ENV] = str(sim_dir)
    # Daemons and bin/xl run `python -m xen_vtpm...`; make sure they find this package.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (xl.PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    return env


def _pid_file(sim_dir: Path, name: str) -> Path:
    return sim_dir / "run" / f"{name}.pid"


def _read_pid(sim_dir: Path, name: str) -> int | None:
    try:
        return int(_pid_file(sim_dir, name).read_text().strip())
    except (OSError, ValueError):
        return None


def is_up(sim_dir: Path) -> bool:
    pid = _read_pid(sim_dir, "xenstored")
    return pid is not None and domains.is_alive(pid) and domains.owned_by(pid, sim_dir)


def _daemon(sim_dir: Path, name: str, argv: list[str]) -> int:
    with open(sim_dir / "logs" / f"{name}.log", "ab") as log:
        proc = subprocess.Popen(argv, env=_env(sim_dir), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True, cwd=sim_dir)
    _pid_file(sim_dir, name).write_text(f"{proc.pid}\n")
    return proc.pid


def _port_pair() -> int:
    """A free port P with P+1 free too (swtpm's data and control channels)."""
    for _ in range(100):
        with socket.socket() as a:
            a.bind(("127.0.0.1", 0))
            port = a.getsockname()[1]
            if port >= 65535:
                continue
            with socket.socket() as b:
                try:
                    b.bind(("127.0.0.1", port + 1))
                except OSError:
                    continue
            return port
    raise PreconditionFailed("sim up: no free pair of TCP ports on 127.0.0.1; free some ports and retry")


def _wait_connect(target: Any, family: int, timeout: float, what: str, pid: int) -> None:
    deadline = time.monotonic() + timeout
    while True:
        with socket.socket(family, socket.SOCK_STREAM) as s:
            try:
                s.connect(target)
                return
            except OSError:
                pass
        if not domains.is_alive(pid):
            raise XenError(f"sim up: {what} exited at start; see its log in logs/")
        if time.monotonic() > deadline:
            raise XenError(f"sim up: {what} not reachable after {timeout:g} s; see its log in logs/")
        time.sleep(0.05)


def _swtpm(sim_dir: Path, name: str, state: Path, port: int | None = None) -> int:
    """Start swtpm on ``port`` (kept across a reboot), or on a free pair: another host starting at the
    same moment may take a probed pair before swtpm binds it, so a fresh pick is tried a few times."""
    for attempt in range(1 if port else 5):
        chosen = port or _port_pair()
        pid = _daemon(sim_dir, name, ["swtpm", "socket", "--tpm2", "--server", f"type=tcp,port={chosen}",
                                      "--ctrl", f"type=tcp,port={chosen + 1}", "--flags",
                                      "not-need-init,startup-clear", "--tpmstate", f"dir={state}"])
        try:
            _wait_connect(("127.0.0.1", chosen), socket.AF_INET, 10, f"swtpm {name}", pid)
            # The connect may have reached the swtpm that took the port first; ours then fails its bind
            # and exits at once.
            time.sleep(0.2)
            if not domains.is_alive(pid):
                raise XenError(f"sim up: swtpm {name} exited at start; see its log in logs/")
            return chosen
        except XenError:
            if port or attempt == 4 or domains.is_alive(pid):
                raise
    raise AssertionError("unreachable")


def write_image(path: Path) -> None:
    with open(path, "wb") as fh:
        fh.truncate(IMAGE_SIZE)


def _write_xl(sim_dir: Path) -> None:
    env = _env(sim_dir)
    script = sim_dir / "bin" / "xl"
    script.write_text("#!/bin/sh\n"
                      f"XEN_VTPM_SIM_DIR={shlex.quote(str(sim_dir))} "
                      f"{OWNER_ENV}={shlex.quote(str(sim_dir))} "
                      f"PYTHONPATH={shlex.quote(env['PYTHONPATH'])} "
                      f"exec {shlex.quote(sys.executable)} -m xen_vtpm_sim.xl \"$@\"\n")
    script.chmod(0o755)


def _write_tool(sim_dir: Path) -> None:
    """bin/xen-vtpm: the tool that started the host, so the exports' PATH finds it as it finds `xl`
    (a shell that evaluated them has the sim's bin/ on PATH, not the tool's venv)."""
    script = sim_dir / "bin" / "xen-vtpm"
    script.write_text("#!/bin/sh\n"
                      f"PYTHONPATH={shlex.quote(_env(sim_dir)['PYTHONPATH'])} "
                      f"exec {shlex.quote(sys.executable)} -m xen_vtpm \"$@\"\n")
    script.chmod(0o755)


def module_available(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ImportError:
        return False


def up(sim_dir: str | os.PathLike, stock_manager: bool = False, *, xsm: str = "flask", provisioned: bool = True,
       console_log: str = "guest", release_delay: float = 0.0) -> dict[str, str]:
    """Start the host; returns the environment a shell should export."""
    try:
        plat = platform.Platform(xsm=xsm, provisioned=provisioned, console_log=console_log,
                                 release_delay=release_delay)
    except ValueError as exc:
        raise UsageError(f"sim up: {exc}") from None
    d = Path(sim_dir).resolve()
    if is_up(d):
        raise PreconditionFailed(f"sim up: a simulated host already runs in {d}; "
                                 f"run `xen-vtpm sim down --dir {d}` first")
    if len(str(d / "run" / "xenconsoled.sock")) >= 104:
        raise UsageError(f"sim up: {d} is too long for a Unix socket path; use a shorter directory")
    _dirs(d)
    (d / "run" / "domains.json").unlink(missing_ok=True)
    try:
        platform.save(d, plat)
        power_on(d)
        if module_available("xen_vtpm_sim.vtpmmgr"):
            _create_manager(d, stock_manager)
        else:
            print("xen-vtpm: warning: xen_vtpm_sim.vtpmmgr not available; host has no vTPM manager",
                  file=sys.stderr)
    except BaseException:
        down(d)
        raise
    return exports(d)


def power_on(d: Path, ports: tuple[int, int] | None = None) -> None:
    """dom0's daemons and the two TPMs, the boot measured into the manager's; ports: (host TPM,
    physical TPM) of the boot before, so the configs that name them stay valid."""
    plat = platform.load(d)
    (d / SWTPM_RUN).mkdir(mode=0o700, exist_ok=True)
    link = swtpm_run_link(d)
    link.unlink(missing_ok=True)
    link.symlink_to(d / SWTPM_RUN)
    sock = d / "xenstored.sock"
    pid = _daemon(d, "xenstored", [sys.executable, "-m", "xen_vtpm_sim.xenstored", "--socket", str(sock)])
    _wait_connect(str(sock), socket.AF_UNIX, 10, "xenstored", pid)
    consoles = d / "run" / "xenconsoled.sock"
    pid = _daemon(d, "xenconsoled", [sys.executable, "-m", "xen_vtpm_sim.xenconsoled", "--socket", str(consoles),
                                     "--log", plat.console_log, "--log-dir", str(d / "logs")])
    _wait_connect(str(consoles), socket.AF_UNIX, 10, "xenconsoled", pid)
    host_port = _swtpm(d, "hosttpm", d / "hosttpm", ports[0] if ports else None)
    ptpm_port = _swtpm(d, "ptpm", d / "ptpm", ports[1] if ports else None)
    ptpm_tcti = f"swtpm:host=127.0.0.1,port={ptpm_port}"
    (d / "run" / "ptpm.tcti").write_text(ptpm_tcti + "\n")
    events = boot.load(d)
    boot.save(d, events)
    boot.measure(ptpm_tcti, events)
    if ports is None:
        cfg = Config(state_dir=d / "state", tcti=f"swtpm:host=127.0.0.1,port={host_port}",
                     xenstore_path=str(sock), xl=str(d / "bin" / "xl"), log_dir=d / "logs",
                     domain_cfg_dir=d / "images", vtpm_image_dir=d / "images", swtpm_run_dir=link,
                     xen_lib_dir=d / "var" / "lib" / "xen")
        cfg.save(d / "config.ini")
        _write_xl(d)
        _write_tool(d)


def exports(d: Path) -> dict[str, str]:
    return {"XEN_VTPM_SIM_DIR": str(d), "XENSTORED_PATH": str(d / "xenstored.sock"),
            "XEN_VTPM_CONFIG": str(d / "config.ini"),
            "PATH": f"{d / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}"}


def _create_domain_from_cfg(d: Path, cfg_path: Path, text: str) -> int:
    cfg_path.write_text(text)
    return xl.create_domain(str(d), xl.spec_from_cfg(load_cfg(str(cfg_path))))


def _create_manager(d: Path, stock: bool) -> None:
    img = d / "images" / "vtpmmgr.img"
    write_image(img)
    # tpmlocality=2 as xen-vtpmmgr(7) recommends: dom0's driver keeps locality 0; transfer=1 serves moves.
    extra = f"{MANAGER_EXTRA} tpm2_authority={boot.authority(d)}" + (" checkpoint=0" if stock else " transfer=1")
    _create_domain_from_cfg(d, d / "images" / "vtpmmgr.cfg",
                            'name="vtpmmgr"\nkernel="/usr/lib/xen/boot/vtpmmgr-stubdom.gz"\n'
                            f'extra="{extra}"\nmemory=128\ndisk=["file:{img},hda,w"]\niomem=["fed40,5"]\n')


STUB_KERNELS = {"1.2": "/usr/lib/xen/boot/vtpm-stubdom.gz", "2.0": "/usr/lib/xen/boot/vtpm2-stubdom.gz"}


def _vtpm_disk(d: Path, name: str, disk: str | None) -> str:
    """The stub's disk target: a fresh 2 MiB image file by default, else what the caller gave
    (e.g. ``phy:/dev/loop3`` or ``qcow2:/path``; the caller owns and blanks it)."""
    if disk:
        return disk
    img = d / "images" / f"vtpm-{name}.img"
    write_image(img)
    return f"file:{img}"


def create_guest(sim_dir: str | os.PathLike, name: str, memory: int = 64, vtpm: bool | str = True, *,
                 tpm_version: str = "2.0", startup: str = "save", vtpm_disk: str | None = None,
                 swtpm_state: str | None = None) -> dict[str, Any]:
    """vtpm-NAME first (backend vtpmmgr), then NAME with backend=vtpm-NAME: the real start order.
    vtpm="swtpm": an HVM guest whose device model has an swtpm TPM 2.0 (swtpm_guest), a new one or the
    one in the swtpm state directory ``swtpm_state``.

    ``tpm_version`` 1.2 is Xen's vTPM (the TPM 1.2 emulator), 2.0 the simulator's stand-in; ``startup`` is
    the stub's startup mode, ``save`` (xen-vtpm's requirement) or ``clear`` (Xen's default)."""
    if tpm_version not in STUB_KERNELS or startup not in ("clear", "save"):
        raise UsageError(f"sim create: --tpm-version must be 1.2 or 2.0 and --startup clear or save, "
                         f"not {tpm_version!r} / {startup!r}")
    d = Path(sim_dir).resolve()
    if not is_up(d):
        raise PreconditionFailed(f"sim create: no simulated host runs in {d}; run `xen-vtpm sim up --dir {d}`")
    if swtpm_state is not None and vtpm != "swtpm":
        raise UsageError("sim create: --swtpm-state needs --vtpm swtpm")
    if vtpm == "swtpm":
        return swtpm_guest(d, name, memory, swtpm_state)
    table = domains.snapshot(d)
    if vtpm and not module_available("xen_vtpm_sim.vtpm_stubdom"):
        print("xen-vtpm: warning: xen_vtpm_sim.vtpm_stubdom not available; creating the guest without a vTPM",
              file=sys.stderr)
        vtpm = False
    if vtpm and domains.find(table, "vtpmmgr") is None:
        raise PreconditionFailed(f"sim create {name}: the vtpmmgr domain is not running; restart the host")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,50}", name):
        raise UsageError(f"sim create: invalid domain name {name!r}; use letters, digits, '.', '_' and '-'")
    for taken in (name, f"vtpm-{name}") if vtpm else (name,):
        if domains.find(table, taken) is not None:
            raise PreconditionFailed(f"sim create {name}: domain {taken} already exists; "
                                     f"`xl destroy {taken}` first or pick another name")
    out: dict[str, Any] = {"name": name}
    try:
        if vtpm:
            vtpm_uuid = str(uuidlib.uuid4())
            stub_cfg = d / "images" / f"vtpm-{name}.cfg"
            text = (f'name="vtpm-{name}"\nkernel="{STUB_KERNELS[tpm_version]}"\nmemory=8\nextra="{{extra}}"\n'
                    f'disk=["{_vtpm_disk(d, name, vtpm_disk)},hda,w"]\nvtpm=["backend=vtpmmgr,uuid={vtpm_uuid}"]\n')
            # A vTPM that never saved cannot start in `save` mode (it ends in fail-stop, docs/xen-internals.md
            # §6.5): its first boot is `clear`, and the guest's first command saves it; later boots use `save`.
            out["vtpm_domid"] = _create_domain_from_cfg(d, stub_cfg, text.format(extra=""))
            stub_cfg.write_text(text.format(extra=startup if startup == "save" else ""))
            out["vtpm_uuid"] = vtpm_uuid
            out["tpm_version"] = tpm_version
        vtpm_line = f'vtpm=["backend=vtpm-{name}"]\n' if vtpm else ""
        out["domid"] = _create_domain_from_cfg(d, d / "images" / f"{name}.cfg",
                                               f'name="{name}"\nmemory={int(memory)}\n{vtpm_line}')
        if vtpm:
            wait_connected(d, out["domid"], name)
    except BaseException:
        # Leave the host as it was: no half-built guest/vTPM pair.
        for key in ("domid", "vtpm_domid"):
            if key in out:
                xl._destroy(str(d), out[key], quiet=True)
        raise
    return out


def run_tool(d: Path, *argv: str) -> dict[str, Any]:
    """Run xen-vtpm as the administrator would (the simulator never imports the tool's own code)."""
    env = dict(os.environ)
    env.setdefault("XEN_VTPM_CONFIG", str(d / "config.ini"))
    env["PYTHONPATH"] = _env(d)["PYTHONPATH"]
    proc = subprocess.run([sys.executable, "-m", "xen_vtpm", "--json", *argv], env=env, capture_output=True,
                          text=True, timeout=120)
    if proc.returncode:
        err = XenVtpmError((proc.stderr.strip().splitlines() or ["failed"])[-1].removeprefix("xen-vtpm: "))
        err.exit_code = proc.returncode
        raise err
    return json.loads(proc.stdout)


def swtpm_guest(d: Path, name: str, memory: int, swtpm_state: str | None = None) -> dict[str, Any]:
    """An HVM guest with an swtpm vTPM, set up the way the user guide tells an administrator to:
    `xen-vtpm vtpm add` (or `vtpm import` of an existing state directory) wires it into the cfg,
    `xen-vtpm vtpm start` runs its swtpm, then xl create starts the guest and its device model."""
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,50}", name):
        raise UsageError(f"sim create: invalid domain name {name!r}; use letters, digits, '.', '_' and '-'")
    if domains.find(domains.snapshot(d), name) is not None:
        raise PreconditionFailed(f"sim create {name}: domain {name} already exists; `xl destroy {name}` first")
    cfg_path = d / "images" / f"{name}.cfg"
    cfg_path.write_text(f'name="{name}"\ntype="hvm"\nmemory={int(memory)}\n')
    if swtpm_state is None:
        added = run_tool(d, "vtpm", "add", name, "--backend", "swtpm", "--cfg", str(cfg_path))
    else:
        added = run_tool(d, "vtpm", "import", name, "--swtpm-state", swtpm_state, "--cfg", str(cfg_path))
    run_tool(d, "vtpm", "start", name, "--cfg", str(cfg_path))
    domid = xl.create_domain(str(d), xl.spec_from_cfg(load_cfg(str(cfg_path))))
    return {"name": name, "domid": domid, "vtpm_uuid": added["vtpm_uuid"], "backend": "swtpm"}


def _stop_swtpms(d: Path) -> None:
    """swtpm daemons xen-vtpm started for this host's guests (its swtpm_run_dir is SWTPM_RUN here);
    a device model that ends stops its own, so these are the ones whose guest is gone."""
    for pidfile in (d / SWTPM_RUN).glob("*.pid"):
        with contextlib.suppress(OSError, ValueError):
            pid = int(pidfile.read_text().strip())
            if str(d).encode() in Path(f"/proc/{pid}/cmdline").read_bytes():
                os.kill(pid, signal.SIGTERM)
                if not domains.wait_until(lambda pid=pid: not domains.is_alive(pid), 5):
                    os.kill(pid, signal.SIGKILL)
                    domains.wait_until(lambda pid=pid: not domains.is_alive(pid), 5)


def wait_connected(d: Path, domid: int, name: str, timeout: float = 20.0) -> None:
    """Readiness as in docs/xen-internals.md §9.6: frontend and backend of the guest's vTPM both Connected (4)."""
    fe = f"/local/domain/{domid}/device/vtpm/0"
    with xl.xenstore(str(d)) as xs:
        be = xs.read(f"{fe}/backend")

        def connected() -> bool:
            return xs.read_or(f"{fe}/state") == "4" and xs.read_or(f"{be}/state") == "4"
        if not xs.wait_for(connected, [f"{fe}/state", f"{be}/state"], timeout):
            raise XenError(f"sim create {name}: vTPM link not Connected after {timeout:g} s; "
                           f"see the consoles of {name} and vtpm-{name}")


def _stop(pid: int, d: Path) -> None:
    domains.kill_group(pid, d, signal.SIGTERM)
    domains.kill_group(pid, d, signal.SIGCONT)
    if not domains.wait_until(lambda: not domains.is_alive(pid), 5):
        domains.kill_group(pid, d, signal.SIGKILL)
        domains.wait_until(lambda: not domains.is_alive(pid), 5)


def down(sim_dir: str | os.PathLike) -> dict[str, Any]:
    """Destroy every domain, stop the daemons, and check no owned process is left."""
    d = Path(sim_dir).resolve()
    table = domains.snapshot(d) if (d / "run").is_dir() else {"domains": {}}
    # Guests first, the manager last: the reverse of the start order.
    for key in sorted(table["domains"], key=int, reverse=True):
        pid = table["domains"][key].get("pid")
        if pid:
            domains.kill_group(pid, d)
    for key in table["domains"]:
        with contextlib.suppress(Exception):
            xl._destroy(str(d), int(key), quiet=True)
    _stop_swtpms(d)
    for name in DAEMONS:
        pid = _read_pid(d, name)
        if pid is not None:
            _stop(pid, d)
            _pid_file(d, name).unlink(missing_ok=True)
    for pid in domains.owned_pids(d):
        domains.kill_group(pid, d)
    domains.wait_until(lambda: not domains.owned_pids(d), 5)
    left = domains.owned_pids(d)
    if left:
        raise XenError(f"sim down: processes {left} of {d} survive SIGKILL; check them with `ps`")
    swtpm_run_link(d).unlink(missing_ok=True)
    return {"dir": str(d), "stopped": True}
