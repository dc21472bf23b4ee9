"""A simulated xenstored speaking xs_wire (docs/xen-internals.md §12) on a Unix socket.

The main socket is dom0 (privileged).  Every domain introduced with INTRODUCE
gets a second socket ``PATH.d<domid>`` standing in for its ring: connections
there act as that unprivileged domain and resolve relative paths under
``/local/domain/<domid>``.  The permission, error and watch semantics follow
the real daemon so that Debian's C clients, pyxs and our own client behave
here exactly as on a Xen host.

One thread, one selector: the store needs no locks and a slow client can
never block another (replies and events are buffered per connection).
"""
from __future__ import annotations

import argparse
import dataclasses
import enum
import os
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import threading

HEADER = struct.Struct("=IIII")          # type, req_id, tx_id, len: host byte order
PAYLOAD_MAX = 4096
ABS_PATH_MAX = 3072
REL_PATH_MAX = 2048
MAX_TRANSACTIONS = 16                    # per connection, like xenstored's default quota
OUTBUF_MAX = 4 << 20                     # a client that never reads is dropped, not buffered forever
SPECIAL_WATCHES = ("@introduceDomain", "@releaseDomain")


class Op(enum.IntEnum):
    CONTROL = 0
    DIRECTORY = 1
    READ = 2
    GET_PERMS = 3
    WATCH = 4
    UNWATCH = 5
    TRANSACTION_START = 6
    TRANSACTION_END = 7
    INTRODUCE = 8
    RELEASE = 9
    GET_DOMAIN_PATH = 10
    WRITE = 11
    MKDIR = 12
    RM = 13
    SET_PERMS = 14
    WATCH_EVENT = 15
    ERROR = 16
    IS_DOMAIN_INTRODUCED = 17
    RESUME = 18
    SET_TARGET = 19
    RESET_WATCHES = 21


PRIVILEGED_OPS = {Op.CONTROL, Op.INTRODUCE, Op.RELEASE, Op.IS_DOMAIN_INTRODUCED, Op.RESUME, Op.SET_TARGET}
NO_TX_OPS = {Op.WATCH, Op.UNWATCH}       # their tx_id is ignored, as in xenstored

READ, WRITE, OWNER = 1, 2, 4
PERM_BITS = {"n": 0, "r": READ, "w": WRITE, "b": READ | WRITE}
_PATH_CHARS = re.compile(r"[A-Za-z0-9\-/_@]+")
_PERM = re.compile(r"([nrwb])(\d{1,5})")


# --- wire framing (kept pure so it can be fuzzed) ---------------------------
class Oversized(Exception):
    """A header announced a payload above XENSTORE_PAYLOAD_MAX."""


@dataclasses.dataclass(frozen=True)
class Message:
    type: int
    req_id: int
    tx_id: int
    payload: bytes


def parse_messages(buf: bytes | bytearray) -> tuple[list[Message], int]:
    """Split the complete messages off the front of ``buf``.

    Returns the messages and the number of bytes they used; an incomplete
    tail is left for the next read.  Raises Oversized as soon as a header
    announces more than PAYLOAD_MAX bytes (xenstored drops such a client).
    """
    out: list[Message] = []
    off = 0
    while len(buf) - off >= HEADER.size:
        typ, req_id, tx_id, length = HEADER.unpack_from(buf, off)
        if length > PAYLOAD_MAX:
            raise Oversized(length)
        end = off + HEADER.size + length
        if end > len(buf):
            break
        out.append(Message(typ, req_id, tx_id, bytes(buf[off + HEADER.size:end])))
        off = end
    return out, off


def encode(typ: int, req_id: int, tx_id: int, payload: bytes) -> bytes:
    return HEADER.pack(typ, req_id, tx_id, len(payload)) + payload


def nul_strings(payload: bytes) -> list[bytes]:
    """The NUL-terminated strings of a payload; an unterminated tail is ignored, as in xenstored."""
    parts = payload.split(b"\0")
    return parts[:-1]


# --- store ------------------------------------------------------------------
class XsError(Exception):
    """Reply with ERROR and this errno name."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.name = name


@dataclasses.dataclass(frozen=True)
class Node:
    # Immutable: every change stores a new object, so "changed since the
    # transaction started" is an identity test.
    value: bytes = b""
    perms: tuple[tuple[str, int], ...] = (("n", 0),)
    children: tuple[str, ...] = ()


def parent_of(path: str) -> str:
    return path.rsplit("/", 1)[0] or "/"


def child_path(parent: str, name: str) -> str:
    return parent + name if parent == "/" else f"{parent}/{name}"


def is_under(path: str, top: str) -> bool:
    return path == top or top == "/" or path.startswith(top + "/")


def perms_text(perms: tuple[tuple[str, int], ...]) -> bytes:
    return b"".join(f"{letter}{domid}".encode() + b"\0" for letter, domid in perms)


class Txn:
    """A view of the store: the nodes it touched sit in an overlay until commit.

    Non-transactional requests use a Txn over the live store that is committed
    at once, so a failing request never leaves half its changes behind.
    """

    def __init__(self, base: dict[str, Node]) -> None:
        self.base = base
        self.overlay: dict[str, Node | None] = {}
        self.accessed: set[str] = set()
        # (path, exact, nodes): a watcher hears of it if it may read any of the nodes
        self.events: list[tuple[str, bool, tuple[Node, ...]]] = []

    def get(self, path: str) -> Node | None:
        self.accessed.add(path)
        if path in self.overlay:
            return self.overlay[path]
        return self.base.get(path)

    def put(self, path: str, node: Node | None) -> None:
        self.accessed.add(path)
        self.overlay[path] = node


@dataclasses.dataclass(eq=False)
class Watch:
    conn: Conn
    path: str            # canonical (absolute or @special)
    token: bytes
    prefix: str | None   # set when registered relative: events are reported relative too

    def event_path(self, path: str) -> str:
        if self.prefix and path.startswith(self.prefix + "/"):
            return path[len(self.prefix) + 1:]
        return path


class Conn:
    def __init__(self, sock: socket.socket, domid: int, privileged: bool) -> None:
        self.sock = sock
        self.domid = domid
        self.privileged = privileged
        self.inbuf = bytearray()
        self.outbuf = bytearray()
        self.txns: dict[int, Txn] = {}
        self.closed = False


@dataclasses.dataclass
class Domain:
    domid: int
    mfn: int
    port: int
    listener: socket.socket
    sock_path: str


def initial_store() -> dict[str, Node]:
    """The tree xenstored and xen-init-dom0 leave behind at boot."""
    dom0 = {"domid": b"0", "name": b"Domain-0"}
    nodes = {
        "/": Node(children=("tool", "local")),
        "/tool": Node(children=("xenstored",)),
        "/tool/xenstored": Node(),
        "/local": Node(children=("domain",)),
        "/local/domain": Node(children=("0",)),
        "/local/domain/0": Node(children=tuple(dom0)),
    }
    for key, value in dom0.items():
        nodes[f"/local/domain/0/{key}"] = Node(value=value)
    return nodes


class Xenstored:
    def __init__(self, socket_path: str) -> None:
        self.socket_path = socket_path
        self.nodes = initial_store()
        self.watches: list[Watch] = []
        self.domains: dict[int, Domain] = {}
        self.targets: dict[int, int] = {}
        self.next_tx = 1
        self.sel = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._stopping = False
        self._listener: socket.socket | None = None

    # --- lifecycle ----------------------------------------------------------
    def _listen(self, path: str) -> socket.socket:
        if os.path.lexists(path) and stat.S_ISSOCK(os.lstat(path).st_mode):
            os.unlink(path)           # a stale socket of a killed daemon
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(64)
        sock.setblocking(False)
        return sock

    def serve_forever(self) -> None:
        self._listener = self._listen(self.socket_path)
        self.sel.register(self._listener, selectors.EVENT_READ, ("listen", 0))
        self.sel.register(self._wake_r, selectors.EVENT_READ, ("wake", None))
        log(f"listening on {self.socket_path}")
        try:
            while not self._stopping:
                for key, mask in self.sel.select():
                    kind, data = key.data
                    if kind == "listen":
                        self._accept(key.fileobj, data)
                    elif kind == "wake":
                        self._wake_r.recv(64)
                    elif not data.closed:
                        if mask & selectors.EVENT_READ:
                            self._on_readable(data)
                        if mask & selectors.EVENT_WRITE and not data.closed:
                            self._flush(data)
        finally:
            self._shutdown()

    def stop(self) -> None:
        """Ask the loop to end; safe from signal handlers and other threads."""
        self._stopping = True
        try:
            self._wake_w.send(b"x")
        except OSError:
            pass

    def _shutdown(self) -> None:
        for key in list(self.sel.get_map().values()):
            if isinstance(key.data[1], Conn):
                self._close(key.data[1])
        for dom in list(self.domains.values()):
            self._drop_domain_listener(dom)
        if self._listener is not None:
            self.sel.unregister(self._listener)
            self._listener.close()
            _unlink_quietly(self.socket_path)
        self.sel.close()
        self._wake_r.close()
        self._wake_w.close()
        log("stopped")

    # --- connections --------------------------------------------------------
    def _accept(self, listener: socket.socket, domid: int) -> None:
        if listener.fileno() < 0:  # closed by a RELEASE handled earlier in this same select() batch
            return
        try:
            sock, _ = listener.accept()
        except BlockingIOError:
            return
        sock.setblocking(False)
        conn = Conn(sock, domid, privileged=(domid == 0))
        self.sel.register(sock, selectors.EVENT_READ, ("conn", conn))

    def _on_readable(self, conn: Conn) -> None:
        try:
            data = conn.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)
            return
        conn.inbuf += data
        try:
            messages, used = parse_messages(conn.inbuf)
        except Oversized as exc:
            log(f"dom{conn.domid} client sent a {exc.args[0]}-byte payload (max {PAYLOAD_MAX}); dropping it")
            self._close(conn)
            return
        del conn.inbuf[:used]
        for msg in messages:
            self._handle(conn, msg)
            if conn.closed:
                return
        self._flush(conn)

    def _send(self, conn: Conn, data: bytes) -> None:
        if conn.closed:
            return
        conn.outbuf += data
        if len(conn.outbuf) > OUTBUF_MAX:
            log(f"dom{conn.domid} client does not read its replies; dropping it")
            self._close(conn)

    def _flush(self, conn: Conn) -> None:
        if conn.closed:
            return
        if conn.outbuf:
            try:
                sent = conn.sock.send(conn.outbuf)
                del conn.outbuf[:sent]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                self._close(conn)
                return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if conn.outbuf else 0)
        self.sel.modify(conn.sock, events, ("conn", conn))

    def _flush_all(self) -> None:
        for key in list(self.sel.get_map().values()):
            if key.data[0] == "conn" and key.data[1].outbuf:
                self._flush(key.data[1])

    def _close(self, conn: Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        self.watches = [w for w in self.watches if w.conn is not conn]
        conn.txns.clear()
        try:
            self.sel.unregister(conn.sock)
        except (KeyError, ValueError):
            pass
        conn.sock.close()

    # --- dispatch -----------------------------------------------------------
    def _handle(self, conn: Conn, msg: Message) -> None:
        try:
            op = Op(msg.type)
        except ValueError:
            op = None
        try:
            if op is None or op in (Op.WATCH_EVENT, Op.ERROR):
                raise XsError("ENOSYS")
            if op in PRIVILEGED_OPS and not conn.privileged:
                raise XsError("EACCES")
            txn = None
            if msg.tx_id and op not in NO_TX_OPS and op != Op.TRANSACTION_START:
                txn = conn.txns.get(msg.tx_id)
                if txn is None:
                    raise XsError("ENOENT")
            handler = getattr(self, "op_" + op.name.lower())
            reply = handler(conn, msg, txn)
        except XsError as exc:
            self._send(conn, encode(Op.ERROR, msg.req_id, msg.tx_id, exc.name.encode() + b"\0"))
            return
        if len(reply) > PAYLOAD_MAX:
            self._send(conn, encode(Op.ERROR, msg.req_id, msg.tx_id, b"E2BIG\0"))
            return
        self._send(conn, encode(msg.type, msg.req_id, msg.tx_id, reply))
        if op == Op.WATCH:
            self._initial_event(conn, msg)
        self._flush_all()

    def _data_op(self, conn: Conn, txn: Txn | None, fn) -> bytes:
        """Run ``fn(view)`` in the request's transaction, or in one committed at once."""
        if txn is not None:
            return fn(txn)
        view = Txn(self.nodes)
        reply = fn(view)
        self._apply(view)
        return reply

    def _apply(self, view: Txn) -> None:
        for path, node in view.overlay.items():
            if node is None:
                self.nodes.pop(path, None)
            else:
                self.nodes[path] = node
        for path, exact, nodes in view.events:
            self._fire(path, exact, nodes)

    # --- paths and permissions ----------------------------------------------
    def canonical(self, conn: Conn, raw: bytes, allow_special: bool = False) -> str:
        try:
            path = raw.decode("ascii")
        except UnicodeDecodeError:
            raise XsError("EINVAL") from None
        if not path or not _PATH_CHARS.fullmatch(path) or "//" in path:
            raise XsError("EINVAL")
        if path.startswith("@"):
            if not allow_special:
                raise XsError("EINVAL")
            return path
        if path.startswith("/"):
            if len(path) > ABS_PATH_MAX:
                raise XsError("EINVAL")
        else:
            if len(path) > REL_PATH_MAX:
                raise XsError("EINVAL")
            path = f"/local/domain/{conn.domid}/{path}"
        if path.endswith("/") and path != "/":
            raise XsError("EINVAL")
        return path

    def perm_for(self, conn: Conn, perms: tuple[tuple[str, int], ...]) -> int:
        target = self.targets.get(conn.domid)
        ids = {conn.domid} if target is None else {conn.domid, target}
        if conn.privileged or perms[0][1] in ids:
            return READ | WRITE | OWNER
        for letter, domid in perms[1:]:
            if domid in ids:
                return PERM_BITS[letter]
        return PERM_BITS[perms[0][0]]

    def get_node(self, conn: Conn, view: Txn, path: str, need: int) -> Node:
        """The node if ``conn`` may access it; ENOENT only to those allowed to know."""
        node = view.get(path)
        if node is not None:
            if self.perm_for(conn, node.perms) & need != need:
                raise XsError("EACCES")
            return node
        ancestor = path
        while ancestor != "/":
            ancestor = parent_of(ancestor)
            found = view.get(ancestor)
            if found is not None:
                raise XsError("ENOENT" if self.perm_for(conn, found.perms) & need else "EACCES")
        raise XsError("ENOENT")

    def _create(self, conn: Conn, view: Txn, path: str, value: bytes) -> None:
        missing = [path]
        parent = parent_of(path)
        while view.get(parent) is None:
            missing.append(parent)
            parent = parent_of(parent)
        parent_node = view.get(parent)
        for new in reversed(missing):
            perms = parent_node.perms
            if not conn.privileged:      # unprivileged domains own what they create
                perms = ((perms[0][0], conn.domid),) + perms[1:]
            name = new.rsplit("/", 1)[1]
            view.put(parent, dataclasses.replace(parent_node, children=parent_node.children + (name,)))
            parent_node = Node(value=value if new == path else b"", perms=perms)
            view.put(new, parent_node)
            parent = new

    # --- node operations ----------------------------------------------------
    def _one_path(self, conn: Conn, msg: Message) -> str:
        # Exactly one NUL, at the end (xenstored's onearg).
        if msg.payload.find(b"\0") != len(msg.payload) - 1:
            raise XsError("EINVAL")
        return self.canonical(conn, msg.payload[:-1])

    def op_read(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        path = self._one_path(conn, msg)
        return self._data_op(conn, txn, lambda v: self.get_node(conn, v, path, READ).value)

    def op_directory(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        path = self._one_path(conn, msg)

        def listing(view: Txn) -> bytes:
            return b"".join(c.encode() + b"\0" for c in self.get_node(conn, view, path, READ).children)
        return self._data_op(conn, txn, listing)

    def op_get_perms(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        path = self._one_path(conn, msg)
        return self._data_op(conn, txn, lambda v: perms_text(self.get_node(conn, v, path, READ).perms))

    def op_write(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        if b"\0" not in msg.payload:
            raise XsError("EINVAL")
        raw, value = msg.payload.split(b"\0", 1)
        path = self.canonical(conn, raw)

        def write(view: Txn) -> bytes:
            try:
                node = self.get_node(conn, view, path, WRITE)
            except XsError as exc:
                if exc.name != "ENOENT":
                    raise
                self._create(conn, view, path, value)
            else:
                view.put(path, dataclasses.replace(node, value=value))
            view.events.append((path, False, (view.get(path),)))
            return b"OK\0"
        return self._data_op(conn, txn, write)

    def op_mkdir(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        path = self._one_path(conn, msg)

        def mkdir(view: Txn) -> bytes:
            try:
                self.get_node(conn, view, path, WRITE)
            except XsError as exc:
                if exc.name != "ENOENT":
                    raise
                self._create(conn, view, path, b"")
                view.events.append((path, False, (view.get(path),)))
            return b"OK\0"
        return self._data_op(conn, txn, mkdir)

    def op_rm(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        path = self._one_path(conn, msg)

        def rm(view: Txn) -> bytes:
            try:
                node = self.get_node(conn, view, path, WRITE)
            except XsError as exc:
                # Removing what is already gone is fine while its parent exists.
                if exc.name == "ENOENT" and path != "/" and view.get(parent_of(path)) is not None:
                    return b"OK\0"
                raise
            if path == "/":
                raise XsError("EINVAL")
            self._remove_tree(view, path, node)
            parent = parent_of(path)
            pnode = view.get(parent)
            name = path.rsplit("/", 1)[1]
            view.put(parent, dataclasses.replace(pnode, children=tuple(c for c in pnode.children if c != name)))
            return b"OK\0"
        return self._data_op(conn, txn, rm)

    def _remove_tree(self, view: Txn, top: str, top_node: Node) -> None:
        # Depth first, children before parents, like xenstored's tree walk:
        # descendants fire only their exact watchers, the top fires its ancestors' too.
        stack = [(top, top_node, False)]
        while stack:
            path, node, expanded = stack.pop()
            if not expanded:
                stack.append((path, node, True))
                for name in node.children:
                    sub = child_path(path, name)
                    sub_node = view.get(sub)
                    if sub_node is not None:
                        stack.append((sub, sub_node, False))
                continue
            view.put(path, None)
            view.events.append((path, path != top, (node,)))

    def op_set_perms(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) < 2:
            raise XsError("EINVAL")
        perms = []
        for raw in args[1:]:
            m = _PERM.fullmatch(raw.decode("ascii", "replace"))
            if not m or int(m.group(2)) > 0xFFFF:
                raise XsError("EINVAL")
            perms.append((m.group(1), int(m.group(2))))
        new_perms = tuple(perms)
        if args[0].startswith(b"@"):
            # Special nodes exist only for watches here; accept what dom0 sets.
            self.canonical(conn, args[0], allow_special=True)
            if not conn.privileged:
                raise XsError("EACCES")
            return b"OK\0"
        path = self.canonical(conn, args[0])

        def set_perms(view: Txn) -> bytes:
            node = self.get_node(conn, view, path, WRITE | OWNER)
            if not conn.privileged and new_perms[0][1] != node.perms[0][1]:
                raise XsError("EPERM")          # only dom0 hands a node to another owner
            changed = dataclasses.replace(node, perms=new_perms)
            view.put(path, changed)
            # Watchers that could read it before or can read it now both hear of it.
            view.events.append((path, False, (node, changed)))
            return b"OK\0"
        return self._data_op(conn, txn, set_perms)

    # --- transactions -------------------------------------------------------
    def op_transaction_start(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        if msg.tx_id:
            raise XsError("EBUSY")
        if len(conn.txns) >= MAX_TRANSACTIONS:
            raise XsError("ENOSPC")
        tx_id = self.next_tx
        self.next_tx = self.next_tx % 0xFFFFFFFF + 1
        conn.txns[tx_id] = Txn(dict(self.nodes))
        return f"{tx_id}".encode() + b"\0"

    def op_transaction_end(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        if txn is None:
            raise XsError("ENOENT")
        if msg.payload not in (b"T\0", b"F\0"):
            raise XsError("EINVAL")
        del conn.txns[msg.tx_id]
        if msg.payload == b"F\0":
            return b"OK\0"
        # Optimistic concurrency: anything the transaction looked at or changed
        # must still be the object it saw, or the caller has to redo it all.
        if any(self.nodes.get(p) is not txn.base.get(p) for p in txn.accessed):
            raise XsError("EAGAIN")
        self._apply(txn)
        return b"OK\0"

    # --- watches ------------------------------------------------------------
    def op_watch(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) not in (2, 3):
            raise XsError("EINVAL")
        raw, token = args[0], args[1]
        path = self.canonical(conn, raw, allow_special=True)
        prefix = None if raw.startswith((b"/", b"@")) else f"/local/domain/{conn.domid}"
        if any(w.conn is conn and w.path == path and w.token == token for w in self.watches):
            raise XsError("EEXIST")
        self.watches.append(Watch(conn, path, token, prefix))
        return b"OK\0"

    def _initial_event(self, conn: Conn, msg: Message) -> None:
        # A new watch fires once at once, so clients need no separate first read.
        raw, token = nul_strings(msg.payload)[:2]
        self._send(conn, encode(Op.WATCH_EVENT, 0, 0, raw + b"\0" + token + b"\0"))

    def op_unwatch(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) != 2:
            raise XsError("EINVAL")
        path = self.canonical(conn, args[0], allow_special=True)
        for w in self.watches:
            if w.conn is conn and w.path == path and w.token == args[1]:
                self.watches.remove(w)
                return b"OK\0"
        raise XsError("ENOENT")

    def op_reset_watches(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        self.watches = [w for w in self.watches if w.conn is not conn]
        conn.txns.clear()
        return b"OK\0"

    def _fire(self, path: str, exact: bool, nodes: tuple[Node, ...]) -> None:
        for w in list(self.watches):
            hit = w.path == path if exact or path.startswith("@") else is_under(path, w.path)
            if not hit or w.conn.closed:
                continue
            if nodes and not any(self.perm_for(w.conn, n.perms) & READ for n in nodes):
                continue
            payload = w.event_path(path).encode() + b"\0" + w.token + b"\0"
            self._send(w.conn, encode(Op.WATCH_EVENT, 0, 0, payload))

    # --- domains ------------------------------------------------------------
    @staticmethod
    def _domid(raw: bytes) -> int:
        if not raw.isdigit() or int(raw) > 0x7FEF:
            raise XsError("EINVAL")
        return int(raw)

    def op_introduce(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) < 3:
            raise XsError("EINVAL")
        domid = self._domid(args[0])
        if domid == 0 or not args[1].isdigit() or not args[2].isdigit():
            raise XsError("EINVAL")
        if domid in self.domains:
            return b"OK\0"
        sock_path = f"{self.socket_path}.d{domid}"
        try:
            listener = self._listen(sock_path)
        except OSError as exc:
            log(f"cannot listen on {sock_path}: {exc}")
            raise XsError("EIO") from None
        self.domains[domid] = Domain(domid, int(args[1]), int(args[2]), listener, sock_path)
        self.sel.register(listener, selectors.EVENT_READ, ("listen", domid))
        log(f"introduced domain {domid}")
        self._fire("@introduceDomain", True, ())
        return b"OK\0"

    def op_release(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) != 1:
            raise XsError("EINVAL")
        domid = self._domid(args[0])
        dom = self.domains.pop(domid, None)
        if dom is None:
            raise XsError("ENOENT")
        self._drop_domain_listener(dom)
        for key in list(self.sel.get_map().values()):
            if key.data[0] == "conn" and key.data[1].domid == domid and not key.data[1].privileged:
                self._close(key.data[1])
        self.targets.pop(domid, None)
        log(f"released domain {domid}")
        self._fire("@releaseDomain", True, ())
        return b"OK\0"

    def _drop_domain_listener(self, dom: Domain) -> None:
        try:
            self.sel.unregister(dom.listener)
        except (KeyError, ValueError):
            pass
        dom.listener.close()
        _unlink_quietly(dom.sock_path)

    def op_is_domain_introduced(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) != 1:
            raise XsError("EINVAL")
        domid = self._domid(args[0])
        return b"T\0" if domid == 0 or domid in self.domains else b"F\0"

    def op_get_domain_path(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) != 1:
            raise XsError("EINVAL")
        return f"/local/domain/{self._domid(args[0])}".encode() + b"\0"

    def op_resume(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) != 1:
            raise XsError("EINVAL")
        if self._domid(args[0]) not in self.domains:
            raise XsError("ENOENT")
        return b"OK\0"

    def op_set_target(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        args = nul_strings(msg.payload)
        if len(args) != 2:
            raise XsError("EINVAL")
        domid, target = self._domid(args[0]), self._domid(args[1])
        if domid not in self.domains:
            raise XsError("ENOENT")
        self.targets[domid] = target
        return b"OK\0"

    def op_control(self, conn: Conn, msg: Message, txn: Txn | None) -> bytes:
        return b"OK\0"


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def log(text: str) -> None:
    print(f"xenstored-sim: {text}", file=sys.stderr, flush=True)


def run(socket_path: str) -> None:
    """Serve on ``socket_path`` in the foreground until SIGTERM or SIGINT."""
    daemon = Xenstored(socket_path)
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: daemon.stop())
    daemon.serve_forever()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xen_vtpm_sim.xenstored",
                                     description="simulated xenstored (xs_wire over a Unix socket)")
    parser.add_argument("--socket", required=True, help="Unix socket path; domains get PATH.d<domid>")
    args = parser.parse_args(argv)
    run(args.socket)
    return 0


if __name__ == "__main__":
    sys.exit(main())
