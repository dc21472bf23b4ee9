"""Simulated vtpmmgr: the per-host table of 64-byte vTPM secrets (docs/xen-internals.md §2-§4) plus the checkpoint
extension of docs/protocol.md.

`python -m xen_vtpm_sim.vtpmmgr --sim-dir DIR --domid M --name NAME --config CFGJSON`

* tpmback and the ring of every connected vTPM come from `tpmif`; the sealed table on disk from `mgrdisk`.
* SAVEHASHKEY / LOADHASHKEY as vtpm_cmd_handler.c: auto-create on unknown UUID (not marked OPEN),
  "Attempted to open vTPM twice!", OPEN cleared only when the frontend's nodes are gone, then the
  backend dir is removed.  The kernel-hash check follows the simulated platform (`platform.py`): it passes
  on a FLASK host with a provisioned group 0 (the default), fails with TPM_FAIL without XSM and with
  "Unauthorized vTPM kernel image used!" when unprovisioned, leaving the entry bound either way
  (docs/xen-internals.md §3.3, §3.5); an unprovisioned manager never writes its disk (§4.2).
"""
from __future__ import annotations

import signal
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from xen_vtpm_sim import domain_args, platform
from xen_vtpm.errors import XenStoreError
from xen_vtpm_sim import mgrproto as mp
from .platform import Platform
from .mgrdisk import FLAG_ADMIN, FLAG_CHECKPOINT, FLAG_OPEN, DiskError, Entry, MgrDisk, PtpmSealer
from .tpmif import RingServer, TpmBack, Tpmif, log, ring_socket_path
from xen_vtpm.xen.xlcfg import disk_target


# --- the manager ---------------------------------------------------------------------------

@dataclass
class Opaque:
    """Per-tpmif state of vtpmmgr (struct tpm_opaque)."""
    uuid: bytes
    fe_state: str                      # the frontend's state node: gone = the vTPM domain is gone
    vtpm: bytes | None = None          # the UUID this connection holds OPEN (or created)
    server: "RingServer | None" = None


class Manager:
    platform = Platform()              # the simulated host's XSM, provisioning and release timing

    def __init__(self, sim_dir: Path, domid: int, disk: MgrDisk, xs_factory: Callable) -> None:
        self.sim_dir = sim_dir
        self.domid = domid
        self.disk = disk
        self.xs_factory = xs_factory
        self.lock = threading.Lock()
        self.table: dict[bytes, Entry] = {}
        self.live: dict[tuple[int, int], Opaque] = {}

    # tpmback callbacks
    def on_new(self, t: Tpmif) -> None:
        with self.lock:
            self.live[(t.fe_domid, t.devid)] = Opaque(t.uuid, f"{t.fe_path}/state")

    def on_connect(self, t: Tpmif) -> None:
        with self.lock:
            opq = self.live[(t.fe_domid, t.devid)]
            if opq.server is None:
                opq.server = RingServer(ring_socket_path(self.sim_dir, self.domid, t.fe_domid, t.devid),
                                        lambda pkt: self.handle(opq, pkt))
                opq.server.start()

    def on_free(self, t: Tpmif) -> None:
        with self.lock:
            opq = self.live.pop((t.fe_domid, t.devid), None)
            if opq is None:
                return
            if opq.server is not None:
                opq.server.close()
            self._free_opaque(opq.vtpm)

    # --- the Xen 4.17 traps the simulated host can reproduce (docs/xen-internals.md §3.5, §4.2, §9.5) ---
    def _free_opaque(self, uid: bytes | None) -> None:
        """free_opaque clears OPEN; with a release delay, that long after libxl removed the backend dir."""
        if uid and self.platform.release_delay:
            threading.Timer(self.platform.release_delay, self._clear_open, (uid,)).start()
        elif uid:
            self._clear_open_locked(uid)

    def _clear_open(self, uid: bytes) -> None:
        with self.lock:
            self._clear_open_locked(uid)

    def _clear_open_locked(self, uid: bytes) -> None:
        entry = self.table.get(uid)
        if entry is not None:
            entry.flags &= ~FLAG_OPEN

    def _kernel_verified(self) -> int:
        """find_vtpm_khash and the kernel-list check (vtpm_cmd_handler.c:68-99, 119-130): without XSM the
        peer's label cannot be read (TPM_FAIL); an unprovisioned group 0 lists no kernel (TPM_DISABLED)."""
        if self.platform.xsm == "none":
            return mp.TPM_FAIL
        if not self.platform.provisioned:
            log("Unauthorized vTPM kernel image used!")
            return mp.TPM_DISABLED
        return mp.TPM_SUCCESS

    def _persist(self) -> None:
        """vtpm_sync_disk writes nothing while group 0 has no seals (vtpm_disk.c:31-33)."""
        if self.platform.provisioned:
            self.disk.write(self.table)

    # vtpm_cmd_handler.c
    def _find_verified(self, opq: Opaque) -> int:
        if opq.vtpm is not None:
            return mp.TPM_SUCCESS
        entry = self.table.get(opq.uuid)
        if entry is None or entry.flags & FLAG_CHECKPOINT:
            return mp.TPM_BAD_PARAMETER
        if entry.flags & FLAG_OPEN:
            log("Attempted to open vTPM twice!")
            return mp.TPM_DISABLED
        opq.vtpm = opq.uuid           # find_vtpm binds it before the kernel check: a refusal leaves it bound
        rc = self._kernel_verified()
        if rc:
            return rc
        entry.flags |= FLAG_OPEN
        return mp.TPM_SUCCESS

    def handle(self, opq: Opaque, raw: bytes) -> bytes:
        try:
            pkt = mp.decode(raw)
        except mp.ProtocolError:
            return mp.response(mp.TPM_BAD_PARAMETER)
        if pkt.tag != mp.VTPM_TAG_REQ:
            # Management (0x01C2) needs an ADMIN vTPM and pass-through needs a pTPM whitelist;
            # neither is simulated, so answer like a manager that refuses them.
            return mp.response(mp.TPM_AUTHFAIL if pkt.tag == mp.VTPM_TAG_REQ2 else mp.TPM_BADTAG)
        with self.lock:
            if pkt.code == mp.VTPM_ORD_SAVEHASHKEY:
                return self._save(opq, pkt.body)
            if pkt.code == mp.VTPM_ORD_LOADHASHKEY:
                rc = self._find_verified(opq)
                if rc:
                    return mp.response(rc)
                return mp.response(mp.TPM_SUCCESS, mp.stored_reply(self.table[opq.vtpm].data))
        return mp.response(mp.TPM_BAD_ORDINAL)

    def _save(self, opq: Opaque, body: bytes) -> bytes:
        try:
            data = mp.pad_entry(body)
        except mp.ProtocolError:
            return mp.response(mp.TPM_BAD_PARAMETER)
        rc = self._find_verified(opq)
        if rc == mp.TPM_BAD_PARAMETER:
            if opq.uuid in self.table:                 # a checkpoint entry: never writable by a vTPM
                return mp.response(rc)
            flags = FLAG_ADMIN if not any(not e.flags & FLAG_CHECKPOINT for e in self.table.values()) else 0
            log(f"SaveHashKey with unknown UUID={mp.format_uuid(opq.uuid)} - creating in auth0 (f={flags})")
            self.table[opq.uuid] = Entry(flags, bytes(mp.ENTRY_SIZE))
            opq.vtpm = opq.uuid
        elif rc:
            return mp.response(rc)
        self.table[opq.vtpm].data = data
        try:
            self._persist()
        except DiskError as exc:                      # vtpm_sync's result is ignored by the stock one
            log(f"vtpm_disk.c:210: Error: {exc}")
        return mp.response(mp.TPM_SUCCESS)

    # the checkpoint extension (docs/protocol.md)
    def is_open(self, uid: bytes, xs) -> bool:
        """OPEN, or presented by any backend entry; a tpmif whose frontend vanished does not count,
        since the tool may see the domain released before our tpmback thread has freed it."""
        return any((o.uuid == uid or o.vtpm == uid) and xs.read_or(o.fe_state) is not None
                   for o in self.live.values())

    def execute(self, req: mp.CheckpointRequest, xs) -> str:
        """Apply one request; returns the hash hex; RequestError leaves the table as it was."""
        with self.lock:
            try:
                self.disk.verify()
            except DiskError as exc:
                raise mp.RequestError(f"manager disk corrupted: {exc}; table unchanged, restart the manager") from None
            ckpt_name = mp.format_uuid(req.checkpoint)
            ckpt = self.table.get(req.checkpoint)
            before = {k: Entry(v.flags, v.data, v.origin) for k, v in self.table.items()}
            if req.uuid is not None:
                vtpm_name = mp.format_uuid(req.uuid)
                src = self.table.get(req.uuid)
                if src is None or src.flags & FLAG_CHECKPOINT:
                    raise mp.RequestError(f"unknown vTPM uuid {vtpm_name}")
            if req.op == "checkpoint":
                if ckpt is not None:
                    raise mp.RequestError(f"checkpoint {ckpt_name} already exists")
                self.table[req.checkpoint] = Entry(FLAG_CHECKPOINT, src.data, req.uuid)
                result = src.data
            else:
                if ckpt is None or not ckpt.flags & FLAG_CHECKPOINT:
                    raise mp.RequestError(f"unknown checkpoint {ckpt_name}")
                if req.uuid is not None and ckpt.origin != req.uuid:
                    raise mp.RequestError(f"checkpoint {ckpt_name} belongs to vTPM {mp.format_uuid(ckpt.origin)}")
                if req.op == "restore":
                    if self.is_open(req.uuid, xs):
                        raise mp.RequestError(f"vTPM {vtpm_name} is open; destroy its stub domain first")
                    src.data = ckpt.data
                else:
                    del self.table[req.checkpoint]
                result = ckpt.data
            try:
                self._persist()
            except DiskError as exc:
                self.table = before
                raise mp.RequestError(f"{exc}; table unchanged") from None
            return result[:20].hex()


# --- checkpoint requests over XenStore ------------------------------------------------------

class RequestWatcher(threading.Thread):
    POLL = 0.2

    def __init__(self, mgr: Manager) -> None:
        super().__init__(daemon=True, name="requests")
        self.mgr = mgr
        self.xs = mgr.xs_factory()
        home = f"/local/domain/{mgr.domid}"
        self.req_root = f"{home}/control/vtpmmgr/request"
        self.rsp_root = f"{home}/data/vtpmmgr/response"
        self.outcomes: dict[str, tuple[str, str, str]] = {}
        self.done: set[str] = set()                  # answered in this boot

    def _answer(self, rid: str, status: str, error: str, digest: str) -> None:
        base = f"{self.rsp_root}/{rid}"

        def tx(t) -> None:
            if digest:
                t.write(f"{base}/hash", digest)
            if error:
                t.write(f"{base}/error", error)
            t.write(f"{base}/status", status)
        self.xs.transact(tx)

    def _process(self, rid: str) -> None:
        base = f"{self.req_root}/{rid}"
        if rid not in self.outcomes:
            fields = {k: self.xs.read_or(f"{base}/{k}") for k in ("state", "op", "uuid", "checkpoint")}
            if fields["state"] != "submitted":
                return                               # not complete yet (or withdrawn)
            if self.xs.read_or(f"{self.rsp_root}/{rid}/status") is not None:
                self.done.add(rid)               # answered in an earlier boot
                return
            self.outcomes[rid] = self._outcome(rid, base, fields)
        # Executed once; the answer is re-sent until it is written, never re-executed.
        self._answer(rid, *self.outcomes[rid])
        del self.outcomes[rid]
        self.done.add(rid)

    def _outcome(self, rid: str, base: str, fields: dict[str, str | None]) -> tuple[str, str, str]:
        try:
            perms = self.xs.get_perms(base)
            if not perms or perms[0][1:] != "0":
                raise mp.RequestError(f"request {rid} is not owned by dom0 (perms {','.join(perms)[:80]})")
            digest = self.mgr.execute(mp.parse_request(fields), self.xs)
        except mp.RequestError as exc:
            log(f"vtpmmgr: request {rid}: error: {exc}")
            return "error", str(exc), ""
        log(f"vtpmmgr: request {rid}: {fields['op']} ok hash={digest}")
        return "ok", "", digest

    def run(self) -> None:
        watch = self.xs.watch(self.req_root, "requests")
        while True:
            try:
                ids = self.xs.ls(self.req_root)
            except XenStoreError:
                ids = []
            self.done &= set(ids)                # dom0 removed them: forget, keep the set small
            for rid in ids:
                if rid in self.done or not mp.valid_request_id(rid):
                    continue
                try:
                    self._process(rid)
                except XenStoreError as exc:            # a node vanished mid-read: retry next round
                    log(f"vtpmmgr: request {rid}: retry after {exc.__class__.__name__}")
            watch.wait(self.POLL)


# --- process entry ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    args, cfg = domain_args.parse("vtpmmgr", argv)
    from xen_vtpm.xen.xenstore import XenStore

    sim_dir = args.sim_dir
    extra = str(cfg.get("extra", "")).split()
    checkpoints = "checkpoint=0" not in extra
    image = Path(disk_target(cfg))
    log(f"vtpmmgr: starting (domid {args.domid}, disk {image.name})")
    tcti = (sim_dir / "run" / "ptpm.tcti").read_text().strip()
    disk = MgrDisk(image, PtpmSealer(tcti))
    table = disk.load()
    if table is None:
        log("Failed to read manager file. Assuming first time initialization.")
        disk.init_fresh()
        table = {}
    else:
        log(f"vtpmmgr: loaded {len(table)} entries (sequence {disk.seq}, slot {disk.active})")
    disk.sealer.close()                  # key unsealed, sealed copy kept: done with the TPM
    mgr = Manager(sim_dir, args.domid, disk, XenStore)
    mgr.table = table
    mgr.platform = platform.load(sim_dir)

    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    back = TpmBack(XenStore, args.domid, on_new=mgr.on_new, on_connect=mgr.on_connect, on_free=mgr.on_free)
    back.start()
    with XenStore() as xs:
        feature = f"/local/domain/{args.domid}/data/vtpmmgr/feature-checkpoint"
        if checkpoints:
            RequestWatcher(mgr).start()
            xs.write(feature, "1")
            xs.write(f"/local/domain/{args.domid}/data/vtpmmgr/provisioned", "1" if mgr.platform.provisioned else "0")
        elif xs.exists(feature):
            xs.rm(feature)
    log("vtpmmgr: ready" + (" (checkpoint extension)" if checkpoints else " (stock)"))
    while not stop.is_set():
        stop.wait(1)
    back.stopping.set()
    with mgr.lock:
        for opq in mgr.live.values():
            if opq.server is not None:
                opq.server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
