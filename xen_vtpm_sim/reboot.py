"""`sim reboot`: power-cycle the simulated host.

Every domain and both TPMs stop at once, as at a power cut (the TPMs' PCRs reset, their NV state
stays); dom0's daemons start again, the boot is measured into the manager's TPM again (with a
firmware/Xen update if asked), and the host's boot domains are created again, in the order a host's
boot scripts and /etc/xen/auto give: the vTPM manager, the vTPM stub domains, then the guests, which
boot afresh.  The boot domains are those that ran, plus those a reboot before could not start
(DIR/boot/auto, like the links in /etc/xen/auto); each is created from DIR/images/<name>.cfg when
that file exists (read again, as xendomains does), else from the config it last ran with.  A domain
whose vTPM backend did not come up is not started, as `xl create` would fail for it; the reboot then
says which and why.  An HVM guest whose TPM is an swtpm xen-vtpm manages gets its swtpm first, by
`xen-vtpm vtpm start`, as the `ExecStartPre=` of the xendomains drop-in in the user guide does.
The manager's readiness is read on its console pty, so a host whose xenconsoled keeps no logs reboots
as well.
"""
from __future__ import annotations

import json
import re
import time
from pathlib import Path
from typing import Any

from xen_vtpm.errors import PreconditionFailed, XenError, XenVtpmError
from xen_vtpm.xen.consoles import PtyReader, console_tty, tty_node
from xen_vtpm.xen.xlcfg import load_cfg, parse_vtpm
from xen_vtpm_sim import boot, devicemodel, domains, host, xl

# Xen's vtpmmgr main(): serving, or vtpmmgr2_init() failed (e.g. a table it may not replace).
MANAGER_SERVES = "Waiting for commands from vTPM's"
MANAGER_STOPPED = "Unable to initialize vtpmmgr domain!"
MANAGER_TIMEOUT = 30.0


def _kind(cfg: dict[str, Any]) -> int:
    """Boot order: 0 the manager, 1 vTPM stub domains, 2 guests."""
    module = xl.module_for(str(cfg.get("kernel", "")))
    return {"xen_vtpm_sim.vtpmmgr": 0, "xen_vtpm_sim.vtpm_stubdom": 1}.get(module, 2)


def _port(tcti: str) -> int:
    match = re.search(r"port=(\d+)", tcti)
    if not match:
        raise XenError(f"sim reboot: no port in TCTI {tcti!r}; restart the host with `sim down` and `sim up`")
    return int(match.group(1))


def _tpm_ports(d: Path) -> tuple[int, int]:
    """The TPMs' ports of this boot, kept across the reboot: the tool's config names them."""
    config = (d / "config.ini").read_text()
    host_tcti = re.search(r"^tcti\s*=\s*(\S+)", config, re.M)
    if not host_tcti:
        raise XenError(f"sim reboot: {d / 'config.ini'} names no tcti; restart the host with `sim up`")
    return _port(host_tcti.group(1)), _port((d / "run" / "ptpm.tcti").read_text())


def _running(d: Path, name: str) -> bool:
    dom = domains.find(domains.snapshot(d), name)
    return bool(dom and dom.get("pid") and domains.is_alive(dom["pid"]))


def _start_manager(d: Path, cfg: dict[str, Any]) -> None:
    """Create the manager paused, follow its console from the first line, and return once it serves;
    XenError if it stops or hangs.  Why it stopped is in its first own line: on the pty, or, as the
    pty goes with the domain and may take its last lines along, in its console log if one is kept."""
    name = str(cfg["name"])
    log = d / "logs" / f"guest-{name}.log"
    offset = log.stat().st_size if log.exists() else 0
    domid = xl.create_domain(str(d), xl.spec_from_cfg(cfg), paused=True)
    with xl.xenstore(str(d)) as xs:
        if not xs.wait_for(lambda: console_tty(xs, domid) is not None, [tty_node(domid)], 10):
            raise XenError(f"{name} has no console after 10 s; is xenconsoled running?")
        tty = str(console_tty(xs, domid))
    text = ""
    with PtyReader(tty) as pty:
        xl.pause(str(d), name, stop=False)
        deadline = time.monotonic() + MANAGER_TIMEOUT
        while MANAGER_SERVES not in text:
            text += pty.read()
            if MANAGER_STOPPED in text or not _running(d, name):
                domains.wait_until(lambda: not _running(d, name), 5)   # its exit follows that line
                if log.exists():
                    text += log.read_bytes()[offset:].decode(errors="replace")
                reason = [ln.strip() for ln in text.splitlines() if ln.startswith("vtpmmgr: ")]
                raise XenError(f"{name} stopped" + (f" ({reason[0]})" if reason else "") +
                               f"; see its console (`xl console {name}`, logs/guest-{name}.log)")
            if time.monotonic() > deadline:
                raise XenError(f"{name} not serving after {MANAGER_TIMEOUT:g} s; see logs/guest-{name}.log")
            time.sleep(0.05)


def _start(d: Path, cfg: dict[str, Any]) -> None:
    name = str(cfg["name"])
    if _kind(cfg) == 0:
        _start_manager(d, cfg)
        return
    for entry in cfg.get("vtpm", []):
        backend = str(parse_vtpm(str(entry))["backend"])
        if not _running(d, backend):
            raise XenError(f"its vTPM backend {backend} is not running")
    if devicemodel.has_tpm([str(a) for a in cfg.get("device_model_args_hvm") or []]):   # an swtpm runs first
        cfg_file = d / "images" / f"{name}.cfg"
        host.run_tool(d, "vtpm", "start", name, *(("--cfg", str(cfg_file)) if cfg_file.exists() else ()))
    domid = xl.create_domain(str(d), xl.spec_from_cfg(cfg))
    if cfg.get("vtpm") and _kind(cfg) == 2:
        host.wait_connected(d, domid, name)


def _boot_domains(d: Path) -> list[dict[str, Any]]:
    """The configs of the host's boot domains, in boot order (see the module's docstring)."""
    auto = d / "boot" / "auto"
    configs = {str(name): cfg for name, cfg in json.loads(auto.read_text()).items()} if auto.exists() else {}
    for dom in domains.snapshot(d)["domains"].values():
        if dom.get("cfg"):
            configs[dom["name"]] = dom["cfg"]
    auto.parent.mkdir(parents=True, exist_ok=True)
    auto.write_text(json.dumps(configs, indent=1, sort_keys=True))
    for name in configs:
        cfg_file = d / "images" / f"{name}.cfg"
        if cfg_file.exists():
            configs[name] = load_cfg(str(cfg_file))
    return sorted(configs.values(), key=_kind)


def reboot(sim_dir: str | Path, measure: list[tuple[int, str]] | None = None) -> dict[str, Any]:
    """Power-cycle the host in sim_dir; measure: (PCR, event) replacing what those PCRs measure."""
    d = Path(sim_dir).resolve()
    if not host.is_up(d):
        raise PreconditionFailed(f"sim reboot: no simulated host runs in {d}; run `xen-vtpm sim up --dir {d}`")
    plan = _boot_domains(d)
    ports = _tpm_ports(d)
    host.down(d)
    if measure:
        boot.save(d, boot.apply_changes(boot.load(d), measure))
    try:
        host.power_on(d, ports)
    except BaseException:
        host.down(d)
        raise
    started, failed = [], []
    for cfg in plan:
        try:
            _start(d, cfg)
            started.append(str(cfg["name"]))
        except XenVtpmError as exc:
            failed.append(f"{cfg['name']} ({exc})")
    if failed:
        raise XenError(f"sim reboot: the host is up but {len(failed)} domain(s) did not start: " + "; ".join(failed))
    return {"dir": str(d), "started": started}
