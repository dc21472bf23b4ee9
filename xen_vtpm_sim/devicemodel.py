"""A simulated HVM device model: QEMU 7.2's tpm-emulator, its QMP, and libxl's side of it.

`python -m xen_vtpm_sim.devicemodel -xen-domid N -name NAME -qmp unix:SOCK,server=on,wait=off
[-incoming fd:FD] -chardev socket,id=C,path=P -tpmdev emulator,id=T,chardev=C -device tpm-crb,tpmdev=T`

What it does is what QEMU's backends/tpm/tpm_emulator.c does against swtpm (docs/xen-internals.md
§14), command for command on swtpm's real control channel:

* start: connect to the chardev (swtpm's control socket), CMD_SET_DATAFD with one end of a
  socketpair (SCM_RIGHTS), a TPM2 ReadClock to learn the TPM version, CMD_GET_CAPABILITY and the
  capability check, then twice CMD_STOP + CMD_SET_BUFFERSIZE (asking, then setting tpm-crb's 3968
  bytes); a fresh boot adds CMD_INIT, an incoming
  migration does the post_load instead: CMD_STOP, CMD_SET_STATEBLOB permanent/volatile/savestate
  (with the flags recorded beside them), CMD_INIT with PTM_INIT_FLAG_DELETE_VOLATILE.
* the guest's TPM: the firmware's TPM2_Startup(CLEAR) on a fresh boot (SeaBIOS/OVMF send it; QEMU
  does not), then commands from the guest, one at a time, locality set with CMD_SET_LOCALITY when
  it changes.  The guest side is a TCTI port pair published in ``run/dm-<domid>.tcti`` (the
  simulator's stand-in for the TIS/CRB registers); nothing is served while the VM is stopped.
* QMP ``stop``/``cont``/``xen-save-devices-state``: the device state file libxl copies into the
  EMULATOR_CONTEXT record — QEMU's savevm format with the "tpm-emulator" section (pre_save: the
  three blobs, CMD_GET_STATEBLOB with PTM_STATE_FLAG_DECRYPTED).  Only that section is written:
  the simulated machine has no other device with state.
* SIGHUP/SIGTERM (libxl's way to end it): CMD_SHUTDOWN, as QEMU's tpm_emulator_inst_finalize does
  at exit, which makes swtpm exit too.

The libxl side (``spawn``, ``save_state``, ``resume``, ``kill``) is what libxl_dm.c, libxl_qmp.c
and libxl_domain.c do around it (§11.5, §11.6).
"""
from __future__ import annotations

import array
import contextlib
import json
import os
import selectors
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from xen_vtpm.errors import XlError
from xen_vtpm.xen.devicemodel import emulator_sockets, pid_path, split_opts
from xen_vtpm.xen.xenstore import XenStore

from . import domains
from .vtpm_stubdom import bind_pair, write_tcti

CMD_GET_CAPABILITY, CMD_INIT, CMD_SHUTDOWN, CMD_SET_LOCALITY = 0x01, 0x02, 0x03, 0x05
CMD_GET_STATEBLOB, CMD_SET_STATEBLOB, CMD_STOP, CMD_SET_DATAFD, CMD_SET_BUFFERSIZE = 0x0C, 0x0D, 0x0E, 0x10, 0x11
PTM_INIT_FLAG_DELETE_VOLATILE = 1
PTM_STATE_FLAG_DECRYPTED = 1
BLOBS = (1, 2, 3)                  # PERMANENT, VOLATILE, SAVESTATE
# tpm_emulator_check_caps, TPM 2: INIT SHUTDOWN GET_TPMESTABLISHED SET_LOCALITY RESET_TPMESTABLISHED
# SET_DATAFD STOP SET_BUFFERSIZE; tpm_emulator_block_migration: GET_STATEBLOB SET_STATEBLOB STOP.
REQUIRED_CAPS = (1 | 2 | 4 | 8 | 128 | (1 << 12) | (1 << 10) | (1 << 13)) | (1 << 8) | (1 << 9)
CRB_BUFFER_SIZE = 0xF80            # tpm-crb's command buffer (4 KiB minus its registers): what QEMU asks for
TPM2_READ_CLOCK = bytes.fromhex("80010000000a00000181")
TPM2_STARTUP_CLEAR = bytes.fromhex("80010000000c000001440000")
TPM2_ST_NO_SESSIONS = 0x8001
FATAL = bytes.fromhex("00c40000000a00000009")   # tpm_util_write_fatal_error_response: TPM_FAIL

# QEMU's savevm format (migration/savevm.c) as a Xen device model writes it: no configuration
# section and no section footers (accel/xen/xen-all.c sets send-configuration/-section-footer off).
QEVM_MAGIC, QEVM_VERSION = 0x5145564D, 3
QEMU_VM_EOF, QEMU_VM_SECTION_FULL = 0x03, 0x04
TPM_SECTION, TPM_SECTION_VERSION = "tpm-emulator", 0

DM_STATE_TIMEOUT = 60.0            # LIBXL_DEVICE_MODEL_START_TIMEOUT
KILL_TIMEOUT = 10.0


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def state_path(domid: int) -> str:
    """libxl waits for QEMU to write "running" here (DEVICE_MODEL_XS_PATH(0, domid, "/state"))."""
    return f"/local/domain/0/device-model/{domid}/state"


def tcti_file(sim_dir: str | os.PathLike, domid: int) -> Path:
    return Path(sim_dir) / "run" / f"dm-{domid}.tcti"


def has_tpm(extra_hvm: list[str]) -> bool:
    return bool(emulator_sockets(extra_hvm))


# --- QEMU's device state file ---------------------------------------------------------------

def encode_tpm_section(blobs: list[tuple[int, bytes]]) -> bytes:
    """The vmstate of tpm-emulator: for each blob be32 flags, be32 size, then size bytes."""
    return b"".join(struct.pack(">II", flags, len(data)) + data for flags, data in blobs)


def write_device_state(blobs: list[tuple[int, bytes]]) -> bytes:
    name = TPM_SECTION.encode()
    return (struct.pack(">II", QEVM_MAGIC, QEVM_VERSION)
            + struct.pack(">BIB", QEMU_VM_SECTION_FULL, 1, len(name)) + name
            + struct.pack(">II", 0, TPM_SECTION_VERSION) + encode_tpm_section(blobs)
            + bytes([QEMU_VM_EOF]))


def read_tpm_section(data: bytes) -> list[tuple[int, bytes]] | None:
    """The three (flags, blob) of the tpm-emulator section of a device state file written by
    ``write_device_state``; None if it has none.  ValueError for anything malformed."""
    if len(data) < 8 or struct.unpack_from(">II", data) != (QEVM_MAGIC, QEVM_VERSION):
        raise ValueError("not a QEMU device state file (magic/version)")
    pos = 8
    found = None
    while True:
        if pos >= len(data):
            raise ValueError("device state ends without QEMU_VM_EOF")
        kind = data[pos]
        if kind == QEMU_VM_EOF:
            return found
        if kind != QEMU_VM_SECTION_FULL or pos + 6 > len(data):
            raise ValueError(f"unexpected section type {kind:#x} at {pos}")
        _, n = struct.unpack_from(">IB", data, pos + 1)
        name = data[pos + 6:pos + 6 + n].decode("ascii", "replace")
        pos += 6 + n + 8
        if name != TPM_SECTION:
            raise ValueError(f"section {name!r}: the simulated device model has no such device")
        blobs = []
        for _ in BLOBS:
            if pos + 8 > len(data):
                raise ValueError("tpm-emulator section truncated")
            flags, size = struct.unpack_from(">II", data, pos)
            blobs.append((flags, data[pos + 8:pos + 8 + size]))
            pos += 8 + size
        if pos > len(data):
            raise ValueError("tpm-emulator blob truncated")
        found = blobs


# --- the control channel, as tpm_emulator.c uses it -------------------------------------------

class TpmEmulator:
    def __init__(self, chardev: str) -> None:
        self.ctrl = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.ctrl.connect(chardev)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        # tpm_emulator_prepare_data_fd: the fd travels with CMD_SET_DATAFD itself.
        self.ctrl.sendmsg([struct.pack(">I", CMD_SET_DATAFD)],
                          [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [theirs.fileno()]))])
        theirs.close()
        self._check(self._result(), "CMD_SET_DATAFD")
        self.data = mine
        self.locality = -1
        if struct.unpack(">H", self.transmit(TPM2_READ_CLOCK)[:2])[0] != TPM2_ST_NO_SESSIONS:
            raise OSError("the chardev is not emulating a TPM 2.0")
        caps = struct.unpack(">Q", self.call(CMD_GET_CAPABILITY, b"", 8))[0]
        if caps & REQUIRED_CAPS != REQUIRED_CAPS:
            raise OSError(f"TPM does not implement the required capabilities (0x{caps:x})")

    def _recv(self, sock: socket.socket, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            chunk = sock.recv(n - len(buf))
            if not chunk:
                raise OSError("swtpm closed the connection")
            buf += chunk
        return bytes(buf)

    def call(self, cmd: int, body: bytes = b"", answer: int = 4) -> bytes:
        self.ctrl.sendall(struct.pack(">I", cmd) + body)
        return self._recv(self.ctrl, answer)

    def _result(self) -> int:
        return int(struct.unpack(">I", self._recv(self.ctrl, 4))[0])

    @staticmethod
    def _check(rc: int, what: str) -> None:
        if rc:
            raise OSError(f"tpm-emulator: TPM result for {what}: 0x{rc:x}")

    def transmit(self, command: bytes) -> bytes:
        self.data.sendall(command)
        head = self._recv(self.data, 10)
        return head + self._recv(self.data, struct.unpack_from(">I", head, 2)[0] - 10)

    def set_buffer_size(self, size: int) -> None:
        """tpm_emulator_set_buffer_size: CMD_STOP, then CMD_SET_BUFFERSIZE (0 only asks for the size)."""
        self._check(int(struct.unpack(">I", self.call(CMD_STOP))[0]), "CMD_STOP")
        rc = struct.unpack(">IIII", self.call(CMD_SET_BUFFERSIZE, struct.pack(">I", size), 16))[0]
        self._check(rc, "set buffer size")

    def init(self, flags: int = 0) -> None:
        self._check(int(struct.unpack(">I", self.call(CMD_INIT, struct.pack(">I", flags)))[0]), "CMD_INIT")

    def handle_request(self, locality: int, command: bytes) -> bytes:
        try:
            if locality != self.locality:
                self._check(int(struct.unpack(">I", self.call(CMD_SET_LOCALITY, bytes([locality])))[0]),
                            "set locality")
                self.locality = locality
            return self.transmit(command)
        except OSError as exc:
            log(f"tpm-emulator: {exc}")
            return FATAL

    def get_state_blobs(self) -> list[tuple[int, bytes]]:
        """pre_save: every blob with PTM_STATE_FLAG_DECRYPTED (swtpm adds its migration encryption)."""
        blobs = []
        for kind in BLOBS:
            rc, flags, total, length = struct.unpack(
                ">IIII", self.call(CMD_GET_STATEBLOB, struct.pack(">III", PTM_STATE_FLAG_DECRYPTED, kind, 0), 16))
            if (rc and not rc & 0x800) or total != length:
                raise OSError(f"tpm-emulator: Getting the stateblob (type {kind}) failed with 0x{rc:x}")
            blobs.append((flags, self._recv(self.ctrl, length)))
        return blobs

    def set_state_blobs(self, blobs: list[tuple[int, bytes]]) -> None:
        """post_load: stop, set the non-empty blobs with their recorded flags, INIT deleting volatile."""
        self._check(int(struct.unpack(">I", self.call(CMD_STOP))[0]), "CMD_STOP")
        for kind, (flags, data) in zip(BLOBS, blobs, strict=True):
            if data:
                self.ctrl.sendall(struct.pack(">IIII", CMD_SET_STATEBLOB, flags, kind, len(data)) + data)
                self._check(self._result(), f"setting the stateblob (type {kind})")
        self.init(PTM_INIT_FLAG_DELETE_VOLATILE)

    def shutdown(self) -> None:
        with contextlib.suppress(OSError):
            self.call(CMD_SHUTDOWN)


# --- the device model process ---------------------------------------------------------------

class DeviceModel:
    def __init__(self, domid: int, sim_dir: Path, tpm: TpmEmulator, qmp: socket.socket) -> None:
        self.domid, self.sim_dir, self.tpm = domid, sim_dir, tpm
        self.running = True
        self.sel = selectors.DefaultSelector()
        self.sel.register(qmp, selectors.EVENT_READ, ("accept", "qmp"))
        data, ctrl = bind_pair()
        self.guest_listeners = [(data, "data"), (ctrl, "ctrl")]
        for sock, tag in self.guest_listeners:
            self.sel.register(sock, selectors.EVENT_READ, ("accept", tag))
        self.buffers: dict[socket.socket, bytearray] = {}
        self.guest_conns: dict[socket.socket, str] = {}
        self.locality = 0
        write_tcti(tcti_file(sim_dir, domid), data.getsockname()[1])

    def _drop(self, conn: socket.socket) -> None:
        with contextlib.suppress(KeyError, ValueError):
            self.sel.unregister(conn)
        self.buffers.pop(conn, None)
        self.guest_conns.pop(conn, None)
        conn.close()

    def _set_running(self, running: bool) -> None:
        """A stopped VM issues no TPM command: guest connections wait until `cont`."""
        if running == self.running:
            return
        self.running = running
        for conn, tag in self.guest_conns.items():
            if running:
                self.sel.register(conn, selectors.EVENT_READ, ("conn", tag))
            else:
                self.sel.unregister(conn)
        if running:
            for conn, tag in list(self.guest_conns.items()):
                self._consume(conn, tag)

    def _consume(self, conn: socket.socket, tag: str) -> None:
        buf = self.buffers[conn]
        while tag == "qmp" or self.running:
            if tag == "data":
                if len(buf) < 10 or len(buf) < struct.unpack_from(">I", buf, 2)[0]:
                    return
                size = struct.unpack_from(">I", buf, 2)[0]
                reply = self.tpm.handle_request(self.locality, bytes(buf[:size]))
            elif tag == "ctrl":
                if len(buf) < 4:
                    return
                code = struct.unpack_from(">I", buf)[0]
                size = 4 + {CMD_SET_LOCALITY: 1, CMD_INIT: 4}.get(code, 0)
                if len(buf) < size:
                    return
                reply = self._guest_ctrl(code, bytes(buf[4:size]))
            else:
                if b"\n" not in buf:
                    return
                size = buf.index(b"\n") + 1
                reply = self._qmp(bytes(buf[:size]))
            del buf[:size]
            conn.sendall(reply)

    def _guest_ctrl(self, code: int, body: bytes) -> bytes:
        """The TCTI's platform side: the locality register, a platform reset; nothing else."""
        if code == CMD_SET_LOCALITY:
            self.locality = body[0]
            return struct.pack(">I", 0)
        if code == CMD_GET_CAPABILITY:
            return self.tpm.call(CMD_GET_CAPABILITY, b"", 8)
        if code == CMD_INIT:
            try:
                self.tpm.init()
                return struct.pack(">I", 0)
            except OSError:
                return struct.pack(">I", 9)
        return struct.pack(">I", 9)   # TPM_FAIL: stopping the TPM is not the guest's business

    def _qmp(self, line: bytes) -> bytes:
        try:
            req = json.loads(line)
            cmd, args = req["execute"], req.get("arguments", {})
        except (ValueError, KeyError, TypeError):
            return _qmp_error("GenericError", "Invalid JSON")
        if cmd in ("qmp_capabilities", "query-status"):
            return _qmp_return({} if cmd == "qmp_capabilities" else
                               {"running": self.running, "status": "running" if self.running else "paused"})
        if cmd == "stop":
            self._set_running(False)
            return _qmp_return({})
        if cmd == "cont":
            self._set_running(True)
            return _qmp_return({})
        if cmd == "xen-save-devices-state":
            return self._save_devices_state(str(args.get("filename", "")))
        if cmd == "quit":
            raise SystemExit(0)
        return _qmp_error("CommandNotFound", f"The command {cmd} has not been found")

    def _save_devices_state(self, filename: str) -> bytes:
        """qmp_xen_save_devices_state: vm_stop, the state file (O_TRUNC, 0660), vm_start if it ran."""
        was_running = self.running
        self._set_running(False)
        try:
            state = write_device_state(self.tpm.get_state_blobs())
            fd = os.open(filename, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o660)
            with open(fd, "wb") as fh:
                fh.write(state)
        except OSError as exc:
            log(f"xen-save-devices-state: {exc}")
            return _qmp_error("GenericError", "An IO error has occurred")
        finally:
            if was_running:
                self._set_running(True)
        log(f"device state saved to {filename} ({len(state)} bytes)")
        return _qmp_return({})

    def serve_forever(self) -> None:
        while True:
            for key, _ in self.sel.select():
                sock = key.fileobj
                kind, tag = key.data
                if kind == "accept":
                    conn, _ = sock.accept()
                    self.buffers[conn] = bytearray()
                    if tag == "qmp":
                        conn.sendall(json.dumps({"QMP": {"version": {"qemu": {"major": 7, "minor": 2, "micro": 0}},
                                                         "capabilities": []}}).encode() + b"\r\n")
                    else:
                        self.guest_conns[conn] = tag
                    if tag == "qmp" or self.running:
                        self.sel.register(conn, selectors.EVENT_READ, ("conn", tag))
                    continue
                try:
                    chunk = sock.recv(65536)
                    if not chunk:
                        self._drop(sock)
                        continue
                    self.buffers[sock] += chunk
                    self._consume(sock, tag)
                except (OSError, ValueError):
                    self._drop(sock)


def _qmp_return(value: Any) -> bytes:
    return json.dumps({"return": value}).encode() + b"\r\n"


def _qmp_error(cls: str, desc: str) -> bytes:
    return json.dumps({"error": {"class": cls, "desc": desc}}).encode() + b"\r\n"


def _parse_argv(argv: list[str]) -> dict[str, Any]:
    opts: dict[str, Any] = {"extra": argv}
    for opt, val in zip(argv, argv[1:], strict=False):
        if opt in ("-xen-domid", "-name", "-qmp", "-incoming"):
            opts[opt[1:]] = val
    return opts


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    opts = _parse_argv(argv)
    domid = int(opts["xen-domid"])
    sim_dir = Path(os.environ["XEN_VTPM_SIM_DIR"])
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(0))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    chardevs = emulator_sockets(argv)
    if len(chardevs) != 1:
        log("qemu: exactly one -tpmdev emulator with a -device tpm-tis/tpm-crb is simulated")
        return 1
    incoming = None
    if "incoming" in opts:
        fd = int(str(opts["incoming"]).removeprefix("fd:"))
        with open(fd, "rb") as fh:
            incoming = fh.read()
    qmp_path = split_opts(str(opts["qmp"]).removeprefix("unix:"))[0]
    tpm = None
    try:
        tpm = TpmEmulator(chardevs[0])
        tpm.set_buffer_size(0)                 # tpm-crb's realize asks the backend for its buffer size
        tpm.set_buffer_size(CRB_BUFFER_SIZE)   # tpm_emulator_startup_tpm at reset
        if incoming is None:
            tpm.init()
            rsp = tpm.transmit(TPM2_STARTUP_CLEAR)      # the firmware's part of a fresh boot
            log(f"firmware: TPM2_Startup(CLEAR) rc=0x{struct.unpack_from('>I', rsp, 6)[0]:x}")
        else:
            blobs = read_tpm_section(incoming)
            if blobs is None:
                raise OSError("the incoming device state has no tpm-emulator section")
            tpm.set_state_blobs(blobs)
            log(f"incoming migration: tpm-emulator state loaded ({sum(len(b) for _, b in blobs)} bytes)")
        qmp = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(qmp_path)
        qmp.bind(qmp_path)
        qmp.listen(4)
        dm = DeviceModel(domid, sim_dir, tpm, qmp)
        with XenStore() as xs:
            xs.write(state_path(domid), "running")
        log(f"qemu-dm for domain {opts.get('name')} (domid {domid}) running, TPM on {chardevs[0]}")
        dm.serve_forever()
    except (OSError, ValueError) as exc:
        log(f"qemu-system-i386: {exc}")
        return 1
    finally:
        tcti_file(sim_dir, domid).unlink(missing_ok=True)
        if tpm is not None:
            tpm.shutdown()      # tpm_emulator_inst_finalize, at QEMU's exit
    return 0


# --- libxl's side --------------------------------------------------------------------------

def qmp_path(sim_dir: str | os.PathLike, domid: int) -> Path:
    """libxl's QMP socket of a device model (qmp-libxl-<domid> under its run dir)."""
    return Path(sim_dir) / "run" / f"qmp-libxl-{domid}"


def _xen_lib_dir(sim_dir: str | os.PathLike) -> Path:
    d = Path(sim_dir) / "var" / "lib" / "xen"
    d.mkdir(parents=True, exist_ok=True)
    return d


def save_file(sim_dir: str | os.PathLike, domid: int) -> Path:
    """LIBXL_DEVICE_MODEL_SAVE_FILE.<domid>."""
    return _xen_lib_dir(sim_dir) / f"qemu-save.{domid}"


def resume_file(sim_dir: str | os.PathLike, domid: int) -> Path:
    """LIBXL_DEVICE_MODEL_RESTORE_FILE.<domid>."""
    return _xen_lib_dir(sim_dir) / f"qemu-resume.{domid}"


def qmp(sim_dir: str | os.PathLike, domid: int, command: str, timeout: float = 30.0, **arguments: Any) -> Any:
    """One QMP command on a fresh connection (greeting, qmp_capabilities, the command)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(timeout)
        s.connect(str(qmp_path(sim_dir, domid)))
        f = s.makefile("rwb")
        json.loads(f.readline())
        for cmd, args in (("qmp_capabilities", {}), (command, arguments)):
            f.write(json.dumps({"execute": cmd, "arguments": args}).encode() + b"\n")
            f.flush()
            answer = json.loads(f.readline())
        if "error" in answer:
            raise XlError(f"libxl: error: QMP {command} failed: {answer['error'].get('desc')}")
        return answer.get("return")


def spawn(sim_dir: str, domid: int, name: str, extra_hvm: list[str], env: dict[str, str],
          incoming: bytes | None) -> int:
    """libxl__spawn_local_dm: QEMU with -incoming fd:N on qemu-resume.<domid> when restoring; wait
    for it to say "running" in XenStore, record its pid, then unlink qemu-resume (libxl_dm.c)."""
    argv = [sys.executable, "-m", "xen_vtpm_sim.devicemodel", "-xen-domid", str(domid), "-name", name,
            "-qmp", f"unix:{qmp_path(sim_dir, domid)},server=on,wait=off", *extra_hvm]
    fds: list[int] = []
    resume = resume_file(sim_dir, domid)
    if incoming is not None:
        wfd = os.open(resume, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with open(wfd, "wb") as fh:
            fh.write(incoming)
        fds.append(os.open(resume, os.O_RDONLY))
        argv[6:6] = ["-incoming", f"fd:{fds[0]}"]
    logfile = Path(sim_dir) / "logs" / f"qemu-dm-{name}.log"
    try:
        with open(logfile, "ab") as logf:
            proc = subprocess.Popen(argv, env=env, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=logf,
                                    stderr=logf, start_new_session=True, cwd=sim_dir)
    finally:
        for fd in fds:
            os.close(fd)
    try:
        with XenStore(os.path.join(sim_dir, "xenstored.sock")) as xs:
            xs.write(pid_path(domid), str(proc.pid))
            ok = xs.wait_for(lambda: xs.read_or(state_path(domid)) == "running" or proc.poll() is not None,
                             [state_path(domid)], DM_STATE_TIMEOUT)
        if not ok or proc.poll() is not None:
            raise XlError(f"libxl: error: domain {domid} device model: spawn failed; see logs/{logfile.name}")
    except BaseException:
        kill(sim_dir, proc.pid)
        raise
    finally:
        resume.unlink(missing_ok=True)
    return proc.pid


def save_state(sim_dir: str, domid: int) -> bytes:
    """libxl__qmp_suspend_save: QMP stop, then xen-save-devices-state into qemu-save.<domid> (libxl
    creates it O_WRONLY|O_CREAT 0600 and hands QEMU the descriptor; here QEMU reopens the name)."""
    path = save_file(sim_dir, domid)
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))
    try:
        qmp(sim_dir, domid, "stop")
        qmp(sim_dir, domid, "xen-save-devices-state", filename=str(path), live=False)
        return path.read_bytes()
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def resume(sim_dir: str, domid: int) -> None:
    """libxl__qmp_resume after a save that keeps the domain (-c, -p, or a failed save)."""
    qmp(sim_dir, domid, "cont")


def kill(sim_dir: str | os.PathLike, pid: int) -> None:
    """libxl__kill_xs_path: SIGHUP, and (here) SIGKILL if it does not end within KILL_TIMEOUT."""
    domains.kill_group(pid, sim_dir, signal.SIGHUP)
    if not domains.wait_until(lambda: not domains.is_alive(pid), KILL_TIMEOUT):
        domains.kill_group(pid, sim_dir, signal.SIGKILL)
        domains.wait_until(lambda: not domains.is_alive(pid), KILL_TIMEOUT)


def cleanup_files(sim_dir: str | os.PathLike, domid: int) -> None:
    """libxl_domain.c at destroy: unlink qemu-save/qemu-resume (never overwritten first)."""
    for path in (save_file(sim_dir, domid), resume_file(sim_dir, domid), qmp_path(sim_dir, domid),
                 tcti_file(sim_dir, domid)):
        path.unlink(missing_ok=True)


if __name__ == "__main__":
    sys.exit(main())


# --- the hooks the simulated xl calls ---------------------------------------------------------

def extra_hvm(cfg: dict[str, Any]) -> list[str]:
    return [str(a) for a in cfg.get("device_model_args_hvm", [])]


def start_for(sim_dir: str, domid: int, spec: dict[str, Any], incoming: bytes | None) -> int | None:
    """Start the domain's device model if its config gives QEMU a TPM (the only device simulated);
    returns its pid.  It runs in dom0, so it talks to xenstored on dom0's socket."""
    extra = extra_hvm(spec["cfg"])
    if not has_tpm(extra):
        return None
    env = dict(os.environ, XENSTORED_PATH=os.path.join(sim_dir, "xenstored.sock"), XEN_VTPM_SIM_DIR=sim_dir,
               **{domains.OWNER_ENV: sim_dir})
    return spawn(sim_dir, domid, spec["name"], extra, env, incoming)


def stop_for(sim_dir: str, dom: dict[str, Any]) -> None:
    """At destroy: end the device model (SIGHUP), then libxl's file and XenStore clean-up."""
    if dom.get("dm_pid"):
        kill(sim_dir, dom["dm_pid"])
    cleanup_files(sim_dir, dom["domid"])
