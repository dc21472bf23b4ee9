"""`python -m xen_vtpm_sim.xl`: an `xl` work-alike for the simulated host.

Domains are processes (see domains.py for the table that stands in for the
hypervisor).  XenStore gets what libxl writes on a real host (docs/xen-internals.md §8),
save files are real xl save files (savestream.py), and messages and exit codes
are shaped like xl's so the tool cannot tell the difference.
"""
from __future__ import annotations

import contextlib
import json
import mmap
import os
import signal
import stat
import subprocess
import sys
import time
import uuid as uuidlib
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from xen_vtpm.errors import DomainNotFound, MalformedSaveFile, UsageError, XenVtpmError, XlConfigError, XlError
from xen_vtpm.xen.savefile import read_save_header
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xlcfg import load_cfg, parse_disk, parse_vtpm
from xen_vtpm_sim import devicemodel, domains, platform, xenconsoled

from .domains import DOMID_ENV, OWNER_ENV
from .guest import memory_path
from .savestream import read_save, write_save

INIT_TIMEOUT = 10.0      # LIBXL_INIT_TIMEOUT: backend must reach InitWait
SUSPEND_TIMEOUT = 30.0   # guest must acknowledge control/shutdown=suspend
SHUTDOWN_TIMEOUT = 10.0
DEFAULT_MEMORY = 128
PACKAGE_ROOT = str(Path(__file__).resolve().parents[1])


def sim_dir_from_env() -> str:
    d = os.environ.get("XEN_VTPM_SIM_DIR")
    if not d:
        raise UsageError("xl: XEN_VTPM_SIM_DIR is not set; run `eval $(xen-vtpm sim up --dir DIR)` first")
    return os.path.abspath(d)


def xenstore(sim_dir: str) -> XenStore:
    return XenStore(os.path.join(sim_dir, "xenstored.sock"))


def module_for(kernel: str) -> str:
    base = os.path.basename(kernel or "")
    if "vtpmmgr" in base:
        return "xen_vtpm_sim.vtpmmgr"
    if "vtpm" in base:
        return "xen_vtpm_sim.vtpm_stubdom"
    return "xen_vtpm_sim.guest"


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- domain spec: what xl create and xl restore both build from -------------

def spec_from_cfg(cfg: dict[str, Any]) -> dict[str, Any]:
    if not cfg.get("name"):
        raise XlConfigError("Domain name must be specified.")
    vtpms = []
    for devid, entry in enumerate(cfg.get("vtpm", [])):
        v = parse_vtpm(str(entry))
        vtpms.append({"devid": devid, "backend_domname": v["backend"], "uuid": v["uuid"]})
    for d in cfg.get("disk", []):
        parse_disk(str(d))
    memory = cfg.get("memory", DEFAULT_MEMORY)
    if not isinstance(memory, int) or not 1 <= memory <= 1 << 20:
        raise XlConfigError(f"{cfg['name']}: memory={memory!r} must be a whole number of MiB between 1 and 1048576")
    return {"name": str(cfg["name"]), "uuid": cfg.get("uuid") or str(uuidlib.uuid4()),
            "memory": int(cfg.get("memory", DEFAULT_MEMORY)), "kernel": str(cfg.get("kernel", "")),
            "extra": str(cfg.get("extra", "")), "disk": [str(d) for d in cfg.get("disk", [])],
            "vtpms": vtpms, "cfg": cfg}


def spec_from_json(config: dict[str, Any]) -> dict[str, Any]:
    """Inverse of libxl_config(): the JSON embedded in a save file."""
    try:
        return _spec_from_json(config)
    except (KeyError, TypeError, AttributeError, ValueError) as exc:
        raise MalformedSaveFile(f"save file config is not a libxl domain config ({exc.__class__.__name__}: "
                                f"{exc}); restore with `xl restore CFG FILE`") from None


def _spec_from_json(config: dict[str, Any]) -> dict[str, Any]:
    c_info, b_info = config.get("c_info", {}), config.get("b_info", {})
    disks = [f"{d['pdev_path']},{d.get('format', 'raw')},{d['vdev']},{'w' if d.get('readwrite', 1) else 'r'}"
             for d in config.get("disks", [])]
    vtpms = [{"devid": v.get("devid", i), "backend_domname": v.get("backend_domname") or str(v.get("backend_domid", 0)),
              "uuid": v.get("uuid")} for i, v in enumerate(config.get("vtpms", []))]
    cfg = {"name": c_info.get("name"), "uuid": c_info.get("uuid"), "memory": b_info.get("max_memkb", 0) // 1024,
           "kernel": b_info.get("kernel", ""), "extra": b_info.get("cmdline", ""), "disk": disks,
           "vtpm": [f"backend={v['backend_domname']}" + (f",uuid={v['uuid']}" if v["uuid"] else "") for v in vtpms]}
    if b_info.get("extra_hvm"):
        cfg["device_model_args_hvm"] = list(b_info["extra_hvm"])
    if not cfg["name"] or not cfg["memory"]:
        raise MalformedSaveFile("save file config has no domain name or memory size; use `xl restore CFG FILE`")
    spec = spec_from_cfg(cfg)
    spec["vtpms"] = vtpms
    return spec


def libxl_config(dom: dict[str, Any]) -> dict[str, Any]:
    """The libxl_domain_config JSON that xl embeds in a save file."""
    disks = []
    for d in dom["disk"]:
        p = parse_disk(d)
        disks.append({"pdev_path": p["target"], "vdev": p["vdev"], "format": p["format"],
                      "readwrite": 1 if p["access"] == "rw" else 0})
    extra_hvm = devicemodel.extra_hvm(dom.get("cfg") or {})
    return {
        "c_info": {"type": "hvm", "name": dom["name"], "uuid": dom["uuid"]},
        "b_info": {"max_memkb": dom["memory"] * 1024, "target_memkb": dom["memory"] * 1024,
                   "kernel": dom["kernel"], "cmdline": dom["extra"], "max_vcpus": 1,
                   **({"extra_hvm": extra_hvm} if extra_hvm else {})},
        "disks": disks,
        "vtpms": [{"backend_domid": v["backend_domid"], "backend_domname": v["backend_domname"],
                   "devid": v["devid"], "uuid": v["uuid"]} for v in dom["vtpms"]],
        "on_poweroff": "destroy", "on_reboot": "restart", "on_crash": "destroy",
    }


# --- create -------------------------------------------------------------------

def _resolve_backends(sim_dir: str, spec: dict[str, Any]) -> list[dict[str, Any]]:
    """backend= is resolved at device-add time: digits are a domid, else a name."""
    table = domains.snapshot(sim_dir)
    out = []
    for v in spec["vtpms"]:
        name = str(v["backend_domname"])
        if name.isdigit():
            domid = int(name)
            if domid != 0 and str(domid) not in table["domains"]:
                raise XlError(f"libxl: error: vtpm backend domain {domid} does not exist")
            bname = "Domain-0" if domid == 0 else table["domains"][str(domid)]["name"]
        elif name == "Domain-0":
            domid, bname = 0, name
        else:
            dom = domains.find(table, name)
            if dom is None:
                raise XlError(f"libxl: error: vtpm backend {name!r} is not a domain; start it first")
            domid, bname = dom["domid"], dom["name"]
        out.append({"devid": v["devid"], "backend_domid": domid, "backend_domname": bname,
                    "uuid": v["uuid"] or str(uuidlib.uuid4())})
    return out


def _write_domain_nodes(xs: XenStore, domid: int, spec: dict[str, Any]) -> None:
    dp, vm = f"/local/domain/{domid}", f"/vm/{spec['uuid']}"
    ro, rw = ["n0", f"r{domid}"], [f"n{domid}"]

    def tx_fn(tx):
        tx.mkdir(dp)
        tx.set_perms(dp, ro)
        for key, val in (("name", spec["name"]), ("domid", str(domid)), ("vm", vm),
                         ("memory/static-max", str(spec["memory"] * 1024)),
                         ("memory/target", str(spec["memory"] * 1024))):
            tx.write(f"{dp}/{key}", val)
            tx.set_perms(f"{dp}/{key}", ro)
        for sub in ("control", "control/shutdown", "data", "device"):
            tx.mkdir(f"{dp}/{sub}")
            tx.set_perms(f"{dp}/{sub}", rw)
        tx.mkdir(vm)
        tx.set_perms(vm, ro)
        for key, val in (("name", spec["name"]), ("uuid", spec["uuid"]), ("start_time", f"{time.time():.2f}")):
            tx.write(f"{vm}/{key}", val)
            tx.set_perms(f"{vm}/{key}", ro)
        tx.mkdir(f"/libxl/{domid}")
        tx.write(f"/libxl/{domid}/type", "hvm")
    xs.transact(tx_fn)


def _device_nodes(fe: str, fe_keys: dict[str, str], fe_perms: list[str], be: str, be_keys: dict[str, str],
                  be_perms: list[str], lx: str) -> Callable[[Any], None]:
    """libxl__device_generic_add's transaction: frontend and backend with their permissions, and libxl's
    own copy of the backend keys under /libxl (docs/xen-internals.md §8.1, §8.2)."""
    def tx_fn(tx) -> None:
        for path, keys, perms in ((fe, fe_keys, fe_perms), (be, be_keys, be_perms)):
            tx.mkdir(path)
            tx.set_perms(path, perms)
            for key, val in keys.items():
                tx.write(f"{path}/{key}", val)
                tx.set_perms(f"{path}/{key}", perms)
        tx.mkdir(lx)
        tx.write(f"{lx}/frontend", fe)
        tx.write(f"{lx}/backend", be)
        for key, val in be_keys.items():
            tx.write(f"{lx}/{key}", val)
    return tx_fn


def _add_vtpm(xs: XenStore, domid: int, v: dict[str, Any]) -> None:
    """libxl__device_vtpm_add: fe + be + trusted copy in one transaction, then wait for InitWait."""
    b, n = v["backend_domid"], v["devid"]
    fe = f"/local/domain/{domid}/device/vtpm/{n}"
    be = f"/local/domain/{b}/backend/vtpm/{domid}/{n}"
    lx = f"/libxl/{domid}/device/vtpm/{n}"
    fe_keys = {"backend": be, "backend-id": str(b), "state": "1", "handle": str(n)}
    be_keys = {"frontend": fe, "frontend-id": str(domid), "online": "1", "state": "1", "handle": str(n),
               "uuid": v["uuid"], "resume": "False"}

    xs.transact(_device_nodes(fe, fe_keys, [f"n{domid}", f"r{b}"], be, be_keys, [f"n{b}", f"r{domid}"], lx))
    if not xs.wait_for(lambda: xs.read_or(f"{be}/state") == "2", [f"{be}/state"], INIT_TIMEOUT):
        raise XlError(f"libxl: error: vtpm {n}: backend {v['backend_domname']} (domid {b}) did not reach "
                      f"InitWait within {INIT_TIMEOUT:g} s; check that the vTPM domain is running")


def vdev_number(vdev: str) -> int:
    """libxl__device_disk_dev_number for the whole-disk names a stub domain uses (hd*, sd*, xvd*)."""
    for prefix, first, base, shift, limit in (("xvd", "a", 202 << 8, 4, 16), ("hd", "a", None, 6, 4),
                                                ("sd", "a", 8 << 8, 4, 16)):
        rest = vdev[len(prefix):]
        if vdev.startswith(prefix) and len(rest) == 1 and 0 <= ord(rest) - ord(first) < limit:
            disk = ord(rest) - ord(first)
            if base is None:                             # hda/hdb on major 3, hdc/hdd on 22
                return ((3 if disk < 2 else 22) << 8) | ((disk & 1) << 6)
            return base | (disk << shift)
    raise XlConfigError(f"libxl: error: Invalid or unsupported virtual disk identifier {vdev}")


def _disk_backend(disk: dict[str, str]) -> tuple[str, str, str]:
    """(backend kind, `type` node, `params` node) as libxl chooses them (docs/xen-internals.md §5.6): a raw
    image on a block device or a regular file goes to blkback (`phy`, params = the path, the block script
    claims it), any other format to QEMU's qdisk (params = `<format>:<path>`)."""
    if disk["format"] != "raw":
        return "qdisk", "qdisk", f"{disk['format']}:{disk['target']}"
    try:
        mode = os.stat(disk["target"]).st_mode
    except OSError as exc:
        raise XlError(f"libxl: error: Disk vdev={disk['vdev']} failed to stat: {disk['target']}: "
                      f"{exc.strerror}") from None
    if not (stat.S_ISBLK(mode) or stat.S_ISREG(mode)):
        raise XlError(f"libxl: error: no suitable backend for disk {disk['vdev']}")
    return "vbd", "phy", disk["target"]


def _block_hotplug(params: str) -> dict[str, str]:
    """The nodes tools/hotplug/Linux/block adds: a block device is used as it is (symlinks resolved), a
    regular file through a loop device (here: the file itself stands in for /dev/loopN)."""
    real = os.path.realpath(params)
    if stat.S_ISBLK(os.stat(real).st_mode):
        return {"physical-device-path": real}
    return {"physical-device-path": real, "node": real}


def _add_disks(xs: XenStore, domid: int, disks: list[str]) -> None:
    """libxl__device_disk_add for each disk= entry: frontend, backend in dom0 and the /libxl copy."""
    for spec in disks:
        disk = parse_disk(spec)
        devid = vdev_number(disk["vdev"])
        kind, btype, params = _disk_backend(disk)
        fe = f"/local/domain/{domid}/device/vbd/{devid}"
        be = f"/local/domain/0/backend/{kind}/{domid}/{devid}"
        lx = f"/libxl/{domid}/device/vbd/{devid}"
        fe_keys = {"backend": be, "backend-id": "0", "state": "1", "virtual-device": str(devid),
                   "device-type": "disk"}
        be_keys = {"frontend": fe, "params": params, "frontend-id": str(domid), "online": "1", "removable": "0",
                   "bootable": "1", "state": "1", "dev": disk["vdev"], "type": btype,
                   "mode": "w" if disk["access"] == "rw" else "r", "device-type": "disk"}
        if btype == "phy":
            be_keys.update(_block_hotplug(params), state="2")

        xs.transact(_device_nodes(fe, fe_keys, [f"n{domid}", "r0"], be, be_keys, ["n0", f"r{domid}"], lx))


def _spawn(sim_dir: str, domid: int, spec: dict[str, Any], vtpms: list[dict[str, Any]]) -> int:
    """Start the domain process stopped, like a freshly built domain before unpause."""
    rdir = domains.run_dir(sim_dir)
    cfg_file = rdir / f"dom-{domid}.json"
    cfg = dict(spec["cfg"], name=spec["name"], uuid=spec["uuid"], memory=spec["memory"], domid=domid,
               vtpms=vtpms)
    cfg_file.write_text(json.dumps(cfg, indent=1))
    env = dict(os.environ, XENSTORED_PATH=os.path.join(sim_dir, f"xenstored.sock.d{domid}"),
               XEN_VTPM_SIM_DIR=sim_dir, **{OWNER_ENV: sim_dir, DOMID_ENV: str(domid)})
    # The domain runs `python -m xen_vtpm...`: let it find this very package.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (PACKAGE_ROOT, os.environ.get("PYTHONPATH")) if p)
    argv = [sys.executable, "-m", module_for(spec["kernel"]), "--sim-dir", sim_dir, "--domid", str(domid),
            "--name", spec["name"], "--config", str(cfg_file)]
    # The domain's output is its console ring: a pipe xenconsoled reads (or nothing, if none runs).
    ring, out = os.pipe()
    try:
        if not xenconsoled.attach(Path(sim_dir) / "run" / "xenconsoled.sock", domid, ring):
            os.close(out)
            out = os.open(os.devnull, os.O_WRONLY)
        # The shell stops itself before exec'ing the domain, so nothing runs until unpause.
        proc = subprocess.Popen(["/bin/sh", "-c", 'kill -STOP $$; exec "$@"', "sh", *argv], env=env,
                                stdin=subprocess.DEVNULL, stdout=out, stderr=out, start_new_session=True,
                                cwd=sim_dir)
    finally:
        os.close(ring)
        os.close(out)
    if not domains.wait_until(lambda: domains.is_stopped(proc.pid), 10):
        domains.kill_group(proc.pid, sim_dir)
        raise XlError(f"{spec['name']}: domain process did not start; see its console (`xl console`)")
    return proc.pid


def create_domain(sim_dir: str, spec: dict[str, Any], paused: bool = False,
                  fill_memory: Callable[[mmap.mmap], None] | None = None,
                  dm_incoming: Callable[[], bytes | None] | None = None) -> int:
    vtpms = _resolve_backends(sim_dir, spec)
    with domains.locked(sim_dir) as table:
        if domains.find(table, spec["name"]) is not None or spec["name"] == "Domain-0":
            raise XlError(f"libxl: error: domain with name \"{spec['name']}\" already exists.")
        domid = table["next_domid"]
        table["next_domid"] = domid + 1
        dom = {"domid": domid, "name": spec["name"], "uuid": spec["uuid"], "memory": spec["memory"],
               "kernel": spec["kernel"], "extra": spec["extra"], "disk": spec["disk"], "vtpms": vtpms,
               "cfg": spec["cfg"], "pid": None, "memfile": None, "start": time.time()}
        table["domains"][str(domid)] = dom
    try:
        with xenstore(sim_dir) as xs:
            _write_domain_nodes(xs, domid, spec)
            xs.introduce(domid, 0x1000 + domid, 1)
            if module_for(spec["kernel"]) == "xen_vtpm_sim.guest":
                mem = memory_path(sim_dir, domid)
                _update(sim_dir, domid, memfile=str(mem))   # recorded first, so a failure cleans it up
                with open(mem, "wb+") as fh:
                    fh.truncate(spec["memory"] << 20)
                    if fill_memory is not None:
                        mm = mmap.mmap(fh.fileno(), spec["memory"] << 20)
                        try:
                            fill_memory(mm)
                        finally:
                            # A failed reader's traceback may still hold a view; then GC unmaps it.
                            with contextlib.suppress(BufferError):
                                mm.close()
            _add_disks(xs, domid, spec["disk"])
            pid = _spawn(sim_dir, domid, spec, vtpms)
            _update(sim_dir, domid, pid=pid)
            dm_pid = devicemodel.start_for(sim_dir, domid, spec, dm_incoming() if dm_incoming else None)
            if dm_pid is not None:
                _update(sim_dir, domid, dm_pid=dm_pid)
            for v in vtpms:
                _add_vtpm(xs, domid, v)
        if not paused:
            domains.kill_group(pid, sim_dir, signal.SIGCONT)
    except BaseException:
        _destroy(sim_dir, domid, quiet=True)
        raise
    return domid


def _update(sim_dir: str, domid: int, **fields: Any) -> None:
    with domains.locked(sim_dir) as table:
        table["domains"][str(domid)].update(fields)


# --- lookup and lifecycle -------------------------------------------------------

def lookup(sim_dir: str, ident: str) -> dict[str, Any]:
    dom = domains.find(domains.snapshot(sim_dir), str(ident))
    if dom is None:
        raise DomainNotFound(f"{ident} is an invalid domain identifier (rc=-6)")
    return dom


def _destroy(sim_dir: str, domid: int, quiet: bool = False) -> None:
    with domains.locked(sim_dir) as table:
        dom = table["domains"].get(str(domid))
    if dom is None:
        return
    devicemodel.stop_for(sim_dir, dom)
    if dom.get("pid"):
        domains.kill_group(dom["pid"], sim_dir)
        if not domains.wait_until(lambda: not domains.is_alive(dom["pid"]), 10) and not quiet:
            raise XlError(f"libxl: error: domain {domid}: process {dom['pid']} does not die")
    try:
        with xenstore(sim_dir) as xs:
            # The toolstack removes frontend and backend paths of the domain's devices.
            backends = {f"/local/domain/{v['backend_domid']}/backend/vtpm/{domid}" for v in dom["vtpms"]}
            backends |= {f"/local/domain/0/backend/{kind}/{domid}" for kind in ("vbd", "qdisk")}

            def tx_fn(tx):
                for path in (*sorted(backends), f"/local/domain/{domid}", f"/libxl/{domid}", f"/vm/{dom['uuid']}",
                             f"/local/domain/0/device-model/{domid}"):
                    if tx.exists(path):
                        tx.rm(path)
            xs.transact(tx_fn)
            if xs.is_introduced(domid):
                xs.release(domid)
    except XenVtpmError:
        if not quiet:
            raise
    finally:
        for path in (dom.get("memfile"), str(domains.run_dir(sim_dir) / f"dom-{domid}.json")):
            if path:
                Path(path).unlink(missing_ok=True)
        with domains.locked(sim_dir) as table:
            table["domains"].pop(str(domid), None)


def destroy(sim_dir: str, ident: str) -> None:
    if str(ident) in ("0", "Domain-0"):
        raise XlError("Cannot destroy privileged domain 0.")
    _destroy(sim_dir, lookup(sim_dir, ident)["domid"])


def pause(sim_dir: str, ident: str, stop: bool = True) -> None:
    if str(ident) in ("0", "Domain-0"):
        raise XlError("Cannot pause or unpause the privileged domain 0.")
    dom = lookup(sim_dir, ident)
    domains.kill_group(dom["pid"], sim_dir, signal.SIGSTOP if stop else signal.SIGCONT)
    if stop:
        domains.wait_until(lambda: domains.is_stopped(dom["pid"]) or not domains.is_alive(dom["pid"]), 5)


def shutdown(sim_dir: str, ident: str) -> None:
    """Ask the guest to power off; clean up once it has gone, as xl's monitor process does."""
    dom = lookup(sim_dir, ident)
    pid = dom["pid"]
    with xenstore(sim_dir) as xs:
        xs.write(f"/local/domain/{dom['domid']}/control/shutdown", "poweroff")
    if not domains.wait_until(lambda: not domains.is_alive(pid), 3):
        domains.kill_group(pid, sim_dir, signal.SIGTERM)
        if not domains.wait_until(lambda: not domains.is_alive(pid), SHUTDOWN_TIMEOUT):
            raise XlError(f"{dom['name']}: guest did not shut down within {SHUTDOWN_TIMEOUT:g} s; "
                          "use `xl destroy`")
    _destroy(sim_dir, dom["domid"])


def state_flags(dom: dict[str, Any]) -> str:
    st = domains.proc_state(dom["pid"]) if dom.get("pid") else None
    if not dom.get("pid"):
        return "--p---"        # still being built: paused until devices are attached
    if st in (None, "Z", "X"):
        return "----c-"
    if st in ("T", "t"):
        return "--p---"
    return "r-----" if st == "R" else "-b----"


def cpu_time(pid: int | None) -> float:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, TypeError):
        return 0.0


def list_text(sim_dir: str) -> str:
    table = domains.snapshot(sim_dir)
    lines = ["Name                                        ID   Mem VCPUs\tState\tTime(s)"]
    with open("/proc/uptime", encoding="ascii") as fh:
        uptime = float(fh.read().split()[0])
    lines.append(f"{'Domain-0':<40} {0:5d} {4096:5d} {os.cpu_count() or 1:5d}     r-----  {uptime:8.1f}")
    for key in sorted(table["domains"], key=int):
        dom = table["domains"][key]
        lines.append(f"{dom['name']:<40} {dom['domid']:5d} {dom['memory']:5d} {1:5d}     "
                     f"{state_flags(dom)}  {cpu_time(dom.get('pid')):8.1f}")
    return "\n".join(lines)


def vtpm_list_text(sim_dir: str, idents: list[str]) -> str:
    lines = ["Idx BE Uuid                                 handle state evt-ch ring-ref BE-path"]
    with xenstore(sim_dir) as xs:
        for ident in idents:
            try:
                domid = 0 if ident in ("0", "Domain-0") else lookup(sim_dir, ident)["domid"]
            except DomainNotFound as exc:
                _err(str(exc))  # xl reports it and goes on with the next domain
                continue
            base = f"/local/domain/{domid}/device/vtpm"
            for n in sorted(xs.ls(base) if xs.exists(base) else [], key=int):
                fe = f"{base}/{n}"
                be = xs.read_or(f"{fe}/backend", "")
                uuid = xs.read_or(f"/libxl/{domid}/device/vtpm/{n}/uuid") or str(uuidlib.UUID(int=0))
                num = lambda p: int(xs.read_or(p, "-1") or -1)  # noqa: E731
                lines.append(f"{int(n):<3d} {num(fe + '/backend-id'):<2d} {uuid} {int(n):6d} "
                             f"{num(fe + '/state'):5d} {num(fe + '/event-channel'):6d} "
                             f"{num(fe + '/ring-ref'):8d} {be:<30}")
    return "\n".join(lines)


# --- save / restore -------------------------------------------------------------

def _suspend(sim_dir: str, dom: dict[str, Any]) -> None:
    """control/shutdown=suspend; the guest clears it and stops itself."""
    pid, node = dom["pid"], f"/local/domain/{dom['domid']}/control/shutdown"
    if domains.is_stopped(pid):
        raise XlError(f"{dom['name']}: domain is paused and cannot acknowledge a suspend request; "
                      "unpause it first")
    with xenstore(sim_dir) as xs:
        xs.write(node, "suspend")
        acked = xs.wait_for(lambda: not xs.read_or(node, "") or not domains.is_alive(pid), [node], SUSPEND_TIMEOUT)
        if not acked and domains.is_alive(pid):
            xs.write(node, "")
            raise XlError(f"libxl: error: {dom['name']}: guest did not acknowledge the suspend request "
                          f"within {SUSPEND_TIMEOUT:g} s")
    if not domains.wait_until(lambda: domains.is_stopped(pid) or not domains.is_alive(pid), SUSPEND_TIMEOUT):
        raise XlError(f"libxl: error: {dom['name']}: guest acknowledged suspend but did not suspend")
    if not domains.is_alive(pid):
        raise XlError(f"libxl: error: {dom['name']}: guest died during suspend")


def save(sim_dir: str, ident: str, file: str, cfg_file: str | None = None,
         checkpoint: bool = False, leave_paused: bool = False) -> None:
    dom = lookup(sim_dir, ident)
    if not dom.get("memfile"):
        raise XlError(f"{dom['name']}: saving a stub domain is not supported (mini-os has no save support)")
    if cfg_file:
        spec = spec_from_cfg(load_cfg(cfg_file))
        spec["vtpms"] = _resolve_backends(sim_dir, spec)
        config = libxl_config(dict(dom, **{k: spec[k] for k in ("name", "uuid", "memory", "kernel", "extra",
                                                                 "disk", "vtpms")}))
    else:
        config = libxl_config(dom)
    try:
        out = open(file, "wb")
    except OSError as exc:
        raise XlError(f"Failed to open temp file {file} for writing: {exc.strerror}") from None
    _err(f"Saving to {file} new xl format")
    with out:
        _suspend(sim_dir, dom)
        try:
            emulator = devicemodel.save_state(sim_dir, dom["domid"]) if dom.get("dm_pid") else None
            with open(dom["memfile"], "rb") as fh, mmap.mmap(fh.fileno(), 0, prot=mmap.PROT_READ) as mm:
                write_save(out, config, mm, domid=dom["domid"], emulator_context=emulator)
            out.flush()
        except BaseException as exc:
            if dom.get("dm_pid"):
                with contextlib.suppress(XenVtpmError, OSError):
                    devicemodel.resume(sim_dir, dom["domid"])
            domains.kill_group(dom["pid"], sim_dir, signal.SIGCONT)  # resume: the save changed nothing
            if isinstance(exc, OSError):
                raise XlError(f"libxl: error: {dom['name']}: writing {file} failed: {exc.strerror}") from None
            raise
    if (checkpoint or leave_paused) and dom.get("dm_pid"):
        devicemodel.resume(sim_dir, dom["domid"])    # libxl_domain_resume: QMP cont
    if checkpoint:
        domains.kill_group(dom["pid"], sim_dir, signal.SIGCONT)
    elif not leave_paused:
        _destroy(sim_dir, dom["domid"])


class _Replay:
    """Reads the header once to size the guest, then replays it to read_save (fifos cannot seek)."""

    def __init__(self, inp: BinaryIO) -> None:
        self.inp, self.name = inp, getattr(inp, "name", "<save stream>")
        self.seen = bytearray()
        self.recording = True

    def rewind(self) -> None:
        self.recording = False

    def read(self, n: int = -1) -> bytes:
        if not self.recording and self.seen:
            out = bytes(self.seen[:n] if n >= 0 else self.seen)
            del self.seen[:len(out)]
            return out
        data = self.inp.read(n)
        if self.recording:
            self.seen += data
        return data

    def readinto(self, view) -> int:
        if self.recording or self.seen:
            data = self.read(len(view))
            view[:len(data)] = data
            return len(data)
        return self.inp.readinto(view)


def restore(sim_dir: str, file: str, cfg_file: str | None = None, paused: bool = False) -> int:
    try:
        inp: BinaryIO = open(file, "rb")
    except OSError as exc:
        raise XlError(f"cannot open restore file {file}: {exc.strerror}") from None
    with inp:
        recorder = _Replay(inp)
        header = read_save_header(recorder)
        recorder.rewind()
        _err(f"Loading new save file {file} (new xl fmt info 0x{header.mandatory_flags:x}/"
             f"0x{header.optional_flags:x}/{header.stream_offset - 40})")
        if cfg_file and cfg_file != "/dev/null":
            spec = spec_from_cfg(load_cfg(cfg_file))
        else:
            spec = spec_from_json(header.config)
        saved_memory = header.config.get("b_info", {}).get("max_memkb", spec["memory"] * 1024) // 1024
        if saved_memory != spec["memory"]:
            raise XlConfigError(f"{cfg_file}: memory={spec['memory']} does not match the saved domain's "
                                f"{saved_memory} MiB")
        saved: dict[str, Any] = {}
        return create_domain(sim_dir, spec, paused=paused,
                             fill_memory=lambda mm: saved.update(info=read_save(recorder, mm)),
                             dm_incoming=lambda: saved["info"].emulator_context)


# --- command line ----------------------------------------------------------------

USAGE = {
    "create": "Usage: xl [-v] create <ConfigFile> [options] [vars]\n\nCreate a domain from config file <filename>.\n\n"
              "Options:\n\n-p             Leave the domain paused after it is created.",
    "list": "Usage: xl [-v] list [options] [Domain]\n\nList information about all/some domains.",
    "pause": "Usage: xl [-v] pause <Domain>\n\nPause execution of a domain.",
    "unpause": "Usage: xl [-v] unpause <Domain>\n\nUnpause a paused domain.",
    "destroy": "Usage: xl [-v] destroy <Domain>\n\nTerminate a domain immediately.",
    "shutdown": "Usage: xl [-v] shutdown <Domain>\n\nIssue a shutdown signal to a domain.",
    "save": "Usage: xl [-v] save [options] <Domain> <CheckpointFile> [<ConfigFile>]\n\n"
            "Save a domain state to restore later.\n\nOptions:\n\n"
            "-c                    Leave domain running after creating the snapshot.\n"
            "-p                    Leave domain paused after creating the snapshot.",
    "restore": "Usage: xl [-v] restore [options] [<ConfigFile>] <CheckpointFile>\n\n"
               "Restore a domain from a saved state.\n\nOptions:\n\n"
               "-p                     Do not unpause domain after restoring it.",
    "vtpm-list": "Usage: xl [-v] vtpm-list <Domain(s)>\n\nList virtual TPM devices for a domain.",
    "domid": "Usage: xl [-v] domid <DomainName>\n\nConvert a domain name to domain id.",
    "domname": "Usage: xl [-v] domname <DomainId>\n\nConvert a domain id to domain name.",
    "getenforce": "Usage: xl [-v] getenforce \n\nReturns the current enforcing mode of the Flask Xen security module",
}


class _Usage(Exception):
    pass


def _opts(cmd: str, args: list[str], flags: str, min_args: int, max_args: int | None) -> tuple[set[str], list[str]]:
    seen, rest = set(), []
    for a in args:
        if a.startswith("-") and len(a) > 1 and not rest:
            for ch in a[1:]:
                if ch == "h":
                    print(USAGE[cmd])
                    raise SystemExit(0)
                if ch not in flags:
                    _err(f"xl {cmd}: invalid option -- '{ch}'")
                    raise _Usage(cmd)
                seen.add(ch)
        else:
            rest.append(a)
    if len(rest) < min_args:
        _err(f"'xl {cmd}' requires at least {min_args} argument{'s' if min_args > 1 else ''}.\n")
        raise _Usage(cmd)
    if max_args is not None and len(rest) > max_args:
        _err(f"'xl {cmd}': too many arguments.\n")
        raise _Usage(cmd)
    return seen, rest


def run_command(sim_dir: str, cmd: str, args: list[str]) -> int:
    if cmd == "create":
        flags, rest = _opts(cmd, args, "p", 1, 1)
        _err(f"Parsing config from {rest[0]}")
        create_domain(sim_dir, spec_from_cfg(load_cfg(rest[0])), paused="p" in flags)
    elif cmd == "list":
        _opts(cmd, args, "", 0, 0)
        print(list_text(sim_dir))
    elif cmd in ("pause", "unpause"):
        pause(sim_dir, _opts(cmd, args, "", 1, 1)[1][0], stop=cmd == "pause")
    elif cmd == "destroy":
        destroy(sim_dir, _opts(cmd, args, "", 1, 1)[1][0])
    elif cmd == "shutdown":
        shutdown(sim_dir, _opts(cmd, args, "", 1, 1)[1][0])
    elif cmd == "save":
        flags, rest = _opts(cmd, args, "cp", 2, 3)
        if {"c", "p"} <= flags:
            _err("xl save: -c and -p are mutually exclusive")
            raise _Usage(cmd)
        save(sim_dir, rest[0], rest[1], rest[2] if len(rest) > 2 else None,
             checkpoint="c" in flags, leave_paused="p" in flags)
    elif cmd == "restore":
        flags, rest = _opts(cmd, args, "p", 1, 2)
        restore(sim_dir, rest[-1], rest[0] if len(rest) == 2 else None, paused="p" in flags)
    elif cmd == "vtpm-list":
        print(vtpm_list_text(sim_dir, _opts(cmd, args, "", 1, None)[1]))
    elif cmd == "domid":
        name = _opts(cmd, args, "", 1, 1)[1][0]
        dom = None if name == "Domain-0" else domains.find(domains.snapshot(sim_dir), name)
        if name != "Domain-0" and (dom is None or dom["name"] != name):
            raise DomainNotFound(f"Can't get domid of domain name '{name}', maybe this domain does not exist.")
        print(0 if dom is None else dom["domid"])
    elif cmd == "domname":
        ident = _opts(cmd, args, "", 1, 1)[1][0]
        if ident == "0":
            print("Domain-0")
            return 0
        dom = domains.snapshot(sim_dir)["domains"].get(ident) if ident.isdigit() else None
        if dom is None:
            raise DomainNotFound(f"Can't get domain name of domain id '{ident}', maybe this domain does not exist.")
        print(dom["name"])
    elif cmd == "getenforce":
        _opts(cmd, args, "", 0, 0)
        return getenforce(sim_dir)
    else:
        _err("command not implemented")
        return 1
    return 0


def getenforce(sim_dir: str) -> int:
    """main_getenforce prints the mode and exits with libxl's answer: 1 enforcing, 0 permissive, -1 (255)
    and "Flask XSM Disabled" without XSM (docs/xen-internals.md §3.5)."""
    if platform.load(sim_dir).xsm == "none":
        print("Flask XSM Disabled")
        return 255
    print("Enforcing")
    return 1


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    while argv and argv[0] == "-v":
        argv.pop(0)
    if not argv or argv[0] in ("help", "-h", "--help"):
        print("Usage xl [-vfNtT] <subcommand> [args]\n\nxl full list of subcommands:\n\n"
              + "\n".join(f" {c}" for c in USAGE))
        return 0 if argv else 1
    cmd, args = argv[0], argv[1:]
    try:
        return run_command(sim_dir_from_env(), cmd, args)
    except _Usage as exc:
        _err(USAGE[str(exc)])
        return 2
    except XenVtpmError as exc:
        _err(str(exc))
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:  # noqa: BLE001 - like xl: one line, never a traceback
        if os.environ.get("XEN_VTPM_DEBUG"):
            raise
        _err(f"xl: unexpected error: {exc.__class__.__name__}: {exc} (rerun with XEN_VTPM_DEBUG=1)")
        return 1


if __name__ == "__main__":
    sys.exit(main())
