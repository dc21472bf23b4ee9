"""Simulated vTPM stub domain (stubdom/vtpm): a TPM 2.0 for its guests, persisted like vtpmblk.c.

`python -m xen_vtpm_sim.vtpm_stubdom --sim-dir DIR --domid N --name NAME --config CFGJSON`

* tpmfront of ``device/vtpm/0`` to the manager (mini-os tpmfront, docs/xen-internals.md §9.3), then LOADHASHKEY and
  the vtpmblk slot whose SHA1 matches; ANY failure gives a fresh TPM (new seeds, so a new EK) that
  overwrites slot 0 and the manager entry on its first successful command (docs/xen-internals.md §6.4).
* After every successful command: whole swtpm state (permanent + volatile) -> inactive slot under a
  fresh key -> SAVEHASHKEY(H ‖ K), in that order (docs/xen-internals.md §5.3).
* Guests reach the TPM on 127.0.0.1 ports P (raw TPM commands) and P+1 (swtpm control commands),
  i.e. the TCTI ``swtpm:host=127.0.0.1,port=P`` written to ``DIR/run/<NAME>.tcti``.  All serving is
  in this one process, so `xl pause` (SIGSTOP) stops every command; swtpm is reachable only from here.
* tpmback for the guests' ``backend/vtpm`` entries; they go to state 4 only once the TPM serves.
"""
from __future__ import annotations

import selectors
import signal
import socket
import struct
import sys
from pathlib import Path

from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xlcfg import disk_target
from xen_vtpm_sim import domain_args, vtpmblk
from xen_vtpm_sim import mgrproto as mp

from .swtpm_engine import EngineError, SwtpmEngine
from .tpmif import TpmBack, Tpmif, log, read_packet, ring_socket_path

FRONT_TIMEOUT = 10.0
MAX_COMMAND = 4096

CTRL_GET_CAPABILITY = 0x01
CTRL_INIT = 0x02
CTRL_SHUTDOWN = 0x03
CTRL_SET_LOCALITY = 0x05
TPM_FAIL = 9


class ManagerLink:
    """mini-os tpmfront on device/vtpm/0 plus the vtpm_cmd.c calls to the manager."""

    def __init__(self, xs, sim_dir: Path, domid: int) -> None:
        fe = f"/local/domain/{domid}/device/vtpm/0"
        be = xs.read(f"{fe}/backend")
        be_id = int(xs.read(f"{fe}/backend-id"))
        xs.write(f"{fe}/feature-protocol-v2", "1")

        def publish(tx) -> None:
            # No grant table here: the ring is a socket, these only keep the node layout of docs/xen-internals.md §8.1.
            tx.write(f"{fe}/ring-ref", str(8 + domid))
            tx.write(f"{fe}/event-channel", str(16 + domid))
        xs.transact(publish)
        xs.write(f"{fe}/state", "4")
        ok = xs.wait_for(lambda: xs.read_or(f"{be}/state") == "4" and xs.read_or(f"{be}/feature-protocol-v2") == "1",
                         [f"{be}/state"], FRONT_TIMEOUT)
        if not ok:
            raise OSError(f"tpmfront: backend {be} did not connect within {FRONT_TIMEOUT:g} s")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(ring_socket_path(sim_dir, be_id, domid, 0)))

    def call(self, request: bytes) -> mp.Packet:
        self.sock.sendall(request)
        raw = read_packet(self.sock)
        if raw is None:
            raise OSError("tpmfront: the manager closed the ring")
        return mp.decode(raw)

    def load_hashkey(self) -> bytes:
        rsp = self.call(mp.load_hashkey_request())
        if rsp.code:
            log(f"vtpm_cmd.c:164: Error: VTPM_LoadHashKey() failed with error code ({rsp.code})")
            raise ValueError(rsp.code)
        if len(rsp.body) != vtpmblk.HASHKEY_SIZE:
            log(f"vtpm_cmd.c:171: Error: VTPM_LoadHashKey() returned {len(rsp.body)} bytes, expected 52")
            raise ValueError(len(rsp.body))
        return rsp.body

    def save_hashkey(self, hashkey: bytes) -> int:
        return self.call(mp.save_hashkey_request(hashkey)).code


class Vtpm:
    def __init__(self, sim_dir: Path, name: str, image: Path, link: ManagerLink) -> None:
        self.image = image
        self.link = link
        self.active_slot = -1
        state = self._restore()
        scratch = sim_dir / "run" / f"swtpm-{name}"
        try:
            self.engine = SwtpmEngine(state, scratch)
        except EngineError as exc:
            if state is None:
                raise
            log(f"vtpm.c:312: Error: TPM engine rejected the stored state ({exc}); starting a fresh vTPM")
            self.active_slot = -1
            self.engine = SwtpmEngine(None, scratch)

    def _restore(self) -> bytes | None:
        """read_vtpmblk(): the stored TPM state, or None for a fresh vTPM (with the console markers)."""
        try:
            hashkey = self.link.load_hashkey()
        except (ValueError, OSError, mp.ProtocolError):
            log("vtpmblk.c:300: Error: VTPM_LoadHashKey failed")
            return None
        try:
            slot, plain = vtpmblk.load(self.image, hashkey)
        except (vtpmblk.ChecksumError, OSError):
            log("vtpmblk.c:320: Error: NVM Storage Checksum failed!")
            return None
        log(f"vtpmblk.c:331: Info: Read {len(plain)} bytes from NVM persistent storage (slot {slot})")
        self.active_slot = slot
        return plain

    def persist(self) -> None:
        """write_vtpmblk(): flip slot, write under a new key, then SAVEHASHKEY (docs/xen-internals.md §5.3)."""
        self.active_slot = 0 if self.active_slot < 0 else 1 - self.active_slot
        try:
            hashkey = vtpmblk.write_slot(self.image, self.active_slot, self.engine.state())
            rc = self.link.save_hashkey(hashkey)
        except (OSError, EngineError, mp.ProtocolError) as exc:
            log(f"vtpmblk.c:270: Error: cannot write NVM persistent storage ({exc})")
            rc = -1
        if rc:
            log(f"vtpm_cmd.c:140: Error: VTPM_SaveHashKey failed ({rc})")
            log("tpm_data.c:117: Error: tpm_store_permanent_data() failed")

    def command(self, cmd: bytes) -> bytes:
        rsp = self.engine.execute(cmd)
        if len(rsp) >= 10 and struct.unpack_from(">I", rsp, 6)[0] == 0:
            self.persist()
        return rsp

    def control(self, code: int, body: bytes) -> bytes:
        if code == CTRL_SET_LOCALITY:
            return struct.pack(">I", 0)
        if code == CTRL_GET_CAPABILITY:
            return self.engine.capability()
        if code == CTRL_INIT:
            rc = self.engine.reset()
            if rc == 0:
                self.persist()
            return struct.pack(">I", rc)
        # Stopping the engine is not the guest's business.
        return struct.pack(">I", TPM_FAIL)


CTRL_BODY = {CTRL_GET_CAPABILITY: 0, CTRL_INIT: 4, CTRL_SHUTDOWN: 0, CTRL_SET_LOCALITY: 1}


def bind_pair() -> tuple[socket.socket, socket.socket]:
    """Listening sockets on P and P+1 (the swtpm TCTI derives the control port as P+1)."""
    for _ in range(100):
        data = socket.socket()
        data.bind(("127.0.0.1", 0))
        port = data.getsockname()[1]
        ctrl = socket.socket()
        try:
            ctrl.bind(("127.0.0.1", port + 1))
        except OSError:
            data.close()
            ctrl.close()
            continue
        data.listen(8)
        ctrl.listen(8)
        return data, ctrl
    raise OSError("no free TCP port pair on 127.0.0.1")


class Server:
    """Single-threaded: one command at a time, and nothing at all while the process is stopped."""

    def __init__(self, vtpm: Vtpm, data: socket.socket, ctrl: socket.socket) -> None:
        self.vtpm = vtpm
        self.sel = selectors.DefaultSelector()
        self.sel.register(data, selectors.EVENT_READ, "accept-data")
        self.sel.register(ctrl, selectors.EVENT_READ, "accept-ctrl")
        self.buffers: dict[socket.socket, bytearray] = {}

    def _drop(self, conn: socket.socket) -> None:
        self.sel.unregister(conn)
        self.buffers.pop(conn, None)
        conn.close()

    def _consume(self, conn: socket.socket, kind: str) -> None:
        buf = self.buffers[conn]
        while True:
            if kind == "data":
                if len(buf) < 10:
                    return
                size = struct.unpack_from(">I", buf, 2)[0]
                if size < 10 or size > MAX_COMMAND:
                    raise ValueError(f"command size {size}")
                if len(buf) < size:
                    return
                reply = self.vtpm.command(bytes(buf[:size]))
            else:
                if len(buf) < 4:
                    return
                code = struct.unpack_from(">I", buf)[0]
                if code not in CTRL_BODY:
                    raise ValueError(f"control command {code:#x}")
                size = 4 + CTRL_BODY[code]
                if len(buf) < size:
                    return
                reply = self.vtpm.control(code, bytes(buf[4:size]))
            del buf[:size]
            conn.sendall(reply)

    def serve_forever(self) -> None:
        while True:
            for key, _ in self.sel.select():
                sock, tag = key.fileobj, key.data
                if tag.startswith("accept-"):
                    conn, _ = sock.accept()
                    self.buffers[conn] = bytearray()
                    self.sel.register(conn, selectors.EVENT_READ, tag[len("accept-"):])
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


def write_tcti(path: Path, port: int) -> None:
    tmp = path.with_suffix(".tcti.tmp")
    tmp.write_text(f"swtpm:host=127.0.0.1,port={port}\n")
    tmp.rename(path)


def main(argv: list[str] | None = None) -> int:
    args, cfg = domain_args.parse("vtpm-stubdom", argv)

    sim_dir = args.sim_dir
    image = Path(disk_target(cfg))
    tcti_file = sim_dir / "run" / f"{args.name}.tcti"
    tcti_file.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    log(f"vtpm.c:380: Info: vTPM stub domain {args.name} (domid {args.domid}) starting, disk {image.name}")
    xs = XenStore()
    vtpm = None
    try:
        vtpm = Vtpm(sim_dir, args.name, image, ManagerLink(xs, sim_dir, args.domid))
        data, ctrl = bind_pair()
        write_tcti(tcti_file, data.getsockname()[1])
        log(f"vtpm.c:402: Info: serving TPM 2.0 on swtpm:host=127.0.0.1,port={data.getsockname()[1]}")

        def gone(t: Tpmif) -> None:
            log(f"tpmback.c:460: Info: frontend {t.fe_domid}/{t.devid} gone, tpmif freed")
        TpmBack(XenStore, args.domid, on_new=lambda t: None, on_connect=lambda t: None, on_free=gone).start()
        Server(vtpm, data, ctrl).serve_forever()
    except OSError as exc:
        log(f"vtpm.c:410: Error: {exc}")
        return 1
    finally:
        tcti_file.unlink(missing_ok=True)
        if vtpm is not None:
            vtpm.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
