"""Who is who on this host: domains, their vTPM frontends, backends and UUIDs.

Everything comes from XenStore (plus `xl list` for run states), never from the simulator.
A guest can write its own frontend directory (``/local/domain/<F>/device/vtpm``, docs/xen-internals.md
§8.2), so nothing there decides anything: which vTPM devices a domain has, their backend paths and
UUIDs come from libxl's copy ``/libxl/<F>/device/vtpm/<N>``, which only dom0 can write.  The backend's
``uuid`` is a cross-check whose disagreement is reported, not resolved.  The two values still read
from nodes a domain can write (the frontend's and the backend's xenbus ``state``, the backend's
``uuid``) are shown only if they have the expected form, so a hostile guest can neither grow nor
break what `list` prints, nor make a command about it — or about another guest — fail.
"""
from __future__ import annotations

import re
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import XenStoreError, XenStoreNotFound, XlError

from .devicemodel import managed_uuid, tpm_sockets
from .xenstore import XenStore
from .xl import Xl

XENBUS_STATES = {"0": "Unknown", "1": "Initialising", "2": "InitWait", "3": "Initialised", "4": "Connected",
                 "5": "Closing", "6": "Closed", "7": "Reconfiguring", "8": "Reconfigured"}
_UUID = re.compile(r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}")
INVALID = "invalid"      # what a malformed domain-written value is shown as


def _run_states(cfg: Config) -> dict[int, str] | None:
    """domid -> xl's state flags, or None when xl cannot be run (XenStore still tells the rest)."""
    try:
        return {row["domid"]: row["state"] for row in Xl(cfg).list()}
    except XlError:
        return None


def _ls(xs: XenStore, path: str) -> list[str]:
    """Children of path; [] if it is gone (domains come and go while we look)."""
    try:
        return xs.ls(path)
    except XenStoreNotFound:
        return []


def _domid_of(path: str | None) -> int | None:
    parts = (path or "").split("/")
    if len(parts) > 3 and parts[1:3] == ["local", "domain"] and parts[3].isdigit():
        return int(parts[3])
    return None


def _untrusted(xs: XenStore, path: str, pattern: re.Pattern[str]) -> str | None:
    """A node some domain may write: its value if it has the expected form, INVALID otherwise,
    None if it is missing.  Whatever the domain made of it (huge, binary, a directory that
    cannot be read), it costs one bounded read and never an error."""
    try:
        value = xs.read(path)
    except XenStoreNotFound:
        return None
    except XenStoreError as exc:
        if getattr(exc, "code", None) is None:
            raise                 # the daemon is unreachable or timed out: not the domain's doing
        return INVALID
    return value if pattern.fullmatch(value) else INVALID


_STATE = re.compile(r"[0-8]")
# The guest closed its own link: libxl's trusted record still names the backend, and nothing serves the
# guest in its place, so the vTPM behind it is still known (a forensic snapshot of the guest works).
LINK_CLOSED = "backend gone: the guest's frontend closed the link; restart the guest to reattach"


def vtpm_links(xs: XenStore, domid: int) -> list[dict[str, Any]]:
    """The vTPM devices libxl gave domain ``domid``: devid, states, backend, trusted uuid and its cross-check.

    ``uuid_check`` is "ok" only when libxl's trusted copy and the backend's ``uuid`` agree.
    """
    base = f"/libxl/{domid}/device/vtpm"
    rows = []
    for n in sorted((n for n in _ls(xs, base) if n.isdigit()), key=int):
        trusted = f"{base}/{n}"
        fe = xs.read_or(f"{trusted}/frontend") or f"/local/domain/{domid}/device/vtpm/{n}"
        be = xs.read_or(f"{trusted}/backend")
        be_domid = _domid_of(be)
        uuid = xs.read_or(f"{trusted}/uuid")
        if uuid is not None and not _UUID.fullmatch(uuid):
            uuid = None
        be_uuid = _untrusted(xs, f"{be}/uuid", _UUID) if be else None
        if uuid is None:
            check = "no trusted uuid copy in /libxl"
        elif be_uuid is None and be and xs.read_or(be) is None:
            # mini-os tpmback removes the whole directory once the frontend's state node is gone or
            # reads 0 (free_tpmif): the guest closed its own link (docs/xen-internals.md §9.2)
            check = LINK_CLOSED
        elif be_uuid is None:
            check = "backend has no uuid"
        elif be_uuid == INVALID:
            check = "MISMATCH: the backend uuid is not a UUID"
        elif be_uuid.lower() != uuid.lower():
            check = f"MISMATCH: backend uuid {be_uuid}"
        else:
            check = "ok"
        rows.append({
            "devid": int(n),
            "state": _untrusted(xs, f"{fe}/state", _STATE),
            "backend_domid": be_domid,
            "backend_name": xs.read_or(f"/local/domain/{be_domid}/name") if be_domid is not None else None,
            "backend_path": be,
            "backend_state": _untrusted(xs, f"{be}/state", _STATE) if be else None,
            "uuid": uuid,
            "backend_uuid": be_uuid,
            "uuid_check": check,
        })
    return rows


def swtpm_links(cfg: Config, xs: XenStore, domid: int) -> list[dict[str, Any]]:
    """An HVM guest's emulator TPM (the swtpm backend), in the shape of ``vtpm_links``.  The socket
    comes from the device model's argv, read in dom0; a socket xen-vtpm does not manage shows
    ``unmanaged`` (``vtpm import`` adopts it)."""
    rows = []
    for devid, sock in enumerate(tpm_sockets(xs, domid)):
        vtpm_uuid = managed_uuid(cfg.swtpm_run_dir, sock)
        rows.append({"devid": devid, "state": None, "backend_domid": 0, "backend_name": "swtpm",
                     "backend_path": sock, "backend_state": None, "uuid": vtpm_uuid, "backend_uuid": None,
                     "uuid_check": "ok" if vtpm_uuid else "unmanaged"})
    return rows


def list_domains(cfg: Config) -> list[dict[str, Any]]:
    """One dict per domain: domid, name, state, role, vtpms (frontends) and served frontends."""
    states = _run_states(cfg)
    with XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout) as xs:
        domids = sorted(int(d) for d in xs.ls("/local/domain") if d.isdigit())
        names = {d: xs.read_or(f"/local/domain/{d}/name") for d in domids}
        out = []
        for d in domids:
            served_base = f"/local/domain/{d}/backend/vtpm"
            served = sorted(int(f) for f in _ls(xs, served_base) if f.isdigit())
            vtpms = vtpm_links(xs, d) or swtpm_links(cfg, xs, d)
            if d == 0:
                role = "dom0"
            elif names[d] == cfg.manager:
                role = "vtpmmgr"
            elif served or any(v["backend_name"] == cfg.manager for v in vtpms):
                role = "vtpm"
            else:
                role = "guest"
            out.append({"domid": d, "name": names[d],
                        "state": states.get(d) if states is not None else None,
                        "role": role, "vtpms": vtpms, "serves": served})
    return out
