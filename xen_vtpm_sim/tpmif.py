"""mini-os tpmback and the simulated ring, shared by the vtpmmgr and the vTPM stub domains.

* tpmback (mini-os semantics, docs/xen-internals.md §9.2) for every `backend/vtpm/<F>/<N>` of one domain.
  Identity = the `uuid` node of the backend dir, which only the toolstack can write.
* The "shared page" of a connected frontend is a Unix socket ``DIR/run/tpmif/<B>-<F>-<N>.sock``
  created when the frontend reaches state 3/4, so a connection there stands for that frontend domain.
"""
from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from xen_vtpm.errors import XenStoreError
from xen_vtpm_sim import mgrproto as mp


def log(msg: str) -> None:
    """A line on the domain's console (its stdout, which xenconsoled reads).  Without a xenconsoled
    the output is lost, as a console ring nobody reads would lose it; the domain runs on."""
    try:
        print(msg, flush=True)
    except OSError:   # EPIPE on a pipe, EIO on a pty whose master (xenconsoled) closed
        pass


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
    """Follows backend/vtpm of one domain with the state machine of mini-os tpmback.c (docs/xen-internals.md §9.2)."""

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
            if fe_state in (None, "0"):      # unreadable or XenbusStateUnknown: free_tpmif
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


# --- the simulated shared page ----------------------------------------------------------

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
