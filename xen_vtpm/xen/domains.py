"""Guest domains and their vTPM as the coordinator needs them, read from XenStore and `xl list`.

Identity comes from what the toolstack wrote (libxl's ``/libxl/<domid>/device/vtpm`` copy and the
backend directory, or for an swtpm vTPM the device model's argv), never from nodes the guest itself
can write; see ``topology`` and ``devicemodel``.  A guest with a Xen vtpm device has a stub-domain
vTPM; one whose QEMU has an emulator TPM on an xen-vtpm swtpm socket has an swtpm vTPM.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

from xen_vtpm.errors import DomainNotFound, IntegrityError, PreconditionFailed
from xen_vtpm.model import Guest, VtpmRef

from .devicemodel import managed_uuid, tpm_sockets
from .topology import LINK_CLOSED, vtpm_links
from .xenstore import XenStore
from .xl import Xl


def domid_of(xs: XenStore, name: str) -> int | None:
    """The domid of the running domain called ``name`` (None if there is none)."""
    for d in xs.ls("/local/domain"):
        if d.isdigit() and xs.read_or(f"/local/domain/{d}/name") == name:
            return int(d)
    return None


class Guests:
    def __init__(self, xs: XenStore, xl: Xl, swtpm_run_dir: Path | None = None) -> None:
        self.xs, self.xl = xs, xl
        self.swtpm_run_dir = swtpm_run_dir

    def _swtpm_ref(self, domid: int, name: str) -> VtpmRef:
        """No Xen vtpm device: an emulator TPM in the device model, on one of xen-vtpm's swtpm sockets."""
        sockets = tpm_sockets(self.xs, domid)
        if not sockets:
            raise PreconditionFailed(f"{name}: the guest has no vTPM; use `xl save`/`xl restore` directly, or give "
                                     f"it one with `xen-vtpm vtpm add {name} --backend swtpm`")
        if len(sockets) > 1:
            raise PreconditionFailed(f"{name}: the guest has {len(sockets)} vTPMs; only one per guest is supported")
        vtpm_uuid = managed_uuid(self.swtpm_run_dir, sockets[0]) if self.swtpm_run_dir else None
        if vtpm_uuid is None:
            raise PreconditionFailed(f"{name}: its TPM is an swtpm on {sockets[0]}, which xen-vtpm does not manage; "
                                     f"adopt its state with `xen-vtpm vtpm import {name} --swtpm-state DIR`")
        return VtpmRef(guest=name, devid=0, backend=f"swtpm-{name}", uuid=vtpm_uuid, backend_kind="swtpm")

    def exists(self, name: str) -> bool:
        return domid_of(self.xs, name) is not None

    def _row(self, name: str) -> dict[str, Any]:
        return next((row for row in self.xl.list() if row["name"] == name), {"state": "", "mem": 0})

    def is_paused(self, name: str) -> bool:
        return "p" in self._row(name)["state"]

    def find(self, domain: str) -> Guest:
        """A running guest with exactly one verified vTPM, by name or domid."""
        domid = int(domain) if domain.isdigit() else domid_of(self.xs, domain)
        if domid is None or not self.xs.exists(f"/local/domain/{domid}"):
            raise DomainNotFound(f"{domain}: no such domain; check `xen-vtpm list`")
        name = self.xs.read(f"/local/domain/{domid}/name")
        vm_path = self.xs.read_or(f"/local/domain/{domid}/vm") or ""
        vm_uuid = vm_path.rsplit("/", 1)[-1]
        if not vm_uuid:
            raise PreconditionFailed(f"{name}: domain has no /vm entry in XenStore; is it a fully created guest?")
        links = vtpm_links(self.xs, domid)
        row = self._row(name)
        if not links:
            ref = self._swtpm_ref(domid, name)
            return Guest(name=name, domid=domid, uuid=vm_uuid, vtpm=ref, paused="p" in row["state"],
                         mem_mib=row["mem"])
        if len(links) > 1:
            raise PreconditionFailed(f"{name}: the guest has {len(links)} vTPMs; only one per guest is supported")
        link = links[0]
        if link["uuid_check"] not in ("ok", LINK_CLOSED):
            raise IntegrityError(f"{name}: vTPM {link['devid']} identity check failed ({link['uuid_check']}); "
                                 "the backend does not match libxl's trusted record — investigate before "
                                 "snapshotting")
        # The vTPM's identity at the manager is the UUID of the stub domain's own link to it, not the
        # guest's device uuid (docs/xen-internals.md §3.1).
        mgr_links = vtpm_links(self.xs, link["backend_domid"]) if link["backend_domid"] is not None else []
        if len(mgr_links) != 1 or mgr_links[0]["uuid_check"] != "ok":
            raise PreconditionFailed(f"{link['backend_name']}: the vTPM stub domain has no single verified link "
                                     "to the vTPM manager; check `xen-vtpm list`")
        ref = VtpmRef(guest=name, devid=link["devid"], backend=link["backend_name"], uuid=mgr_links[0]["uuid"])
        return Guest(name=name, domid=domid, uuid=vm_uuid, vtpm=ref, paused="p" in row["state"], mem_mib=row["mem"])
