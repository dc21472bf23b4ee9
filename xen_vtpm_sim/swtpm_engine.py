"""One `swtpm socket` per vTPM (TPM 2.0, or TPM 1.2 like Xen's own vTPM), driven over its Unix control channel.

The TPM state is moved in and out through the control channel (docs/xen-internals.md §15.2): CMD_GET_STATEBLOB
of the permanent and the volatile blob after every successful command (PCRs live in the volatile
blob), CMD_SET_STATEBLOB then CMD_INIT to resume a saved state.  swtpm's own state directory is
private scratch space; the vTPM's durable state is only what the caller persists.

The startup mode plays the stub domain's `extra=` (docs/xen-internals.md §6.5): ``save`` resumes the
volatile blob too (PCRs and sessions kept, like TPM_Startup(ST_STATE)); ``clear`` resumes only the
permanent blob and sends TPM_Startup(ST_CLEAR), which resets the PCRs.  A fresh TPM 1.2 gets an
endorsement key at once, as the emulator does with TPM_CONF_GENERATE_EK (§6.4).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import struct
import subprocess
import time

CMD_GET_CAPABILITY = 0x01
CMD_INIT = 0x02
CMD_SHUTDOWN = 0x03
CMD_GET_STATEBLOB = 0x0C
CMD_SET_STATEBLOB = 0x0D

BLOB_PERMANENT = 1
BLOB_VOLATILE = 2

TPM12_STARTUP = 0x99                       # TPM_ORD_Startup
TPM12_CREATE_EK = 0x78                     # TPM_ORD_CreateEndorsementKeyPair
TPM12_STARTUP_TYPE = {"clear": 1, "save": 2}
TPM2_STARTUP = 0x144                       # TPM2_CC_Startup
TPM2_STARTUP_TYPE = {"clear": 0, "save": 1}
# The answer of a TPM in fail-stop mode: TPM_FAILEDSELFTEST (1.2), TPM_RC_FAILURE (2.0).
FAILSTOP_RC = {"1.2": 0x1C, "2.0": 0x101}
TPM_VERSIONS = ("1.2", "2.0")
STARTUP_MODES = ("clear", "save")

STATE_MAGIC = b"XVSW"
STATE_VERSION = 1


class EngineError(Exception):
    """swtpm could not be started, fed, or reached."""


# Resolved before any fork: the child runs only this one foreign call before exec.
_prctl = ctypes.CDLL(None, use_errno=True).prctl
PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    # If the vTPM process is SIGKILLed (xl destroy), swtpm must not outlive it.
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def _recv_exact(sock: socket.socket, n: int) -> bytes:
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EngineError(f"swtpm closed the connection after {len(buf)} of {n} bytes")
        buf += chunk
    return bytes(buf)


def pack_state(permanent: bytes, volatile: bytes) -> bytes:
    return (STATE_MAGIC + struct.pack(">I", STATE_VERSION) + struct.pack(">I", len(permanent)) + permanent
            + struct.pack(">I", len(volatile)) + volatile)


def unpack_state(data: bytes) -> tuple[bytes, bytes]:
    if len(data) < 16 or data[:4] != STATE_MAGIC or struct.unpack_from(">I", data, 4)[0] != STATE_VERSION:
        raise EngineError("TPM state does not start with the expected magic/version")
    (plen,) = struct.unpack_from(">I", data, 8)
    perm_end = 12 + plen
    if perm_end + 4 > len(data):
        raise EngineError("TPM state truncated in the permanent blob")
    (vlen,) = struct.unpack_from(">I", data, perm_end)
    if perm_end + 4 + vlen != len(data):
        raise EngineError("TPM state length fields do not add up")
    return data[12:perm_end], data[perm_end + 4:]


class SwtpmEngine:
    """A running swtpm; `execute` sends one TPM command, `state` fetches permanent+volatile."""

    def __init__(self, state: bytes | None, scratch_dir: str | os.PathLike, tpm_version: str = "2.0",
                 startup: str = "save") -> None:
        if tpm_version not in TPM_VERSIONS or startup not in STARTUP_MODES:
            raise EngineError(f"unsupported TPM {tpm_version!r} or startup mode {startup!r}")
        self.version, self.startup = tpm_version, startup
        self.failed_rc: int | None = None
        # A SIGKILLed predecessor may have left its scratch copy of the state behind.
        self._dir = os.fspath(scratch_dir)
        shutil.rmtree(self._dir, ignore_errors=True)
        os.makedirs(self._dir, mode=0o700)
        self._ctrl_path = os.path.join(self._dir, "ctrl")
        self._data_path = os.path.join(self._dir, "data")
        self._data: socket.socket | None = None
        self._ctrl: socket.socket | None = None
        blobs = unpack_state(state) if state is not None else None
        flags = [] if blobs else ["--flags", "not-need-init,startup-clear"]
        self._proc = subprocess.Popen(
            ["swtpm", "socket", *(["--tpm2"] if tpm_version == "2.0" else []), "--tpmstate", f"dir={self._dir}",
             "--ctrl", f"type=unixio,path={self._ctrl_path}",
             "--server", f"type=unixio,path={self._data_path}", *flags],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            preexec_fn=_die_with_parent)
        try:
            self._ctrl = self._connect(self._ctrl_path)
            if blobs:
                self._set_blob(BLOB_PERMANENT, blobs[0])
                if startup == "save":
                    self._set_blob(BLOB_VOLATILE, blobs[1])
                rc = self._ctrl_call(CMD_INIT, struct.pack(">I", 0))
                if rc:
                    raise EngineError(f"swtpm refused the saved state (CMD_INIT result {rc:#x})")
            self._data = self._connect(self._data_path)
            if blobs and startup == "clear":
                self._startup_clear()
            elif not blobs and tpm_version == "1.2":
                self._create_ek()
        except BaseException:
            self.stop()
            raise

    def _call_ok(self, command: bytes, what: str) -> None:
        rc = struct.unpack_from(">I", self.execute(command), 6)[0]
        if rc:
            raise EngineError(f"{what} failed (TPM result {rc:#x})")

    def _startup_clear(self) -> None:
        if self.version == "1.2":
            self._call_ok(struct.pack(">HIIH", 0x00C1, 12, TPM12_STARTUP, TPM12_STARTUP_TYPE["clear"]),
                          "TPM_Startup(ST_CLEAR)")
        else:
            self._call_ok(struct.pack(">HIIH", 0x8001, 12, TPM2_STARTUP, TPM2_STARTUP_TYPE["clear"]),
                          "TPM2_Startup(CLEAR)")

    def _create_ek(self) -> None:
        # A 2048-bit RSA EK: TPM_KEY_PARMS {RSA, OAEP-SHA1-MGF1, no signature, TPM_RSA_KEY_PARMS}.
        parms = struct.pack(">IHHI", 1, 3, 1, 12) + struct.pack(">III", 2048, 2, 0)
        body = os.urandom(20) + parms
        self._call_ok(struct.pack(">HII", 0x00C1, 10 + len(body), TPM12_CREATE_EK) + body,
                      "TPM_CreateEndorsementKeyPair")

    def fail_stop(self) -> None:
        """TPM_Startup(ST_STATE) without restored data: every later command fails (tpm_startup.c:85-91)."""
        self.failed_rc = FAILSTOP_RC[self.version]

    def _connect(self, path: str) -> socket.socket:
        deadline = time.monotonic() + 10
        while True:
            if self._proc.poll() is not None:
                raise EngineError(f"swtpm exited with status {self._proc.returncode} during startup")
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                return sock
            except OSError:
                sock.close()
                if time.monotonic() > deadline:
                    raise EngineError(f"swtpm did not open {os.path.basename(path)} within 10 s") from None
                time.sleep(0.01)

    def _ctrl_call(self, cmd: int, body: bytes = b"") -> int:
        assert self._ctrl is not None
        self._ctrl.sendall(struct.pack(">I", cmd) + body)
        return struct.unpack(">I", _recv_exact(self._ctrl, 4))[0]

    def _set_blob(self, kind: int, blob: bytes) -> None:
        rc = self._ctrl_call(CMD_SET_STATEBLOB, struct.pack(">III", 0, kind, len(blob)) + blob)
        if rc:
            raise EngineError(f"swtpm refused state blob {kind} (result {rc:#x})")

    def _get_blob(self, kind: int) -> bytes:
        assert self._ctrl is not None
        self._ctrl.sendall(struct.pack(">IIII", CMD_GET_STATEBLOB, 0, kind, 0))
        rc, _flags, total, length = struct.unpack(">IIII", _recv_exact(self._ctrl, 16))
        data = _recv_exact(self._ctrl, length)
        if rc or length != total:
            raise EngineError(f"swtpm could not export state blob {kind} (result {rc:#x})")
        return data

    def execute(self, command: bytes) -> bytes:
        """One TPM command in, its response out (raw TPM 1.2 or 2.0 packets)."""
        if self._data is None:
            raise EngineError("swtpm is not running")
        if self.failed_rc is not None:
            tag = 0x8001 if self.version == "2.0" else 0x00C4
            return struct.pack(">HII", tag, 10, self.failed_rc)
        self._data.sendall(command)
        head = _recv_exact(self._data, 10)
        size = struct.unpack_from(">I", head, 2)[0]
        if size < 10:
            raise EngineError(f"swtpm answered with a bad paramSize {size}")
        return head + _recv_exact(self._data, size - 10)

    def reset(self) -> int:
        """CMD_INIT keeping the saved state (a guest-initiated TPM reset, as on a platform reboot)."""
        return self._ctrl_call(CMD_INIT, struct.pack(">I", 0))

    def capability(self) -> bytes:
        """Raw CMD_GET_CAPABILITY answer (8 bytes), forwarded to TCTI clients that ask."""
        assert self._ctrl is not None
        self._ctrl.sendall(struct.pack(">I", CMD_GET_CAPABILITY))
        return _recv_exact(self._ctrl, 8)

    def state(self) -> bytes:
        """The whole TPM state: permanent (seeds, NV, persistent objects) and volatile (PCRs)."""
        return pack_state(self._get_blob(BLOB_PERMANENT), self._get_blob(BLOB_VOLATILE))

    def stop(self) -> None:
        for sock in (self._data, self._ctrl):
            if sock is not None:
                sock.close()
        self._data = self._ctrl = None
        if self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(5)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        shutil.rmtree(self._dir, ignore_errors=True)
