"""Who is who on this host: domains, their vTPM frontends, backends and UUIDs.

Everything comes from XenStore (plus `xl list` for run states), never from
the simulator.  Nodes a guest can write (its own frontend directory) are not
trusted for identity: the vTPM UUID and backend path come from libxl's
``/libxl/<domid>/device/vtpm/<N>`` copy, and the backend's ``uuid`` is only a
cross-check whose disagreement is reported, not resolved.
"""
from __future__ import annotations

from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import XenStoreNotFound, XlError

from .xenstore import XenStore
from .xl import Xl

XENBUS_STATES = {"0": "Unknown", "1": "Initialising", "2": "InitWait", "3": "Initialised", "4": "Connected",
                 "5": "Closing", "6": "Closed", "7": "Reconfiguring", "8": "Reconfigured"}


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


def vtpm_links(xs: XenStore, domid: int) -> list[dict[str, Any]]:
    """The vTPM frontends of domain ``domid``: devid, states, backend, trusted uuid and its cross-check.

    ``uuid_check`` is "ok" only when libxl's trusted copy and the backend's ``uuid`` agree.
    """
    base = f"/local/domain/{domid}/device/vtpm"
    rows = []
    for n in sorted(_ls(xs, base), key=lambda s: (not s.isdigit(), s.zfill(8))):
        fe = f"{base}/{n}"
        trusted = f"/libxl/{domid}/device/vtpm/{n}"
        be = xs.read_or(f"{trusted}/backend") or xs.read_or(f"{fe}/backend")
        be_domid = _domid_of(be)
        uuid = xs.read_or(f"{trusted}/uuid")
        be_uuid = xs.read_or(f"{be}/uuid") if be else None
        if uuid is None:
            check = "no trusted uuid copy in /libxl"
        elif be_uuid is None:
            check = "backend has no uuid"
        elif be_uuid.lower() != uuid.lower():
            check = f"MISMATCH: backend uuid {be_uuid}"
        else:
            check = "ok"
        rows.append({
            "devid": int(n) if n.isdigit() else n,
            "state": xs.read_or(f"{fe}/state"),
            "backend_domid": be_domid,
            "backend_name": xs.read_or(f"/local/domain/{be_domid}/name") if be_domid is not None else None,
            "backend_path": be,
            "backend_state": xs.read_or(f"{be}/state") if be else None,
            "uuid": uuid,
            "backend_uuid": be_uuid,
            "uuid_check": check,
        })
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
            vtpms = vtpm_links(xs, d)
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
