"""Requests to the vTPM manager's checkpoint extension over XenStore (docs/protocol.md).

Find the manager's domain, read whether it advertises the extension, submit a request and wait
for its answer.  dom0 only: the request nodes are dom0's and only readable by the manager.
The transfer ops (export, import, unexport, remove, adopt) move a vTPM's entry to another host's
manager inside an envelope only that manager's physical TPM opens (docs/protocol.md §9).
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
TRANSFER_FEATURE = "data/vtpmmgr/feature-transfer"
TRANSFER_KEY = "data/vtpmmgr/transfer-key"
PROVISIONED = "data/vtpmmgr/provisioned"       # "1"/"0": group 0 has seals and a kernel list (docs/protocol.md)
REQUESTS = "control/vtpmmgr/request"
RESPONSES = "data/vtpmmgr/response"
OPS = ("checkpoint", "restore", "discard")
TRANSFER_OPS = ("export", "import", "unexport", "remove", "adopt")
ENVELOPE_SIZE = 1 + 64 + 16 + 64 + 16     # vtpmmgr/src/xfer_envelope.h


@dataclass(frozen=True)
class ManagerInfo:
    domid: int
    name: str
    checkpoint: bool           # advertises feature-checkpoint = "1"
    transfer_key: bytes | None = None   # x ‖ y of its TPM-resident transfer key (feature-transfer = "1")


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
                key = None
                if self.xs.read_or(f"/local/domain/{dom}/{TRANSFER_FEATURE}") == "1":
                    key = _point(self.xs.read_or(f"/local/domain/{dom}/{TRANSFER_KEY}") or "", name)
                return ManagerInfo(int(dom), name, flag == "1", key)
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
        fields = {"checkpoint": _canonical(checkpoint, "checkpoint id")}
        if vtpm_uuid is not None:
            fields["uuid"] = _canonical(vtpm_uuid, "vTPM uuid")
        return self._request(op, fields, timeout)[0]

    def _request(self, op: str, fields: dict[str, str], timeout: float | None) -> tuple[str, str]:
        """One request with these fields; (hash, envelope) of a successful answer."""
        subject = f"checkpoint {fields['checkpoint']}" if "checkpoint" in fields else f"vTPM {fields.get('uuid')}"
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
            for key, value in {"op": op, **fields}.items():
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
        envelope = self.xs.read_or(f"{rsp}/envelope") or ""
        self._rm(rsp)
        if status is None:
            raise XenStoreTimeout(f"{mgr.name}: no answer to {op} request {rid} within {wait:g} s; request "
                                  f"withdrawn, check that the manager runs and is not paused")
        if status != "ok":
            cause = " ".join((error or f"status {status}").split())[:300]   # one line, bounded
            raise ManagerError(f"{mgr.name}: {op} of {subject} refused: {cause}")
        if not re.fullmatch(r"[0-9a-f]{40}", digest):
            raise ManagerError(f"{mgr.name}: {op} of {subject} answered ok without a valid hash "
                               f"({digest[:48]!r}); check the manager version against docs/protocol.md")
        return digest, envelope

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



    # --- moving a vTPM to another host's manager (docs/protocol.md §9) -------------------------------
    def _transfer(self, op: str, vtpm_uuid: str, timeout: float | None = None,
                  **extra: str | None) -> tuple[str, str]:
        mgr = self.info()
        if mgr.transfer_key is None:
            raise NoCheckpointFeature(f"{mgr.name}: the vTPM manager cannot move vTPMs (no feature-transfer); "
                                      "start it with transfer=1 in its extra= (docs/protocol.md §9)")
        fields = {"uuid": _canonical(vtpm_uuid, "vTPM uuid")}
        fields.update({k: v for k, v in extra.items() if v is not None})
        return self._request(op, fields, timeout)

    def export(self, vtpm_uuid: str, transfer: str, recipient: bytes,
               checkpoint: str | None = None) -> tuple[str, bytes]:
        """Wrap the vTPM's entry (or one of its checkpoint entries) for ``recipient``, another manager's
        transfer key; the vTPM's own entry is parked first.  Returns (H, envelope)."""
        if len(recipient) != 64:
            raise UsageError(f"export: the recipient key has {len(recipient)} bytes, expected 64 (x ‖ y)")
        digest, envelope = self._transfer(
            "export", vtpm_uuid, transfer=_canonical(transfer, "transfer id"), recipient=recipient.hex(),
            checkpoint=_canonical(checkpoint, "checkpoint id") if checkpoint else None)
        if not re.fullmatch(f"[0-9a-f]{{{2 * ENVELOPE_SIZE}}}", envelope):
            raise ManagerError(f"{self.cfg.manager}: export of vTPM {vtpm_uuid} answered without an envelope; "
                               "check the manager version against docs/protocol.md")
        return digest, bytes.fromhex(envelope)

    def import_entry(self, vtpm_uuid: str, transfer: str, envelope: bytes, checkpoint: str | None = None) -> str:
        """Open an envelope with this manager's transfer key and add the entry (idempotent)."""
        return self._transfer("import", vtpm_uuid, transfer=_canonical(transfer, "transfer id"),
                              envelope=envelope.hex(),
                              checkpoint=_canonical(checkpoint, "checkpoint id") if checkpoint else None)[0]

    def unexport(self, vtpm_uuid: str) -> str:
        return self._transfer("unexport", vtpm_uuid)[0]

    def adopt(self, vtpm_uuid: str) -> str:
        return self._transfer("adopt", vtpm_uuid)[0]

    def remove(self, vtpm_uuid: str) -> str:
        """Idempotent: an entry that is already gone counts as removed."""
        try:
            return self._transfer("remove", vtpm_uuid)[0]
        except ManagerError as exc:
            if f"unknown vTPM uuid {_canonical(vtpm_uuid, 'vTPM uuid')}" in str(exc):
                return ""
            raise


def _point(text: str, name: str) -> bytes:
    if not re.fullmatch("[0-9a-f]{128}", text):
        raise ManagerError(f"{name}: its transfer key node holds {text[:40]!r}, not 128 hex digits; "
                           "check the manager version against docs/protocol.md")
    return bytes.fromhex(text)
