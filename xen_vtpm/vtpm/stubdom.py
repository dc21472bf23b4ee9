"""The tool's side of Xen's vTPM stack (vtpmmgr + vtpm stub domains): dom0 primitives.

* the manager: find its domain, read its features, submit checkpoint requests and wait for the
  answer (docs/protocol.md);
* a vTPM disk image: the SHA-1 of both vtpmblk slot blobs (one of them is the manager's H);
* a vTPM stub domain: wait until it is released (facts §11.2 I2), read its console markers (§4.5).

Nothing here knows about the simulated host: it only uses XenStore, files and the config.
"""
from __future__ import annotations

import hashlib
import os
import re
import struct
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

from ..config import Config
from ..errors import (DomainNotFound, ManagerError, NoCheckpointFeature, UsageError, XenStoreNotFound,
                      XenStoreTimeout)
from ..xenstore import XenStore

FEATURE = "data/vtpmmgr/feature-checkpoint"
REQUESTS = "control/vtpmmgr/request"
RESPONSES = "data/vtpmmgr/response"
OPS = ("checkpoint", "restore", "discard")


# --- the manager -------------------------------------------------------------------------------

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

    def __enter__(self) -> "ManagerClient":
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


# --- the vTPM disk image -----------------------------------------------------------------------

def slot_fingerprints(image: str | os.PathLike | bytes) -> tuple[str | None, str | None]:
    """Hex SHA-1 of the blob in slot 0 (byte 0) and slot 1 (byte size/2); None for an empty slot.

    `image` is the image file or a copy of its bytes (a checkpoint holds the copy)."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        with open(image, "rb") as fh:
            image = fh.read()
    data = memoryview(image)
    half = len(data) // 2
    out: list[str | None] = []
    for offset in (0, half):
        head = bytes(data[offset:offset + 4])
        length = struct.unpack(">I", head)[0] if len(head) == 4 else 0
        blob = data[offset + 4:offset + 4 + length] if 0 < length <= half - 4 else b""
        out.append(hashlib.sha1(blob).hexdigest() if len(blob) == length and length else None)
    return out[0], out[1]


def matching_slot(image: str | os.PathLike, manager_hash: str) -> int | None:
    """Which slot the manager's H points at (None: the pair is inconsistent, never start it)."""
    for slot, digest in enumerate(slot_fingerprints(image)):
        if digest is not None and digest == manager_hash.lower():
            return slot
    return None


# --- a vTPM stub domain ------------------------------------------------------------------------

def wait_released(xs: XenStore, vtpm_domid: int, manager_domid: int, timeout: float) -> None:
    """Until the domain is gone (@releaseDomain) AND the manager dropped its backend dir (OPEN cleared)."""
    be = f"/local/domain/{manager_domid}/backend/vtpm/{vtpm_domid}"

    def released() -> bool:
        return not xs.is_introduced(vtpm_domid) and not xs.exists(be)
    if not xs.wait_for(released, ["@releaseDomain", be], timeout):
        raise XenStoreTimeout(f"domain {vtpm_domid}: vTPM stub domain not released by the manager within "
                              f"{timeout:g} s ({be} still present); do not start another vTPM with its UUID")


_LOADED = re.compile(r"vtpmblk\.c:\d+: Info: Read (\d+) bytes from NVM persistent storage \(slot ([01])\)")
_MARKERS = (("checksum-failed", "Error: NVM Storage Checksum failed!"),
            ("loadhashkey-failed", "Error: VTPM_LoadHashKey failed"))


@dataclass(frozen=True)
class ConsoleStatus:
    kind: str                  # "loaded", "checksum-failed", "loadhashkey-failed" or "none" (no marker yet)
    slot: int | None = None
    nbytes: int | None = None

    @property
    def fresh(self) -> bool:
        """The vTPM came up as a brand-new TPM: never let a guest or a probe reach it."""
        return self.kind in ("checksum-failed", "loadhashkey-failed")

    @property
    def loaded(self) -> bool:
        return self.kind == "loaded"

    @property
    def reason(self) -> str:
        """The console line behind the status, for messages."""
        return {"loaded": f"Read {self.nbytes} bytes from NVM persistent storage (slot {self.slot})",
                "checksum-failed": "NVM Storage Checksum failed!",
                "loadhashkey-failed": "VTPM_LoadHashKey failed"}.get(self.kind, "no load marker on the console")


def log_path(cfg: Config, name: str) -> Path:
    return Path(cfg.log_dir) / f"guest-{name}.log"


def log_offset(cfg: Config, name: str) -> int:
    """Current size of the console log: pass it to console_status to see only the next boot."""
    try:
        return log_path(cfg, name).stat().st_size
    except FileNotFoundError:
        return 0


def console_status(cfg: Config, name: str, offset: int = 0) -> ConsoleStatus:
    """The last load marker written to the console log after ``offset``."""
    try:
        with open(log_path(cfg, name), "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ConsoleStatus("none")
    status = ConsoleStatus("none")
    for line in text.splitlines():
        m = _LOADED.search(line)
        if m:
            status = ConsoleStatus("loaded", int(m.group(2)), int(m.group(1)))
            continue
        for kind, marker in _MARKERS:
            if marker in line:
                status = ConsoleStatus(kind)
                break
    return status


def wait_console_status(cfg: Config, name: str, offset: int, timeout: float) -> ConsoleStatus:
    """Poll the console log (a plain file: no event to wait on) until a load marker appears."""
    deadline = time.monotonic() + timeout
    while True:
        status = console_status(cfg, name, offset)
        if status.kind != "none":
            return status
        if time.monotonic() > deadline:
            raise XenStoreTimeout(f"{name}: no vTPM load marker in {log_path(cfg, name)} within {timeout:g} s; "
                                  f"check the stub domain's console log")
        time.sleep(0.05)
