"""Simulated vTPM stub domain (stubdom/vtpm): Xen's TPM 1.2 emulator, or a TPM 2.0 stand-in, persisted like vtpmblk.c.

`python -m xen_vtpm_sim.vtpm_stubdom --sim-dir DIR --domid N --name NAME --config CFGJSON`

* The kernel decides the TPM: ``vtpm-stubdom.gz`` is Xen's, a TPM 1.2 (docs/xen-internals.md §1.1), run as
  swtpm in TPM 1.2 mode; ``vtpm2-stubdom.gz`` is the simulator's TPM 2.0 stand-in (no Xen counterpart).
* ``extra=`` is parsed like vtpm.c's parse_cmd_line: ``clear`` (default), ``save``, ``loglevel=`` (§6.5).
* Boot as vtpm.c main() does, printing the console lines where Xen prints them (§7.2): tpmfront of
  ``device/vtpm/0`` to the manager (§9.3), the disk found through blkfront's ``device/vbd`` backend, then
  read_vtpmblk(): LOADHASHKEY, each slot's raw read ("Read <n> bytes … (slot N)", printed *before* the
  hash check), the checksum, decryption, the engine taking the state.  ANY failure prints
  "initializing TPM data to default values" and gives a fresh TPM (new EK) that overwrites slot 0 and the
  manager entry on its first successful command (§6.4); ``save`` mode on a fresh TPM ends in fail-stop.
* After every successful command: whole swtpm state (permanent + volatile) -> inactive slot under a
  fresh key -> SAVEHASHKEY(H ‖ K), in that order (§5.3).
* Guests reach the TPM on 127.0.0.1 ports P (raw TPM commands) and P+1 (swtpm control commands),
  i.e. the TCTI ``swtpm:host=127.0.0.1,port=P`` written to ``DIR/run/<NAME>.tcti``.  All serving is
  in this one process, so `xl pause` (SIGSTOP) stops every command; swtpm is reachable only from here.
* tpmback for the guests' ``backend/vtpm`` entries; they go to state 4 only once the TPM serves.
"""
from __future__ import annotations

import hashlib
import os
import selectors
import signal
import socket
import struct
import sys
from dataclasses import dataclass
from pathlib import Path

from xen_vtpm.xen.xenstore import XenStore
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

EMULATOR = {"1.2": "1.2.0.7-475", "2.0": "2.0, swtpm stand-in"}
STARTUP_TYPE = {"clear": 1, "save": 2}        # TPM_ST_CLEAR, TPM_ST_STATE (tpm_structures.h:174-176)
# vtpm.c's own priorities are syslog numbers (vtpm.c:38-40); every other file's lines print at any level.
LOGLEVELS = {"debug": 7, "info": 6, "error": 3}


def tpm_version(kernel: str) -> str:
    return "2.0" if os.path.basename(kernel or "").startswith("vtpm2-") else "1.2"


@dataclass
class Options:
    startup: str = "clear"
    loglevel: str = "info"


class Console:
    """The stub domain's console lines, in the `<file>:<line>: <Level>: <text>` form of the emulator's macros."""

    def __init__(self) -> None:
        self.level = LOGLEVELS["info"]

    def vtpm(self, line: int, level: str, text: str) -> None:
        """A line of vtpm.c itself: its info lines vanish below loglevel=info (docs/xen-internals.md §7.1)."""
        if self.level >= (LOGLEVELS["error"] if level == "Error" else LOGLEVELS["info"]):
            log(f"vtpm.c:{line}: {level}: {text}")

    @staticmethod
    def emu(where: str, level: str, text: str) -> None:
        log(f"{where}: {level}: {text}")


def parse_options(extra: str, con: Console) -> Options:
    """parse_cmd_line() (vtpm.c:277-442) for the options the simulator honours."""
    opts = Options()
    for word in extra.split():
        if word.startswith("loglevel="):
            if word[9:] in LOGLEVELS:
                opts.loglevel = word[9:]
                con.level = LOGLEVELS[opts.loglevel]
        elif word in ("clear", "save"):
            opts.startup = word
        elif word == "deactivated":
            raise SystemExit("vtpm-stubdom (simulated): startup mode `deactivated' is not simulated")
        elif not word.startswith(("maintcmds=", "hwinitpcr=", "locality=")):
            con.vtpm(387, "Error", f"Invalid command line option `{word}'")
    con.vtpm({"clear": 395, "save": 398}[opts.startup], "Info", f"Startup mode is `{opts.startup}'")
    con.vtpm(425, "Info", "All PCRs initialized to default values")
    con.vtpm(429, "Info", "TPM Maintenance Commands disabled")
    con.vtpm(439, "Info", f"Log level set to {opts.loglevel}")
    return opts


class ManagerLink:
    """mini-os tpmfront on device/vtpm/0 plus the vtpm_cmd.c calls to the manager."""

    def __init__(self, xs, sim_dir: Path, domid: int) -> None:
        log("============= Init TPM Front ================")
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

    def load_hashkey(self) -> bytes | None:
        """VTPM_LoadHashKey (vtpm_cmd.c:137-179): the manager's H‖K, None (with its console lines) on error."""
        Console.emu("vtpm_cmd.c:155", "Info", "Requesting Encryption key from backend")
        try:
            rsp = self.call(mp.load_hashkey_request())
        except (OSError, mp.ProtocolError):
            Console.emu("vtpm_cmd.c:156", "Error", "Error sending command through frontend device")
            rsp = None
        if rsp is not None and rsp.code:
            Console.emu("vtpm_cmd.c:164", "Error", f"VTPM_LoadHashKey() failed with error code ({rsp.code})")
        if rsp is None or rsp.code:
            Console.emu("vtpm_cmd.c:175", "Error", "VTPM_LoadHashKey failed")
            return None
        return rsp.body

    def save_hashkey(self, hashkey: bytes) -> bool:
        """VTPM_SaveHashKey (vtpm_cmd.c:181-218)."""
        Console.emu("vtpm_cmd.c:201", "Info", "Sending encryption key to backend")
        try:
            rc = self.call(mp.save_hashkey_request(hashkey)).code
        except (OSError, mp.ProtocolError):
            Console.emu("vtpm_cmd.c:202", "Error", "Error sending command through frontend device")
            rc = None
        if rc:
            Console.emu("vtpm_cmd.c:210", "Error", f"VTPM_SaveHashKey() failed with error code ({rc})")
        if rc is None or rc:
            Console.emu("vtpm_cmd.c:214", "Error", "VTPM_SaveHashKey failed")
            return False
        return True


def find_disk(xs, domid: int) -> Path:
    """blkfront: the stub domain's first vbd and what its backend serves (docs/xen-internals.md §5.6)."""
    Console.emu("vtpmblk.c:35", "Info", "Initializing persistent NVM storage")
    base = f"/local/domain/{domid}/device/vbd"
    devs = sorted(xs.ls(base), key=int) if xs.exists(base) else []
    if not devs:
        Console.emu("vtpmblk.c:38", "Error", "BLKIO: ERROR Unable to initialize blkfront")
        raise OSError("no vbd")
    be = xs.read(f"{base}/{devs[0]}/backend")
    if xs.read_or(f"{be}/mode") != "w":
        Console.emu("vtpmblk.c:42", "Error", "BLKIO: ERROR block device is read only!")
        raise OSError("read-only vbd")
    if xs.read_or(f"{be}/type") == "phy":
        return Path(xs.read(f"{be}/physical-device-path"))
    return Path(xs.read(f"{be}/params").partition(":")[2])   # qdisk: "<format>:<path>", read as raw here


def _hexline(label: str, digest: bytes) -> str:
    return label + "".join(f"{b:02X} " for b in digest)


class Vtpm:
    def __init__(self, sim_dir: Path, name: str, image: Path, link: ManagerLink, version: str,
                 opts: Options, con: Console) -> None:
        self.image = image
        self.link = link
        self.active_slot = -1
        con.vtpm(210, "Info", "VTPM Initializing\n")
        state = self._read_vtpmblk()
        scratch = sim_dir / "run" / f"swtpm-{name}"
        self.engine: SwtpmEngine | None = None
        if state is not None:
            try:
                self.engine = SwtpmEngine(state, scratch, version, opts.startup)
            except EngineError:
                self.active_slot = -1     # an unmarshal failure prints nothing of its own (tpm_data.c:238-249)
        if self.engine is None:
            Console.emu("tpm_data.c:122", "Info", "initializing TPM data to default values")
            self.engine = SwtpmEngine(None, scratch, version, opts.startup)
        Console.emu("tpm_startup.c:29", "Info", "TPM_Init()")
        Console.emu("tpm_startup.c:43", "Info", f"TPM_Startup({STARTUP_TYPE[opts.startup]})")
        if state is None or self.active_slot < 0:
            if opts.startup == "save":
                Console.emu("tpm_startup.c:87", "Error", "restoring permanent data failed")
                self.engine.fail_stop()

    def _read_vtpmblk(self) -> bytes | None:
        """read_vtpmblk() (vtpmblk.c:274-354), console lines in its order; None: the caller starts fresh."""
        hashkey = self.link.load_hashkey()
        if hashkey is None:
            return None
        if len(hashkey) != vtpmblk.HASHKEY_SIZE:
            Console.emu("vtpmblk.c:289", "Error", f"Manager returned a hashkey of invalid size! expected 32, "
                                                  f"actual {len(hashkey)}")
            return None
        digest, key = hashkey[:vtpmblk.HASH_SIZE], hashkey[vtpmblk.HASH_SIZE:]
        hashes = []
        for slot, debug_line in ((0, "vtpmblk.c:296"), (1, "vtpmblk.c:310")):
            self.active_slot = slot
            Console.emu(debug_line, "Debug", f"Reading slot {slot} from disk")
            try:
                blob = vtpmblk.read_raw(self.image, slot)
            except vtpmblk.SlotError as exc:
                Console.emu(f"vtpmblk.c:{exc.line}", "Error", str(exc))
                self.active_slot = -1
                return None
            except OSError as exc:
                Console.emu("vtpmblk.c:101", "Error", f"read(length) failed! error was {exc.strerror}")
                self.active_slot = -1
                return None
            Console.emu("vtpmblk.c:120", "Info", f"Read {len(blob)} bytes from NVM persistent storage (slot {slot})")
            hashes.append(hashlib.sha1(blob).digest())
            if hashes[-1] == digest:
                try:
                    return vtpmblk.decrypt(blob, key)
                except vtpmblk.ChecksumError as exc:
                    Console.emu("vtpmblk.c:225", "Error", str(exc))
                    self.active_slot = -1
                    return None
        Console.emu("vtpmblk.c:322", "Error", "NVM Storage Checksum failed!")
        log(_hexline("Expected: ", digest))
        log(_hexline("Slot 0:   ", hashes[0]))
        log(_hexline("Slot 1:   ", hashes[1]))
        self.active_slot = -1
        return None

    def persist(self) -> None:
        """write_vtpmblk(): flip slot, write under a new key, then SAVEHASHKEY (docs/xen-internals.md §5.3)."""
        assert self.engine is not None
        self.active_slot = 0 if self.active_slot < 0 else 1 - self.active_slot
        saved = False
        try:
            state = self.engine.state()
            hashkey = vtpmblk.write_slot(self.image, self.active_slot, state)
        except (OSError, EngineError) as exc:
            Console.emu("vtpmblk.c:73", "Error", f"vtpm data cannot be written ({exc})")
        else:
            blob = vtpmblk.IV_SIZE + len(state) + (-len(state) % 16)
            Console.emu("vtpmblk.c:89", "Info", f"Wrote {blob} bytes to NVM persistent storage")
            saved = self.link.save_hashkey(hashkey)
        if not saved:
            Console.emu("tpm_cmd_handler.c:4167", "Error", "tpm_store_permanent_data() failed")

    def command(self, cmd: bytes) -> bytes:
        assert self.engine is not None
        rsp = self.engine.execute(cmd)
        if len(rsp) >= 10 and struct.unpack_from(">I", rsp, 6)[0] == 0:
            self.persist()
        return rsp

    def control(self, code: int, body: bytes) -> bytes:
        assert self.engine is not None
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
    version = tpm_version(str(cfg.get("kernel", "")))
    tcti_file = sim_dir / "run" / f"{args.name}.tcti"
    tcti_file.unlink(missing_ok=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    # Mini-OS's boot banner (simulator only: it names the domid so tests can tell boots apart).
    log(f"Xen Minimal OS: vTPM stub domain {args.name} (domid {args.domid}) starting")
    Console.emu("vtpm.c:463", "Info", f"starting TPM Emulator ({EMULATOR[version]})")
    con = Console()
    opts = parse_options(str(cfg.get("extra", "")), con)
    log("============= Init TPM BACK ================")
    xs = XenStore()
    vtpm = None
    try:
        try:
            link = ManagerLink(xs, sim_dir, args.domid)
        except OSError as exc:
            Console.emu("vtpm.c:472", "Error", f"Unable to initialize tpmfront device ({exc})")
            return 1
        try:
            image = find_disk(xs, args.domid)
        except OSError as exc:
            Console.emu("vtpm.c:484", "Error", f"Unable to initialize Blkfront persistent storage ({exc})")
            return 1
        vtpm = Vtpm(sim_dir, args.name, image, link, version, opts, con)
        data, ctrl = bind_pair()
        write_tcti(tcti_file, data.getsockname()[1])
        log(f"vtpm-stubdom (simulated): serving TPM {version} on swtpm:host=127.0.0.1,port={data.getsockname()[1]}")

        def gone(t: Tpmif) -> None:
            log(f"tpmback.c:460: Info: frontend {t.fe_domid}/{t.devid} gone, tpmif freed")
        TpmBack(XenStore, args.domid, on_new=lambda t: None, on_connect=lambda t: None, on_free=gone).start()
        Server(vtpm, data, ctrl).serve_forever()
    except (OSError, EngineError) as exc:
        log(f"vtpm-stubdom (simulated): stopping: {exc}")
        return 1
    finally:
        tcti_file.unlink(missing_ok=True)
        if vtpm is not None and vtpm.engine is not None:
            vtpm.engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
