"""The vtpmmgr's table on its own disk (cfg ``disk=``): A/B slots, AES-256-GCM under a key sealed by
the manager's "physical TPM" (an swtpm, TCTI in ``DIR/run/ptpm.tcti``) to a PCR policy.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

SEAL_PCRS = "sha256:0,1,2,3,4,5,6,7"
FLAG_ADMIN = 1
FLAG_CHECKPOINT = 2
FLAG_OPEN = 1 << 31            # in memory only, like VTPM_FLAG_OPEN

DISK_MAGIC = b"XVTPMMGR"
DISK_VERSION = 1
ENTRY = struct.Struct(">16sI16s64s")


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
