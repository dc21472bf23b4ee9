"""Simulated vtpmmgr: the per-host table of 64-byte vTPM secrets (facts §2-§3) plus the checkpoint
extension of DESIGN §4 / docs/protocol.md.

`python -m xen_vtpm.sim.vtpmmgr --sim-dir DIR --domid M --name NAME --config CFGJSON`

* tpmback (mini-os semantics, facts §5.3) for every `backend/vtpm/<F>/<N>`; the "shared page" of a
  connected frontend is a Unix socket ``DIR/run/tpmif/<M>-<F>-<N>.sock`` created when the frontend
  reaches state 3/4, so a connection there stands for that frontend domain.  Identity = the `uuid`
  node of the manager-side backend dir, which only the toolstack can write.
* SAVEHASHKEY / LOADHASHKEY as vtpm_cmd_handler.c: auto-create on unknown UUID (not marked OPEN),
  "Attempted to open vTPM twice!", OPEN cleared only when the frontend's nodes are gone, then the
  backend dir is removed.  The simulated host behaves like a FLASK host with a provisioned group 0:
  the kernel-hash check always passes (facts §2.4 needs real hardware to decide otherwise).
* The table lives on the manager's own disk (cfg ``disk=``), A/B slots, AES-256-GCM under a key
  sealed by the manager's "physical TPM" (an swtpm, TCTI in ``DIR/run/ptpm.tcti``) to a PCR policy.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import struct
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import XenStoreError
from . import mgrproto as mp
from .xlcfg import parse_disk

SEAL_PCRS = "sha256:0,1,2,3,4,5,6,7"
FLAG_ADMIN = 1
FLAG_CHECKPOINT = 2
FLAG_OPEN = 1 << 31            # in memory only, like VTPM_FLAG_OPEN

DISK_MAGIC = b"XVTPMMGR"
DISK_VERSION = 1
ENTRY = struct.Struct(">16sI16s64s")


def log(msg: str) -> None:
    print(msg, flush=True)


# --- the sealed, A/B-written table -----------------------------------------------------------

class DiskError(Exception):
    """The manager image cannot be read back or written."""


class PtpmSealer:
    """Seal/unseal the table key with the manager's physical TPM, bound to PCRs (SEAL_PCRS)."""

    def __init__(self, tcti: str) -> None:
        # ESYS logs every refused unseal as an error; on the console that would read like a fault.
        os.environ.setdefault("TSS2_LOG", "all+NONE")
        from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
        from tpm2_pytss.constants import TPM2_RC, TPM2_SU
        name, _, conf = tcti.partition(":")
        self._ctx = ESAPI(TCTILdr(name, conf))
        try:
            self._ctx.startup(TPM2_SU.CLEAR)
        except TSS2_Exception as exc:
            if exc.rc != TPM2_RC.INITIALIZE:
                raise
        self._flush_leftovers()
        self._primary = self._ctx.create_primary(None, "ecc256:aes128cfb")[0]

    def _flush_leftovers(self) -> None:
        # The manager owns its TPM exclusively (no resource manager); a killed predecessor may have
        # left transient objects behind, and the TPM has only a few slots for them.
        from tpm2_pytss.constants import TPM2_CAP, TPM2_HT
        more, data = self._ctx.get_capability(TPM2_CAP.HANDLES, TPM2_HT.TRANSIENT << 24, 64)
        for handle in data.data.handles:
            self._ctx.flush_context(self._ctx.tr_from_tpmpublic(handle))

    def close(self) -> None:
        """Flush the primary: transient objects outlive our connection on a TPM without a resource manager."""
        self._ctx.flush_context(self._primary)
        self._ctx.close()

    def _pcr_session(self, trial: bool):
        from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_SE
        from tpm2_pytss.types import TPMT_SYM_DEF
        kind = TPM2_SE.TRIAL if trial else TPM2_SE.POLICY
        sess = self._ctx.start_auth_session(ESYS_TR.NONE, ESYS_TR.NONE, kind,
                                            TPMT_SYM_DEF(algorithm=TPM2_ALG.NULL), TPM2_ALG.SHA256)
        self._ctx.policy_pcr(sess, None, SEAL_PCRS)
        return sess

    def seal(self, secret: bytes) -> tuple[bytes, bytes]:
        from tpm2_pytss.constants import TPMA_OBJECT
        from tpm2_pytss.types import TPM2B_PUBLIC, TPM2B_SENSITIVE_CREATE, TPMS_SENSITIVE_CREATE
        trial = self._pcr_session(True)
        digest = self._ctx.policy_get_digest(trial)
        self._ctx.flush_context(trial)
        # No USERWITHAUTH: the policy is the only way to unseal.
        template = TPM2B_PUBLIC.parse("keyedhash", TPMA_OBJECT.FIXEDTPM | TPMA_OBJECT.FIXEDPARENT,
                                      authPolicy=bytes(digest))
        sens = TPM2B_SENSITIVE_CREATE(TPMS_SENSITIVE_CREATE(data=secret))
        priv, pub = self._ctx.create(self._primary, sens, template)[:2]
        return pub.marshal(), priv.marshal()

    def unseal(self, pub_raw: bytes, priv_raw: bytes) -> bytes | None:
        from tpm2_pytss import TSS2_Exception
        from tpm2_pytss.types import TPM2B_PRIVATE, TPM2B_PUBLIC
        try:
            handle = self._ctx.load(self._primary, TPM2B_PRIVATE.unmarshal(priv_raw)[0],
                                    TPM2B_PUBLIC.unmarshal(pub_raw)[0])
        except (TSS2_Exception, ValueError, TypeError):
            return None
        sess = self._pcr_session(False)
        try:
            return bytes(self._ctx.unseal(handle, session1=sess))
        except TSS2_Exception:
            return None
        finally:
            self._ctx.flush_context(sess)
            self._ctx.flush_context(handle)


@dataclass
class Entry:
    flags: int
    data: bytes                       # 64 bytes, opaque (H ‖ K ‖ zero padding for the stock vTPM)
    origin: bytes = bytes(16)         # checkpoint entries: the vTPM UUID they were copied from


def pack_table(table: dict[bytes, Entry]) -> bytes:
    out = [struct.pack(">I", len(table))]
    for uid in sorted(table):
        e = table[uid]
        out.append(ENTRY.pack(uid, e.flags & ~FLAG_OPEN, e.origin, e.data))
    return b"".join(out)


def unpack_table(raw: bytes) -> dict[bytes, Entry]:
    (count,) = struct.unpack_from(">I", raw)
    if 4 + count * ENTRY.size != len(raw):
        raise DiskError("table length does not match its entry count")
    table = {}
    for i in range(count):
        uid, flags, origin, data = ENTRY.unpack_from(raw, 4 + i * ENTRY.size)
        table[uid] = Entry(flags, data, origin)
    return table


def _sealed_blob(pub: bytes, priv: bytes) -> bytes:
    return struct.pack(">H", len(pub)) + pub + struct.pack(">H", len(priv)) + priv


class MgrDisk:
    """Two slots at 0 and size/2: magic ‖ be32 version ‖ be64 seq ‖ sealed key ‖ nonce ‖ GCM(table)."""

    def __init__(self, path: Path, sealer: PtpmSealer) -> None:
        self.path = path
        self.sealer = sealer
        self.key: bytes | None = None
        self.sealed: bytes = b""
        self.seq = 0
        self.active = -1

    def _slot_offset(self, slot: int) -> int:
        return slot * (self.path.stat().st_size // 2)

    @staticmethod
    def _parse(raw: bytes) -> tuple[int, bytes, bytes, bytes, bytes, bytes]:
        if raw[:8] != DISK_MAGIC or struct.unpack_from(">I", raw, 8)[0] != DISK_VERSION:
            raise DiskError("bad magic or version")
        (seq,) = struct.unpack_from(">Q", raw, 12)
        pos = 20
        parts = []
        for _ in range(2):
            (n,) = struct.unpack_from(">H", raw, pos)
            parts.append(raw[pos + 2:pos + 2 + n])
            pos += 2 + n
        nonce = raw[pos:pos + 12]
        (ct_len,) = struct.unpack_from(">I", raw, pos + 12)
        header_end = pos + 16
        if header_end + ct_len > len(raw):
            raise DiskError("ciphertext runs past the slot")
        return seq, parts[0], parts[1], nonce, raw[:header_end], raw[header_end:header_end + ct_len]

    def _read_slot(self, slot: int) -> bytes:
        size = self.path.stat().st_size // 2
        with open(self.path, "rb") as fh:
            fh.seek(self._slot_offset(slot))
            return fh.read(size)

    def load(self) -> dict[bytes, Entry] | None:
        """The newest readable table, or None (then the caller starts empty, like vtpmmgr_create)."""
        best: tuple[int, int, dict[bytes, Entry], bytes, bytes] | None = None
        unsealed: dict[bytes, bytes | None] = {}
        for slot in (0, 1):
            try:
                seq, pub, priv, nonce, aad, ct = self._parse(self._read_slot(slot))
                # Sequences are in the clear: a fresh start continues above them, so an old table
                # that becomes unsealable again (PCRs reverted) never outranks the newer one.
                self.seq = max(self.seq, seq)
                if pub + priv not in unsealed:
                    unsealed[pub + priv] = self.sealer.unseal(pub, priv)
                key = unsealed[pub + priv]
                if key is None:
                    continue
                table = unpack_table(AESGCM(key).decrypt(nonce, ct, aad))
            except (DiskError, InvalidTag, struct.error, OSError, ValueError):
                continue
            if best is None or seq > best[0]:
                best = (seq, slot, table, key, _sealed_blob(pub, priv))
        if best is None:
            return None
        self.seq, self.active, table, self.key, self.sealed = best
        return table

    def init_fresh(self) -> None:
        """New random table key, sealed now; nothing is written before the first change."""
        self.key = AESGCM.generate_key(256)
        self.sealed = _sealed_blob(*self.sealer.seal(self.key))
        self.active = -1

    def _encode(self, table: dict[bytes, Entry], seq: int) -> bytes:
        assert self.key is not None
        nonce = os.urandom(12)
        plain = pack_table(table)
        head = DISK_MAGIC + struct.pack(">IQ", DISK_VERSION, seq) + self.sealed + nonce
        aad = head + struct.pack(">I", len(plain) + 16)
        return aad + AESGCM(self.key).encrypt(nonce, plain, aad)

    def write(self, table: dict[bytes, Entry]) -> None:
        """Write the table to the inactive slot and fsync; the other slot keeps the previous state."""
        slot = 1 - self.active if self.active >= 0 else 0
        raw = self._encode(table, self.seq + 1)
        try:
            fd = os.open(self.path, os.O_RDWR)
            try:
                if len(raw) > os.fstat(fd).st_size // 2:
                    raise DiskError(f"table of {len(raw)} bytes does not fit half of {self.path.name}")
                os.pwrite(fd, raw, self._slot_offset(slot))
                os.fdatasync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            raise DiskError(f"cannot write {self.path.name}: {exc.strerror or exc}") from None
        self.seq += 1
        self.active = slot

    def verify(self) -> None:
        """Check that the active slot still holds what we last wrote (DiskError otherwise)."""
        if self.active < 0:
            return
        try:
            seq, _pub, _priv, nonce, aad, ct = self._parse(self._read_slot(self.active))
            assert self.key is not None
            AESGCM(self.key).decrypt(nonce, ct, aad)
        except (DiskError, InvalidTag, struct.error, OSError, ValueError) as exc:
            raise DiskError(f"slot {self.active} of {self.path.name} is unreadable ({exc.__class__.__name__})") from None
        if seq != self.seq:
            raise DiskError(f"slot {self.active} of {self.path.name} holds sequence {seq}, expected {self.seq}")


# --- mini-os tpmback -----------------------------------------------------------------------

@dataclass
class Tpmif:
    fe_domid: int
    devid: int
    be_path: str
    fe_path: str
    uuid: bytes
    state: str = "2"
    connected: bool = False


class TpmBack(threading.Thread):
    """Follows backend/vtpm of one domain with the state machine of mini-os tpmback.c (facts §5.3)."""

    POLL = 0.1

    def __init__(self, xs_factory: Callable, domid: int, *, on_new: Callable[[Tpmif], None],
                 on_connect: Callable[[Tpmif], None], on_free: Callable[[Tpmif], None]) -> None:
        super().__init__(daemon=True, name="tpmback")
        self.xs = xs_factory()
        self.root = f"/local/domain/{domid}/backend/vtpm"
        self.on_new, self.on_connect, self.on_free = on_new, on_connect, on_free
        self.tpmifs: dict[tuple[int, int], Tpmif] = {}
        self.bad: set[tuple[int, int]] = set()
        self.stopping = threading.Event()

    def _ls(self, path: str) -> list[str]:
        try:
            return self.xs.ls(path)
        except XenStoreError:
            return []

    def _set_state(self, t: Tpmif, state: str) -> None:
        t.state = state
        self.xs.write(f"{t.be_path}/state", state)

    def _free(self, t: Tpmif, remove: bool) -> None:
        if remove:
            try:
                self._set_state(t, "5")
                self._set_state(t, "6")
            except XenStoreError:
                pass
        self.on_free(t)
        if remove:
            try:
                self.xs.rm(t.be_path)
            except XenStoreError:
                pass
        self.tpmifs.pop((t.fe_domid, t.devid), None)

    def _new(self, fe: int, dev: int) -> None:
        be_path = f"{self.root}/{fe}/{dev}"
        try:
            uid = mp.parse_uuid(self.xs.read_or(f"{be_path}/uuid"), "uuid")
            fe_path = self.xs.read(f"{be_path}/frontend")
        except (mp.RequestError, XenStoreError) as exc:
            log(f"tpmback.c:285: Error: backend/vtpm/{fe}/{dev}: bad uuid or frontend ({exc})")
            self.bad.add((fe, dev))
            return
        t = Tpmif(fe, dev, be_path, fe_path, uid)
        self.xs.write(f"{be_path}/feature-protocol-v2", "1")
        self._set_state(t, "2")
        self.tpmifs[(fe, dev)] = t
        self.on_new(t)

    def scan(self) -> None:
        # Frees first: a frontend that went away releases its OPEN flag before any new
        # connection with the same UUID is looked at, as the ordered watch events of real tpmback do.
        for t in list(self.tpmifs.values()):
            if self.xs.read_or(f"{t.be_path}/state") is None:
                self._free(t, remove=False)
                continue
            fe_state = self.xs.read_or(f"{t.fe_path}/state")
            if fe_state is None:
                self._free(t, remove=True)
            elif fe_state in ("3", "4") and not t.connected:
                self.on_connect(t)
                t.connected = True
                self.xs.write(f"{t.be_path}/ready", "1")
                self._set_state(t, "4")
            elif fe_state == "5" and t.state != "5":
                self._set_state(t, "5")
            elif fe_state == "6" and t.connected:
                t.connected = False
                self._set_state(t, "2")
        present = set()
        for fe in self._ls(self.root):
            for dev in self._ls(f"{self.root}/{fe}"):
                if fe.isdigit() and dev.isdigit():
                    present.add((int(fe), int(dev)))
        self.bad &= present                  # a removed bad entry may come back repaired
        for key in sorted(present - self.tpmifs.keys() - self.bad):
            self._new(*key)

    def run(self) -> None:
        watch = self.xs.watch(self.root, "tpmback")
        while not self.stopping.is_set():
            try:
                self.scan()
            except (XenStoreError, OSError) as exc:       # a vanished node mid-scan: rescan on the next round
                log(f"tpmback.c:120: Info: rescan after {exc.__class__.__name__}: {exc}")
            watch.wait(self.POLL)


# --- the manager ---------------------------------------------------------------------------

@dataclass
class Opaque:
    """Per-tpmif state of vtpmmgr (struct tpm_opaque)."""
    uuid: bytes
    fe_state: str                      # the frontend's state node: gone = the vTPM domain is gone
    vtpm: bytes | None = None          # the UUID this connection holds OPEN (or created)
    server: "RingServer | None" = None


class RingServer(threading.Thread):
    """The simulated shared page: one Unix socket per connected tpmif, one request at a time."""

    def __init__(self, path: Path, handler: Callable[[bytes], bytes]) -> None:
        super().__init__(daemon=True, name=f"ring-{path.name}")
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self.path = path
        self.handler = handler
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(path))
        self.listener.listen(1)
        self.conn: socket.socket | None = None

    def run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            self.conn = conn
            with conn:
                while True:
                    try:
                        packet = read_packet(conn)
                    except (OSError, mp.ProtocolError):
                        break
                    if packet is None:
                        break
                    try:
                        conn.sendall(self.handler(packet))
                    except OSError:
                        break

    def close(self) -> None:
        for sock in (self.listener, self.conn):
            if sock is not None:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                sock.close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def read_packet(sock: socket.socket) -> bytes | None:
    """One framed packet from a ring socket, None on a clean EOF."""
    head = b""
    while len(head) < mp.HEADER_SIZE:
        chunk = sock.recv(mp.HEADER_SIZE - len(head))
        if not chunk:
            if head:
                raise mp.ProtocolError("connection closed inside a header")
            return None
        head += chunk
    size = mp.packet_size(head)
    body = b""
    while len(head) + len(body) < size:
        chunk = sock.recv(size - len(head) - len(body))
        if not chunk:
            raise mp.ProtocolError("connection closed inside a packet")
        body += chunk
    return head + body


def ring_socket_path(sim_dir: Path, be_domid: int, fe_domid: int, devid: int) -> Path:
    return Path(sim_dir) / "run" / "tpmif" / f"{be_domid}-{fe_domid}-{devid}.sock"


class Manager:
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
            entry = self.table.get(opq.vtpm) if opq.vtpm else None
            if entry is not None:                       # free_opaque
                entry.flags &= ~FLAG_OPEN

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
        entry.flags |= FLAG_OPEN
        opq.vtpm = opq.uuid
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
            self.disk.write(self.table)
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
                self.disk.write(self.table)
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
    ap = argparse.ArgumentParser(prog="vtpmmgr")
    ap.add_argument("--sim-dir", required=True)
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    from ..xenstore import XenStore

    cfg = json.loads(Path(args.config).read_text())
    sim_dir = Path(args.sim_dir)
    extra = str(cfg.get("extra", "")).split()
    checkpoints = "checkpoint=0" not in extra
    image = Path(parse_disk(cfg["disk"][0])["target"])
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
