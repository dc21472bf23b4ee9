"""Fuzz target: the simulated xenstored's wire parser and request dispatch, in process.

The input is a byte stream as a client would send it (accepted = at least one whole message).
``parse_messages`` must split it or
raise Oversized; the messages are then handled by a fresh daemon on two connections (even
req_id: dom0, odd: unprivileged domain 3) and every request must get exactly one well-formed
reply, in order, while the node tree stays consistent.  The daemon over a real socket is
fuzzed by live_xenstored.py.
"""
from __future__ import annotations

import selectors
import socket
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm_sim import xenstored as xsd
    from xen_vtpm_sim.xenstored import HEADER, PAYLOAD_MAX, Op, Oversized, encode, parse_messages

xsd.log = lambda text: None   # the daemon's stderr log would dominate the run time
DOMU = 3
_SCRATCH: Path | None = None


def _sock_path() -> str:
    # INTRODUCE binds PATH.d<domid>: keep PATH short and private to this process.
    global _SCRATCH
    if _SCRATCH is None:
        _SCRATCH = harness.scratch_dir()
    return str(_SCRATCH / "xs.sock")


def _req(op: Op, req_id: int, payload: bytes, tx: int = 0) -> bytes:
    return encode(op, req_id, tx, payload)


def seeds() -> list[bytes]:
    """Request sequences as clients send them (dom0 on even ids, domain 3 on odd ids)."""
    z = b"\0"
    return [
        _req(Op.WRITE, 2, b"/vm/a/name" + z + b"guest1") + _req(Op.READ, 4, b"/vm/a/name" + z)
        + _req(Op.DIRECTORY, 6, b"/vm/a" + z) + _req(Op.GET_PERMS, 8, b"/vm/a/name" + z)
        + _req(Op.SET_PERMS, 10, b"/vm/a" + z + b"n0" + z + b"r3" + z) + _req(Op.READ, 11, b"/vm/a/name" + z)
        + _req(Op.RM, 12, b"/vm/a" + z),
        _req(Op.TRANSACTION_START, 2, z) + _req(Op.WRITE, 4, b"/t/x" + z + b"1", tx=1)
        + _req(Op.MKDIR, 6, b"/t/y" + z, tx=1) + _req(Op.WRITE, 8, b"/t/x" + z + b"2")
        + _req(Op.TRANSACTION_END, 10, b"T" + z, tx=1),
        _req(Op.WATCH, 2, b"/local" + z + b"tok" + z) + _req(Op.WATCH, 4, b"@releaseDomain" + z + b"r" + z)
        + _req(Op.WRITE, 6, b"/local/domain/3/x" + z + b"v") + _req(Op.UNWATCH, 8, b"/local" + z + b"tok" + z)
        + _req(Op.RESET_WATCHES, 10, b""),
        _req(Op.INTRODUCE, 2, b"3" + z + b"4096" + z + b"5" + z) + _req(Op.GET_DOMAIN_PATH, 4, b"3" + z)
        + _req(Op.IS_DOMAIN_INTRODUCED, 6, b"3" + z) + _req(Op.SET_TARGET, 8, b"3" + z + b"0" + z)
        + _req(Op.RESUME, 10, b"3" + z) + _req(Op.RELEASE, 12, b"3" + z),
        _req(Op.MKDIR, 2, b"/local/domain/3" + z) + _req(Op.SET_PERMS, 4, b"/local/domain/3" + z + b"n3" + z)
        + _req(Op.WRITE, 1, b"data/x" + z + b"hello") + _req(Op.READ, 3, b"data/x" + z)
        + _req(Op.WATCH, 5, b"data" + z + b"w" + z) + _req(Op.WRITE, 7, b"/tool/x" + z + b"no")
        + _req(Op.INTRODUCE, 9, b"4" + z + b"1" + z + b"1" + z),
        _req(Op.READ, 2, b"/local/domain/0/name" + z) + HEADER.pack(Op.WRITE, 4, 0, 64) + b"/partial",
        HEADER.pack(Op.WRITE, 2, 0, PAYLOAD_MAX + 1),
    ]


def _drain(sock: socket.socket) -> bytes:
    parts = []
    while True:
        try:
            chunk = sock.recv(1 << 16)
        except BlockingIOError:
            break
        if not chunk:
            break
        parts.append(chunk)
    return b"".join(parts)


def check_tree(nodes: dict) -> None:
    assert "/" in nodes, "the root node is gone"
    for path, node in nodes.items():
        assert node.perms, f"{path} has no permissions"
        assert len(set(node.children)) == len(node.children), f"{path} lists a child twice: {node.children}"
        for child in node.children:
            assert xsd.child_path(path, child) in nodes, f"{path} lists missing child {child!r}"
        if path != "/":
            parent = nodes.get(xsd.parent_of(path))
            assert parent is not None, f"{path} has no parent node"
            assert path.rsplit("/", 1)[1] in parent.children, f"{path} is not listed by its parent"


def _check_replies(raw: bytes, sent: list[tuple[int, int, int]], closed: bool) -> None:
    replies, used = parse_messages(raw)
    assert used == len(raw), f"{len(raw) - used} trailing bytes after the replies"
    answers = [m for m in replies if m.type != Op.WATCH_EVENT]
    for m in replies:
        if m.type == Op.WATCH_EVENT:
            assert (m.req_id, m.tx_id) == (0, 0) and m.payload.count(b"\0") == 2 and m.payload.endswith(b"\0")
    if closed:
        assert len(answers) <= len(sent)
        sent = sent[:len(answers)]
    assert [(m.req_id, m.tx_id) for m in answers] == [(r, t) for _, r, t in sent], "replies out of step"
    for m, (typ, _, _) in zip(answers, sent):
        assert m.type in (typ, Op.ERROR), f"request type {typ} answered with type {m.type}"
        if m.type == Op.DIRECTORY:
            assert m.payload == b"" or m.payload.endswith(b"\0"), f"listing not NUL-terminated: {m.payload[:64]!r}"
        elif m.type != Op.READ:   # a value is raw bytes; every other reply is NUL-terminated strings
            assert m.payload.endswith(b"\0"), f"reply of type {m.type} not NUL-terminated: {m.payload[:64]!r}"
        if m.type == Op.ERROR:
            assert m.payload[:-1].isalnum() and m.payload.startswith(b"E"), f"bad error reply {m.payload!r}"


def check(data: bytes) -> bool:
    try:
        messages, used = parse_messages(data)
    except Oversized as exc:
        assert exc.args[0] > PAYLOAD_MAX
        return False
    assert b"".join(encode(m.type, m.req_id, m.tx_id, m.payload) for m in messages) == data[:used]
    tail = data[used:]
    assert len(tail) < HEADER.size or HEADER.size + HEADER.unpack_from(tail)[3] > len(tail)
    if not messages:
        return False
    daemon = xsd.Xenstored(_sock_path())
    peers, conns = [], []
    try:
        for domid in (0, DOMU):
            ours, theirs = socket.socketpair()
            ours.setblocking(False)
            theirs.setblocking(False)
            peers.append(theirs)
            conn = xsd.Conn(ours, domid, privileged=domid == 0)
            daemon.sel.register(ours, selectors.EVENT_READ, ("conn", conn))
            conns.append(conn)
        sent: list[list[tuple[int, int, int]]] = [[], []]
        received = [bytearray(), bytearray()]
        for msg in messages:
            side = msg.req_id & 1
            if conns[side].closed:
                continue
            sent[side].append((msg.type, msg.req_id, msg.tx_id))
            daemon._handle(conns[side], msg)
            received[side] += _drain(peers[side])
        for side in (0, 1):
            received[side] += _drain(peers[side]) + conns[side].outbuf
            _check_replies(bytes(received[side]), sent[side], conns[side].closed)
        check_tree(daemon.nodes)
    finally:
        for peer in peers:
            peer.close()
        daemon._shutdown()
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
