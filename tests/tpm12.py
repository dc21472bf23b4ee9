"""A guest's TPM 1.2 client in raw commands: what a Linux guest with tpm-tools sends to Xen's vTPM
(tpm2-tools and tpm2-pytss cannot talk to a TPM 1.2).

The commands go to the vTPM's TCTI address (``swtpm:host=H,port=P``), one connection per command.
NV indexes need no owner: a fresh TPM 1.2 has ``nvLocked`` FALSE, so NV authorization is not checked.
"""
from __future__ import annotations

import hashlib
import os
import socket
import struct

TAG_RQU_COMMAND = 0x00C1
ORD_EXTEND = 0x14
ORD_PCR_READ = 0x15
ORD_READ_PUBEK = 0x7C
ORD_NV_DEFINE_SPACE = 0xCC
ORD_NV_WRITE_VALUE = 0xCD
ORD_NV_READ_VALUE = 0xCF
NV_PER_OWNERWRITE = 0x00000002
TPM_NO_ENDORSEMENT = 0x23
NV_INDEX = 0x00011000


class Tpm12Error(Exception):
    def __init__(self, ordinal: int, rc: int) -> None:
        super().__init__(f"TPM 1.2 ordinal {ordinal:#x} failed with {rc:#x}")
        self.ordinal, self.rc = ordinal, rc


def _address(tcti: str) -> tuple[str, int]:
    opts = dict(kv.split("=", 1) for kv in tcti.partition(":")[2].split(",") if "=" in kv)
    return opts.get("host", "127.0.0.1"), int(opts["port"])


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise ConnectionError("the TPM closed the connection")
        data += chunk
    return data


def command(tcti: str, ordinal: int, body: bytes = b"") -> bytes:
    """One command; the response's parameters (after the 10-byte header), Tpm12Error on a non-zero result."""
    with socket.create_connection(_address(tcti), timeout=30) as sock:
        sock.sendall(struct.pack(">HII", TAG_RQU_COMMAND, 10 + len(body), ordinal) + body)
        head = _recv(sock, 10)
        _tag, size, rc = struct.unpack(">HII", head)
        rest = _recv(sock, size - 10)
    if rc:
        raise Tpm12Error(ordinal, rc)
    return rest


def pcr_extend(tcti: str, pcr: int, data: bytes) -> bytes:
    """TPM_Extend with SHA-1 of ``data``; returns the new PCR value."""
    return command(tcti, ORD_EXTEND, struct.pack(">I", pcr) + hashlib.sha1(data).digest())


def pcr_read(tcti: str, pcr: int) -> bytes:
    return command(tcti, ORD_PCR_READ, struct.pack(">I", pcr))


def pubek_digest(tcti: str) -> str:
    """SHA-1 of the endorsement key's public part: the vTPM's identity (a fresh vTPM gets a new one)."""
    rsp = command(tcti, ORD_READ_PUBEK, os.urandom(20))
    return hashlib.sha1(rsp[:-20]).hexdigest()        # TPM_PUBKEY ‖ checksum[20]


def _pcr_info_short() -> bytes:
    # sizeOfSelect 3, no PCR selected, any locality, digestAtRelease zero
    return struct.pack(">H", 3) + bytes(3) + b"\x1f" + bytes(20)


def nv_define(tcti: str, size: int, index: int = NV_INDEX) -> None:
    public = (struct.pack(">HI", 0x0018, index) + _pcr_info_short() + _pcr_info_short()
              + struct.pack(">HI", 0x0017, NV_PER_OWNERWRITE) + bytes(3) + struct.pack(">I", size))
    command(tcti, ORD_NV_DEFINE_SPACE, public + bytes(20))


def nv_write(tcti: str, data: bytes, index: int = NV_INDEX) -> None:
    command(tcti, ORD_NV_WRITE_VALUE, struct.pack(">III", index, 0, len(data)) + data)


def nv_read(tcti: str, size: int, index: int = NV_INDEX) -> bytes:
    rsp = command(tcti, ORD_NV_READ_VALUE, struct.pack(">III", index, 0, size))
    (length,) = struct.unpack_from(">I", rsp)
    return rsp[4:4 + length]
