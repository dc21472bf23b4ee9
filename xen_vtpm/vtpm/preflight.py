"""The stub-domain vTPM's real-host preconditions, each a check with its exact fix.

`xen-vtpm doctor` runs them all; ``StubdomBackend.check_can_restart`` runs the ones without which a
restarted vTPM would come up fresh or out of step with its guest, and refuses the command up front.
Why each matters is in docs/real-xen.md; the Xen facts behind them are in docs/xen-internals.md §3.5
(XSM), §4.2 (provisioning), §6.5 (startup modes), §7.5-§7.6 (consoles), §5.6 (disks).
"""
from __future__ import annotations

import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

from xen_vtpm.config import Config
from xen_vtpm.errors import ManagerError, NoCheckpointFeature, XenVtpmError
from xen_vtpm.model import Check
from xen_vtpm.xen.consoles import console_tty, log_path
from xen_vtpm.xen.disks import vbds
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xl import Xl
from xen_vtpm.xen.xlcfg import load_cfg

from .manager import PROVISIONED, ManagerClient

DOCS = "docs/real-xen.md"
PROBE_TIMEOUT = 5.0


def xsm(xl: Xl) -> Check:
    fix = ("boot a hypervisor built with XSM/FLASK (CONFIG_XSM_FLASK=y, `flask=enforcing`) and give each vTPM stub "
           f"domain a seclabel= whose hash is in the manager's kernel list ({DOCS})")
    try:
        mode = xl.getenforce()
    except XenVtpmError as exc:
        return Check("xsm", False, f"cannot tell whether FLASK is on ({exc})", fix)
    if mode == "disabled":
        return Check("xsm", False, "the hypervisor has no XSM (`xl getenforce`: Flask XSM Disabled), so vtpmmgr "
                                   "cannot read a vTPM's label and refuses every reload", fix)
    return Check("xsm", True, f"FLASK {mode}")


def manager_running(xs: XenStore, xl: Xl, mgr: ManagerClient) -> Check:
    fix = f"start the vTPM manager domain ({DOCS}) or set manager= in the xen-vtpm config"
    try:
        info = mgr.info()
        state = next((row["state"] for row in xl.list() if row["domid"] == info.domid), "")
    except XenVtpmError as exc:
        return Check("manager", False, str(exc), fix)
    if {"p", "c", "d"} & set(state):
        return Check("manager", False, f"{info.name} (domain {info.domid}) is {state}, so it answers nothing",
                     f"`xl unpause {info.name}`, or restart it if it crashed")
    return Check("manager", True, f"{info.name} runs as domain {info.domid}")


def extension(mgr: ManagerClient) -> Check:
    """The checkpoint extension is advertised and answers a request (a discard of an id nobody has)."""
    fix = f"install the vtpmmgr with the checkpoint extension ({DOCS})"
    try:
        mgr.submit("discard", str(uuidlib.uuid4()), timeout=PROBE_TIMEOUT)
    except NoCheckpointFeature:
        return Check("checkpoint-extension", False, "the manager does not advertise feature-checkpoint (stock "
                                                    "vtpmmgr): snapshots could never be rolled back", fix)
    except ManagerError as exc:
        if "unknown checkpoint" in str(exc):
            return Check("checkpoint-extension", True, "present and answering")
        return Check("checkpoint-extension", False, f"answers with an unexpected error: {exc}", fix)
    except XenVtpmError as exc:
        return Check("checkpoint-extension", False, f"advertised but not answering: {exc}",
                     "check that the manager runs and is not paused")
    return Check("checkpoint-extension", False, "a probe request succeeded where it had to fail", fix)


def provisioned(xs: XenStore, mgr: ManagerClient, *, strict: bool = True) -> Check:
    """Group 0 has seals (the manager writes its disk) and a kernel list (it reloads vTPMs).  Without the
    extension the manager says nothing: unknown, which ``strict`` counts as failed."""
    fix = (f"provision the manager's group 0 with its seal list and the vTPM stub domains' kernel (label) hashes "
           f"({DOCS})")
    try:
        info = mgr.info()
    except XenVtpmError as exc:
        return Check("provisioned", False, str(exc), fix)
    flag = xs.read_or(f"/local/domain/{info.domid}/{PROVISIONED}")
    if flag == "1":
        return Check("provisioned", True, "group 0 has its seals and kernel list")
    if flag == "0":
        return Check("provisioned", False, "the manager's group 0 is not provisioned: it never writes its disk and "
                                           "refuses every reload (Unauthorized vTPM kernel image)", fix)
    if not info.checkpoint and not strict:
        return Check("provisioned", True, "unknown (stock manager); each start is verified on the console")
    return Check("provisioned", False, "the manager does not say whether it is provisioned",
                 f"install the vtpmmgr with the checkpoint extension ({DOCS}), which reports it")


def persistence(xs: XenStore, mgr: ManagerClient) -> Check:
    """Whether the manager's table survives its restart (a reboot): the xen-vtpm vtpmmgr series
    publishes its build, the host TPM's version, whether it persists and its anti-rollback
    (docs/vtpmmgr-tpm2.md).  Without persistence every host reboot brings every vTPM up fresh."""
    fix = "run the vtpmmgr of the xen-vtpm patch series and provision group 0 (docs/vtpmmgr-tpm2.md)"
    try:
        home = f"/local/domain/{mgr.info().domid}/data/vtpmmgr"
    except XenVtpmError as exc:
        return Check("manager-persists", False, str(exc), fix)
    persistent, build, tpm, anti = (xs.read_or(f"{home}/{n}") for n in ("persistent", "build", "tpm", "anti-rollback"))
    if persistent is None:
        return Check("manager-persists", False, "the manager does not say whether its table survives a restart "
                                                "(not the xen-vtpm series)", fix)
    seen = f"{build}; host TPM {tpm}; anti-rollback {anti}"
    if persistent != "1":
        return Check("manager-persists", False, f"the manager writes no table, so a reboot brings every vTPM up "
                                                f"fresh ({seen})", fix)
    return Check("manager-persists", True, seen)


def console(cfg: Config, xs: XenStore, mgr: ManagerClient) -> Check:
    """xenconsoled serves ptys (probed on the manager's console); logging is reported but not needed."""
    fix = "start xenconsoled (it gives every domain a console pty; `XENCONSOLED_TRACE=guest` adds log files)"
    try:
        info = mgr.info()
    except XenVtpmError as exc:
        return Check("console", False, f"no domain to probe ({exc})", fix)
    logging = log_path(cfg.log_dir, info.name).exists()
    tty = console_tty(xs, info.domid)
    if tty is None:
        return Check("console", False, f"no console pty for {info.name}: xenconsoled is not running, so no vTPM's "
                                       "load can be verified", fix)
    return Check("console", True, f"console ptys served ({tty} for {info.name}); logging to {cfg.log_dir} "
                                  f"{'on' if logging else 'off (xen-vtpm reads the ptys)'}")


def startup(stub: str, cfg_file: Path) -> Check:
    name = f"startup:{stub}"
    try:
        words = str(load_cfg(str(cfg_file)).get("extra", "")).split()
    except XenVtpmError as exc:
        return Check(name, False, str(exc), f"fix {cfg_file}")
    mode = next((w for w in reversed(words) if w in ("clear", "save", "deactivated")), "clear")
    if mode == "save":
        return Check(name, True, f"extra=\"save\" in {cfg_file}")
    return Check(name, False, f"startup mode {mode} in {cfg_file}: every restart resets the vTPM's PCRs, which then "
                              "no longer match the guest's memory",
                 f"add save to extra= in {cfg_file} (once the vTPM has saved its state; {DOCS})")


def disk(xs: XenStore, stub: str, domid: int) -> Check:
    name = f"disk:{stub}"
    found = vbds(xs, domid)
    if not found:
        return Check(name, False, "no disk in its vbd backends", f"give {stub} its image as hda ({DOCS})")
    first = found[0]
    if first.format != "raw":
        return Check(name, False, f"{first.path} is a {first.format} image (backend {first.backend_type})",
                     "convert it with `qemu-img convert -O raw` and use the raw image as hda")
    if not first.writable:
        return Check(name, False, f"{first.path} is attached read-only", f"attach it writable (hda,w) to {stub}")
    return Check(name, True, f"raw {first.path} ({first.backend_type} backend)")


def manager_locality(cfg: Config) -> Check:
    """vtpmmgr on locality 2 leaves locality 0 to dom0's driver (xen-vtpmmgr(7))."""
    path = Path(cfg.domain_cfg_dir) / f"{cfg.manager}.cfg"
    fix = (f"add tpmlocality=2 to extra= in {path} and let iomem= cover locality 2 (e.g. iomem=[\"fed40,5\"]); "
           "dom0 keeps locality 0")
    try:
        words = str(load_cfg(str(path)).get("extra", "")).split()
    except XenVtpmError as exc:
        return Check("manager-locality", False, f"cannot read the manager's cfg ({exc})", fix)
    loc = next((w.split("=", 1)[1] for w in words if w.startswith("tpmlocality=")), "0")
    if loc != "2":
        return Check("manager-locality", False, f"the manager uses TPM locality {loc}, like dom0", fix)
    return Check("manager-locality", True, "the manager uses locality 2, dom0 locality 0")


def restart_checks(cfg: Config, xs: XenStore, xl: Xl, mgr: ManagerClient, stub: str,
                   cfg_file: Path) -> Iterator[Check]:
    """What a vTPM restart needs, in the order to fix them (lazily: the caller stops at the first failure)."""
    yield xsm(xl)
    yield provisioned(xs, mgr, strict=False)
    yield console(cfg, xs, mgr)
    yield startup(stub, cfg_file)


def stub_domains(xs: XenStore, mgr: ManagerClient) -> list[tuple[str, int]]:
    """The running vTPM stub domains: the frontends of the manager's backend directory."""
    try:
        home = f"/local/domain/{mgr.info().domid}/backend/vtpm"
    except XenVtpmError:
        return []
    out = []
    for fe in sorted(xs.ls(home), key=int) if xs.exists(home) else []:
        name = xs.read_or(f"/local/domain/{fe}/name")
        if name is not None:
            out.append((name, int(fe)))
    return out


def vtpm_checks(cfg: Config, xs: XenStore, xl: Xl, mgr: ManagerClient) -> list[Check]:
    """Everything `xen-vtpm doctor` asks of the stub-domain vTPM stack."""
    checks = [xsm(xl), manager_running(xs, xl, mgr), extension(mgr), provisioned(xs, mgr), persistence(xs, mgr),
              manager_locality(cfg), console(cfg, xs, mgr)]
    for stub, domid in stub_domains(xs, mgr):
        checks.append(startup(stub, Path(cfg.domain_cfg_dir) / f"{stub}.cfg"))
        checks.append(disk(xs, stub, domid))
    return checks
