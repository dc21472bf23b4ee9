"""swtpm's control channel and state files, as xen-vtpm uses them (docs/xen-internals.md §15).

Only what the swtpm backend needs: INIT, STOP, SHUTDOWN, GET_CONFIG and the state blobs (to adopt
an existing state), over the Unix control socket QEMU also uses.  swtpm serves one control client
at a time (§15.2): while a device model is attached, nobody else gets through, so every call
here has a timeout.
"""
from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Iterator
from pathlib import Path

from xen_vtpm.errors import XenError

CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_GET_STATEBLOB = 0x0C
CMD_SET_STATEBLOB = 0x0D
CMD_STOP = 0x0E
CMD_GET_CONFIG = 0x0F

BLOB_PERMANENT, BLOB_VOLATILE, BLOB_SAVESTATE = 1, 2, 3
STATE_FLAG_DECRYPTED, STATE_FLAG_ENCRYPTED = 1, 2
CONFIG_FLAG_FILE_KEY, CONFIG_FLAG_MIGRATION_KEY = 1, 2

# TPM 2 state file names in a `dir` state directory (§15.1); the permanent one must exist once a
# vTPM was manufactured, the others only exist between a volatile save and its next load.
PERMANENT = "tpm2-00.permall"
VOLATILE = "tpm2-00.volatilestate"
SAVESTATE = "tpm2-00.savestate"
STATE_FILES = (PERMANENT, VOLATILE, SAVESTATE)

# The header swtpm puts in front of every state file and blob: u8 version, u8 min_version,
# be16 header size, be16 flags, be32 total length (§15.4).
_BLOB_HEADER = struct.Struct(">BBHHI")
BLOB_FLAG_ENCRYPTED = 0x01
BLOB_FLAG_MIGRATION_ENCRYPTED = 0x02


def blob_flags(data: bytes) -> int | None:
    """The flags of a swtpm state file or blob; None if it does not start with swtpm's header."""
    if len(data) < _BLOB_HEADER.size:
        return None
    version, min_version, hdrsize, flags, totlen = _BLOB_HEADER.unpack_from(data)
    if version < 1 or min_version > version or hdrsize < _BLOB_HEADER.size or totlen != len(data):
        return None
    return int(flags)


def encrypted_at_rest(data: bytes) -> bool:
    flags = blob_flags(data)
    return flags is not None and bool(flags & BLOB_FLAG_ENCRYPTED)


class Control:
    """One connection to swtpm's control socket."""

    def __init__(self, path: Path, timeout: float) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
        except OSError as exc:
            self.sock.close()
            raise XenError(f"{path}: cannot reach swtpm's control socket ({exc.strerror or exc}); "
                           "is its swtpm running?") from None

    def close(self) -> None:
        self.sock.close()

    def _recv(self, n: int) -> bytes:
        buf = bytearray()
        try:
            while len(buf) < n:
                chunk = self.sock.recv(n - len(buf))
                if not chunk:
                    break
                buf += chunk
        except OSError as exc:   # a timeout: a device model holds the channel, or swtpm hangs
            raise XenError(f"{self.path}: swtpm did not answer on its control socket ({exc}); "
                           "a device model may still be attached to it") from None
        if len(buf) < n:
            raise XenError(f"{self.path}: swtpm closed its control socket mid-answer")
        return bytes(buf)

    def call(self, cmd: int, body: bytes = b"", answer: int = 4) -> bytes:
        try:
            self.sock.sendall(struct.pack(">I", cmd) + body)
        except OSError as exc:
            raise XenError(f"{self.path}: cannot send to swtpm ({exc})") from None
        return self._recv(answer)

    def result(self, cmd: int, body: bytes = b"") -> int:
        return int(struct.unpack(">I", self.call(cmd, body))[0])

    def init(self, flags: int = 0) -> int:
        return self.result(CMD_INIT, struct.pack(">I", flags))

    def stop(self) -> int:
        return self.result(CMD_STOP)

    def shutdown(self) -> int:
        return self.result(CMD_SHUTDOWN)

    def config_flags(self) -> int:
        rc, flags = struct.unpack(">II", self.call(CMD_GET_CONFIG, answer=8))
        if rc:
            raise XenError(f"{self.path}: swtpm refused CMD_GET_CONFIG (result {rc:#x})")
        return int(flags)

    def get_blob(self, kind: int, decrypted: bool) -> tuple[int, bytes]:
        """(state flags, blob) of a running TPM; the whole blob comes in one answer on a socket."""
        head = self.call(CMD_GET_STATEBLOB,
                         struct.pack(">III", STATE_FLAG_DECRYPTED if decrypted else 0, kind, 0), answer=16)
        rc, flags, total, length = struct.unpack(">IIII", head)
        if rc or total != length:
            raise XenError(f"{self.path}: swtpm could not export state blob {kind} (result {rc:#x})")
        return int(flags), self._recv(length)

    def set_blob(self, kind: int, flags: int, blob: bytes) -> int:
        return self.result(CMD_SET_STATEBLOB, struct.pack(">III", flags, kind, len(blob)) + blob)


@contextlib.contextmanager
def control(path: Path, timeout: float) -> Iterator[Control]:
    ctl = Control(path, timeout)
    try:
        yield ctl
    finally:
        ctl.close()
