"""Requests to the vTPM manager's checkpoint extension over XenStore (docs/protocol.md).

Find the manager's domain, read whether it advertises the extension, submit a request and wait
for its answer.  dom0 only: the request nodes are dom0's and only readable by the manager.
"""
from __future__ import annotations

import re
import uuid as uuidlib
from dataclasses import dataclass

from xen_vtpm.config import Config
from xen_vtpm.errors import (
    DomainNotFound,
    ManagerError,
    NoCheckpointFeature,
    UsageError,
    XenStoreNotFound,
    XenStoreTimeout,
)
from xen_vtpm.xen.xenstore import XenStore

FEATURE = "data/vtpmmgr/feature-checkpoint"
PROVISIONED = "data/vtpmmgr/provisioned"       # "1"/"0": group 0 has seals and a kernel list (docs/protocol.md)
REQUESTS = "control/vtpmmgr/request"
RESPONSES = "data/vtpmmgr/response"
OPS = ("checkpoint", "restore", "discard")


@dataclass(frozen=True)
class ManagerInfo:
    domid: int
    name: str
    checkpoint: bool           # advertises feature-checkpoint = "1"


def _canonical(value: str, what: str) -> str:
    try:
        text = str(uuidlib.UUID(value))
    except (ValueError, TypeError, AttributeError):
        raise UsageError(f"{what} {value!r} is not a UUID; pass the canonical 8-4-4-4-12 form") from None
    return text


class ManagerClient:
    """Requests to the vtpmmgr checkpoint extension over XenStore (dom0 only)."""

    def __init__(self, cfg: Config, xs: XenStore | None = None) -> None:
        self.cfg = cfg
        self._own = xs is None
        self.xs = xs if xs is not None else XenStore(cfg.xenstore_path or None, cfg.xenstore_timeout)

    def close(self) -> None:
        if self._own:
            self.xs.close()

    def __enter__(self) -> ManagerClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def info(self) -> ManagerInfo:
        name = self.cfg.manager
        for dom in self.xs.ls("/local/domain"):
            if dom.isdigit() and self.xs.read_or(f"/local/domain/{dom}/name") == name:
                flag = self.xs.read_or(f"/local/domain/{dom}/{FEATURE}")
                return ManagerInfo(int(dom), name, flag == "1")
        raise DomainNotFound(f"{name}: no vTPM manager domain of that name; start it or set manager= in the config")

    def supports_checkpoints(self) -> bool:
        return self.info().checkpoint

    def submit(self, op: str, checkpoint: str, vtpm_uuid: str | None = None, timeout: float | None = None) -> str:
        """Run one request; returns the hex H of the entry it touched.

        Raises NoCheckpointFeature (stock manager), ManagerError (answered with an error) or
        XenStoreTimeout (no answer; the request is withdrawn so a paused manager cannot run it later).
        """
        if op not in OPS:
            raise UsageError(f"manager request: unknown op {op!r}; expected one of {', '.join(OPS)}")
        checkpoint = _canonical(checkpoint, "checkpoint id")
        vtpm_uuid = _canonical(vtpm_uuid, "vTPM uuid") if vtpm_uuid is not None else None
        mgr = self.info()
        if not mgr.checkpoint:
            raise NoCheckpointFeature(f"{mgr.name}: manager has no checkpoint support (stock vtpmmgr); "
                                      f"see docs/protocol.md")
        home = f"/local/domain/{mgr.domid}"
        rid = uuidlib.uuid4().hex
        req, rsp = f"{home}/{REQUESTS}/{rid}", f"{home}/{RESPONSES}/{rid}"
        perms = ["n0", f"r{mgr.domid}"]       # dom0 owns, the manager may only read

        def write(tx) -> None:
            for path in (f"{home}/control/vtpmmgr", f"{home}/{REQUESTS}"):
                if not tx.exists(path):
                    tx.mkdir(path)
                tx.set_perms(path, perms)
            tx.mkdir(req)
            tx.set_perms(req, perms)
            fields = {"op": op, "checkpoint": checkpoint}
            if vtpm_uuid is not None:
                fields["uuid"] = vtpm_uuid
            for key, value in fields.items():
                tx.write(f"{req}/{key}", value)
                tx.set_perms(f"{req}/{key}", perms)
            tx.write(f"{req}/state", "submitted")
            tx.set_perms(f"{req}/state", perms)
        self.xs.transact(write)
        wait = self.cfg.manager_timeout if timeout is None else timeout
        self.xs.wait_for(lambda: self.xs.read_or(f"{rsp}/status") is not None, [rsp], wait)
        self._rm(req)
        status = self.xs.read_or(f"{rsp}/status")
        error = self.xs.read_or(f"{rsp}/error") or ""
        digest = self.xs.read_or(f"{rsp}/hash") or ""
        self._rm(rsp)
        if status is None:
            raise XenStoreTimeout(f"{mgr.name}: no answer to {op} request {rid} within {wait:g} s; request "
                                  f"withdrawn, check that the manager runs and is not paused")
        if status != "ok":
            cause = " ".join((error or f"status {status}").split())[:300]   # one line, bounded
            raise ManagerError(f"{mgr.name}: {op} of checkpoint {checkpoint} refused: {cause}")
        if not re.fullmatch(r"[0-9a-f]{40}", digest):
            raise ManagerError(f"{mgr.name}: {op} of checkpoint {checkpoint} answered ok without a valid hash "
                               f"({digest[:48]!r}); check the manager version against docs/protocol.md")
        return digest

    def _rm(self, path: str) -> None:
        try:
            self.xs.rm(path)
        except XenStoreNotFound:
            pass

    def checkpoint(self, vtpm_uuid: str, checkpoint: str, timeout: float | None = None) -> str:
        return self.submit("checkpoint", checkpoint, vtpm_uuid, timeout)

    def restore(self, vtpm_uuid: str, checkpoint: str, timeout: float | None = None) -> str:
        return self.submit("restore", checkpoint, vtpm_uuid, timeout)

    def discard(self, checkpoint: str, vtpm_uuid: str | None = None, timeout: float | None = None) -> str:
        """Idempotent: an entry that is already gone counts as discarded, so recover can repeat it."""
        try:
            return self.submit("discard", checkpoint, vtpm_uuid, timeout)
        except ManagerError as exc:
            if f"unknown checkpoint {_canonical(checkpoint, 'checkpoint id')}" in str(exc):
                return ""
            raise


