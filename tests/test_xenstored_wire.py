"""The simulated xenstored speaks xs_wire: Debian's C clients, pyxs and raw packets agree with it."""
from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import threading

import pytest
from pyxs import Client
from xs_fixture import start_xenstored, xenstored  # noqa: F401  (fixture)

from xen_vtpm_sim.xenstored import HEADER, Message, Op, Oversized, encode, parse_messages

WAIT = 10.0   # upper bound for anything we wait on; never asserted as a duration


# --- helpers ----------------------------------------------------------------
class Raw:
    """A bare xs_wire connection: send packets, read replies and events."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)
        self.req = 0
        self.events: list[bytes] = []

    def _read_exact(self, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = self.sock.recv(n - len(data))
            if not chunk:
                raise ConnectionResetError("closed by xenstored")
            data += chunk
        return data

    def read_packet(self) -> tuple[int, int, int, bytes]:
        typ, req, tx, length = HEADER.unpack(self._read_exact(HEADER.size))
        return typ, req, tx, self._read_exact(length)

    def call(self, op: int, payload: bytes, tx: int = 0) -> tuple[int, bytes]:
        self.req += 1
        self.sock.sendall(encode(op, self.req, tx, payload))
        while True:
            typ, req, rtx, body = self.read_packet()
            if typ == Op.WATCH_EVENT:
                self.events.append(body)
                continue
            assert (req, rtx) == (self.req, tx)
            return typ, body

    def ok(self, op: int, payload: bytes, tx: int = 0) -> bytes:
        typ, body = self.call(op, payload, tx)
        assert typ == op, body
        return body

    def err(self, op: int, payload: bytes, tx: int = 0) -> str:
        typ, body = self.call(op, payload, tx)
        assert typ == Op.ERROR, body
        return body.rstrip(b"\0").decode()

    def event(self) -> bytes:
        if self.events:
            return self.events.pop(0)
        typ, _, _, body = self.read_packet()
        assert typ == Op.WATCH_EVENT
        return body

    def close(self) -> None:
        self.sock.close()


def xs(sock: str, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Run a Debian xenstore-utils client against the simulated daemon."""
    env = dict(os.environ, XENSTORED_PATH=sock)
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=WAIT, check=check)


class CWatch:
    """xenstore-watch runs until killed: collect its lines in a thread."""

    def __init__(self, sock: str, *args: str) -> None:
        env = dict(os.environ, XENSTORED_PATH=sock)
        self.proc = subprocess.Popen(["xenstore-watch", *args], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.DEVNULL, text=True)
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def next(self) -> str:
        return self.lines.get(timeout=WAIT)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait()


# --- the parser -------------------------------------------------------------
def test_parser_splits_messages_and_keeps_partial_tail() -> None:
    a, b = encode(Op.READ, 1, 0, b"/a\0"), encode(Op.WRITE, 2, 7, b"/b\0v")
    msgs, used = parse_messages(a + b + b[:5])
    assert msgs == [Message(Op.READ, 1, 0, b"/a\0"), Message(Op.WRITE, 2, 7, b"/b\0v")]
    assert used == len(a) + len(b)
    assert parse_messages(a[:-1]) == ([], 0)
    assert parse_messages(encode(Op.READ, 1, 0, b"x" * 4096))[1] == HEADER.size + 4096
    with pytest.raises(Oversized):
        parse_messages(HEADER.pack(Op.READ, 1, 0, 4097))


# --- Debian's C clients -----------------------------------------------------
def test_c_clients_write_read_ls_rm_chmod(xenstored: str) -> None:
    xs(xenstored, "xenstore-write", "/vm/a/b", "hello", "/vm/a/empty", "")
    assert xs(xenstored, "xenstore-read", "/vm/a/b").stdout == "hello\n"
    assert xs(xenstored, "xenstore-read", "/vm/a/empty").stdout == "\n"
    assert xs(xenstored, "xenstore-list", "/vm/a").stdout.split() == ["b", "empty"]
    assert 'b = "hello"' in xs(xenstored, "xenstore-ls", "/vm/a").stdout
    xs(xenstored, "xenstore-chmod", "/vm/a/b", "n5", "r6")
    assert "(n5,r6)" in xs(xenstored, "xenstore-ls", "-p", "/vm/a").stdout
    xs(xenstored, "xenstore-rm", "/vm/a/b")
    assert xs(xenstored, "xenstore-list", "/vm/a").stdout.split() == ["empty"]
    missing = xs(xenstored, "xenstore-read", "/vm/a/b", check=False)
    assert missing.returncode != 0
    assert xs(xenstored, "xenstore-write", "/vm//bad", "x", check=False).returncode != 0
    assert xs(xenstored, "xenstore-exists", "/vm/a").returncode == 0
    assert xs(xenstored, "xenstore-exists", "/vm/zz", check=False).returncode != 0


def test_c_watch_fires_on_registration_and_change(xenstored: str) -> None:
    watch = CWatch(xenstored, "/w")
    try:
        assert watch.next() == "/w"                  # fires once when registered
        xs(xenstored, "xenstore-write", "/w/x/y", "1")
        assert watch.next() == "/w/x/y"
        xs(xenstored, "xenstore-write", "/other", "1")  # not below /w: must not show up
        xs(xenstored, "xenstore-rm", "/w")
        assert watch.next() == "/w"                  # the removed top; /other never showed up
    finally:
        watch.stop()


def test_c_watch_special_domain_events(xenstored: str) -> None:
    intro, release = CWatch(xenstored, "@introduceDomain"), CWatch(xenstored, "@releaseDomain")
    try:
        assert intro.next() == "@introduceDomain"
        assert release.next() == "@releaseDomain"
        raw = Raw(xenstored)
        raw.ok(Op.INTRODUCE, b"7\x00123\x004\x00")
        assert intro.next() == "@introduceDomain"
        assert os.path.exists(xenstored + ".d7")
        raw.ok(Op.RELEASE, b"7\0")
        assert release.next() == "@releaseDomain"
        assert not os.path.exists(xenstored + ".d7")
    finally:
        intro.stop()
        release.stop()


def test_concurrent_c_clients_and_threads(xenstored: str) -> None:
    env = dict(os.environ, XENSTORED_PATH=xenstored)
    procs = [subprocess.Popen(["xenstore-write"] + [a for i in range(20) for a in (f"/c/p{p}/k{i}", f"{p}-{i}")],
                              env=env) for p in range(6)]
    errors: list[str] = []

    def writer(t: int) -> None:
        raw = Raw(xenstored)
        for i in range(40):
            if raw.call(Op.WRITE, f"/c/t{t}/k{i}\0{t}.{i}".encode())[0] != Op.WRITE:
                errors.append(f"t{t} k{i}")
        raw.close()

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(6)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert [p.wait(timeout=WAIT) for p in procs] == [0] * 6
    assert errors == []
    raw = Raw(xenstored)
    for p in range(6):
        assert raw.ok(Op.READ, f"/c/p{p}/k19\0".encode()) == f"{p}-19".encode()
        assert len(raw.ok(Op.DIRECTORY, f"/c/t{p}\0".encode()).split(b"\0")[:-1]) == 40


# --- raw protocol semantics ---------------------------------------------------
def test_payload_limit_closes_connection(xenstored: str) -> None:
    raw = Raw(xenstored)
    path = b"/big\0"
    assert raw.ok(Op.WRITE, path + b"v" * (4096 - len(path))) == b"OK\0"   # exactly at the limit
    raw.sock.sendall(HEADER.pack(Op.WRITE, 99, 0, 4097) + b"x" * 4097)
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        raw.read_packet()
    assert Raw(xenstored).ok(Op.READ, path) == b"v" * (4096 - len(path))  # the daemon lives on


@pytest.mark.parametrize("bad", [b"", b"/a//b", b"/a/", b"/a b", b"/\xc3\xa9", b"/" + b"x" * 3072,
                                 b"r" * 2049, b"@introduceDomain"])
def test_invalid_paths_are_einval(xenstored: str, bad: bytes) -> None:
    raw = Raw(xenstored)
    assert raw.err(Op.WRITE, bad + b"\0v") == "EINVAL"
    assert raw.err(Op.READ, bad + b"\0") == "EINVAL"


def test_error_strings_and_argument_checks(xenstored: str) -> None:
    raw = Raw(xenstored)
    assert raw.err(Op.READ, b"/no/such\0") == "ENOENT"
    assert raw.err(Op.READ, b"/a\0/b\0") == "EINVAL"                 # onearg: exactly one string
    assert raw.err(Op.RM, b"/no/such\0") == "ENOENT"                 # parent missing too
    assert raw.ok(Op.RM, b"/local/nothing\0") == b"OK\0"             # parent exists: fine
    assert raw.err(Op.RM, b"/\0") == "EINVAL"
    assert raw.err(Op.SET_PERMS, b"/local\0x5\0") == "EINVAL"
    assert raw.err(Op.TRANSACTION_END, b"T\0", tx=12345) == "ENOENT"
    assert raw.err(0xFFFF, b"") == "ENOSYS"
    raw.ok(Op.WATCH, b"/wa\0t\0")
    assert raw.err(Op.WATCH, b"/wa\0t\0") == "EEXIST"
    assert raw.err(Op.UNWATCH, b"/wb\0t\0") == "ENOENT"
    assert raw.ok(Op.GET_DOMAIN_PATH, b"3\0") == b"/local/domain/3\0"
    assert raw.ok(Op.IS_DOMAIN_INTRODUCED, b"0\0") == b"T\0"
    assert raw.ok(Op.IS_DOMAIN_INTRODUCED, b"9\0") == b"F\0"
    assert raw.err(Op.RELEASE, b"9\0") == "ENOENT"
    raw.ok(Op.MKDIR, b"/many\0")
    for i in range(160):   # ~4.5 KiB of child names: DIRECTORY cannot answer in one payload
        raw.ok(Op.MKDIR, f"/many/child-with-a-long-name-{i:04d}\0".encode())
    assert raw.err(Op.DIRECTORY, b"/many\0") == "E2BIG"


def test_watch_semantics(xenstored: str) -> None:
    watcher, writer = Raw(xenstored), Raw(xenstored)
    watcher.ok(Op.WATCH, b"/t/deep/node\0exact\0")
    assert watcher.event() == b"/t/deep/node\0exact\0"
    watcher.ok(Op.WATCH, b"/t\0tree\0")
    assert watcher.event() == b"/t\0tree\0"
    writer.ok(Op.WRITE, b"/t/deep/node/leaf\0x")
    # Both watches cover the write: the watched path or anything below it.
    assert {watcher.event(), watcher.event()} == {b"/t/deep/node/leaf\0exact\0", b"/t/deep/node/leaf\0tree\0"}
    writer.ok(Op.WRITE, b"/t/deep\0y")        # above /t/deep/node: only the /t watch
    assert watcher.event() == b"/t/deep\0tree\0"
    writer.ok(Op.RM, b"/t/deep\0")
    # The removed /t/deep/node fires its exact watcher; the removed top fires the /t watch.
    assert {watcher.event(), watcher.event()} == {b"/t/deep/node\0exact\0", b"/t/deep\0tree\0"}
    watcher.ok(Op.UNWATCH, b"/t\0tree\0")
    watcher.ok(Op.UNWATCH, b"/t/deep/node\0exact\0")
    writer.ok(Op.WRITE, b"/t/again\0z")
    watcher.ok(Op.WATCH, b"/sentinel\0s\0")   # the next event must be the sentinel's, not /t's
    assert watcher.event() == b"/sentinel\0s\0"


def test_rm_fires_exact_watchers_of_removed_subpaths(xenstored: str) -> None:
    watcher, writer = Raw(xenstored), Raw(xenstored)
    writer.ok(Op.WRITE, b"/r/a/b\0x")
    watcher.ok(Op.WATCH, b"/r/a/b\0leaf\0")
    watcher.ok(Op.WATCH, b"/r/a\0mid\0")
    assert [watcher.event(), watcher.event()] == [b"/r/a/b\0leaf\0", b"/r/a\0mid\0"]
    writer.ok(Op.RM, b"/r\0")
    got = {watcher.event(), watcher.event()}
    assert got == {b"/r/a/b\0leaf\0", b"/r/a\0mid\0"}


def test_transactions_conflict_with_eagain(xenstored: str) -> None:
    a, b = Raw(xenstored), Raw(xenstored)
    a.ok(Op.WRITE, b"/tx/n\x000")
    ta = int(a.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    tb = int(b.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    assert a.ok(Op.READ, b"/tx/n\0", tx=ta) == b"0"
    assert b.ok(Op.READ, b"/tx/n\0", tx=tb) == b"0"
    a.ok(Op.WRITE, b"/tx/n\x001", tx=ta)
    b.ok(Op.WRITE, b"/tx/n\x001", tx=tb)
    assert a.ok(Op.READ, b"/tx/n\0") == b"0"              # not visible before commit
    assert a.ok(Op.TRANSACTION_END, b"T\0", tx=ta) == b"OK\0"
    assert b.err(Op.TRANSACTION_END, b"T\0", tx=tb) == "EAGAIN"
    assert a.ok(Op.READ, b"/tx/n\0") == b"1"
    # A read-only transaction also fails if what it read changed underneath it.
    tc = int(b.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    b.ok(Op.READ, b"/tx/n\0", tx=tc)
    b.ok(Op.WRITE, b"/tx/other\0x", tx=tc)
    a.ok(Op.WRITE, b"/tx/n\x002")
    assert b.err(Op.TRANSACTION_END, b"T\0", tx=tc) == "EAGAIN"
    assert a.err(Op.READ, b"/tx/other\0") == "ENOENT"
    # Disjoint transactions both commit.
    t1 = int(a.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    t2 = int(b.ok(Op.TRANSACTION_START, b"\0").rstrip(b"\0"))
    a.ok(Op.WRITE, b"/tx/n/x\0" + b"1", tx=t1)
    b.ok(Op.WRITE, b"/local/y\0" + b"2", tx=t2)
    assert a.ok(Op.TRANSACTION_END, b"T\0", tx=t1) == b"OK\0"
    assert b.ok(Op.TRANSACTION_END, b"T\0", tx=t2) == b"OK\0"


def test_domain_socket_permissions(xenstored: str) -> None:
    dom0 = Raw(xenstored)
    dom0.ok(Op.INTRODUCE, b"5\x001\x002\0")
    dom0.ok(Op.WRITE, b"/local/domain/5\0")
    dom0.ok(Op.SET_PERMS, b"/local/domain/5\0n5\0")
    dom0.ok(Op.WRITE, b"/shared/key\0secret")
    dom5 = Raw(xenstored + ".d5")
    assert dom5.err(Op.READ, b"/shared/key\0") == "EACCES"
    assert dom5.err(Op.READ, b"/shared/none\0") == "EACCES"        # can't even learn it is missing
    assert dom5.err(Op.WRITE, b"/shared/key\0mine") == "EACCES"
    assert dom5.err(Op.INTRODUCE, b"6\x001\x002\0") == "EACCES"      # dom0-only operations
    xs(xenstored, "xenstore-chmod", "/shared/key", "n0", "r5")
    assert dom5.ok(Op.READ, b"/shared/key\0") == b"secret"
    assert dom5.err(Op.WRITE, b"/shared/key\0mine") == "EACCES"
    xs(xenstored, "xenstore-chmod", "/shared/key", "n0", "b5")
    dom5.ok(Op.WRITE, b"/shared/key\0mine")
    assert dom5.err(Op.SET_PERMS, b"/shared/key\0n5\0") == "EACCES"  # not the owner
    # Relative paths live under /local/domain/5, and what the domain creates it owns.
    dom5.ok(Op.WRITE, b"device/vtpm/0/state\x001")
    assert dom0.ok(Op.GET_PERMS, b"/local/domain/5/device/vtpm/0/state\0") == b"n5\0"
    assert dom5.ok(Op.READ, b"/local/domain/5/device/vtpm/0/state\0") == b"1"
    dom5.ok(Op.SET_PERMS, b"device\0n5\0r0\0")
    assert dom5.err(Op.SET_PERMS, b"device\0n7\0") == "EPERM"       # only dom0 changes the owner
    dom0.ok(Op.SET_PERMS, b"/local/domain/5/device\0n7\0")
    # Relative watches report relative paths.
    dom5.ok(Op.WATCH, b"mine\0rel\0")
    assert dom5.event() == b"mine\0rel\0"
    dom0.ok(Op.WRITE, b"/local/domain/5/mine/x\0v")
    assert dom5.event() == b"mine/x\0rel\0"
    # dom0's new nodes inherit the parent's permissions unchanged (owner stays 5).
    assert dom0.ok(Op.GET_PERMS, b"/local/domain/5/mine/x\0") == b"n5\0"
    dom0.ok(Op.RELEASE, b"5\0")
    with pytest.raises((ConnectionResetError, BrokenPipeError)):
        dom5.call(Op.READ, b"mine\0")


def test_pyxs_works_unchanged(xenstored: str) -> None:
    with Client(unix_socket_path=xenstored) as c:
        c.write(b"/p/k", b"v")
        assert c.read(b"/p/k") == b"v"
        assert c.list(b"/p") == [b"k"]
        assert c.get_perms(b"/p/k") == [b"n0"]
        c.transaction()
        c.write(b"/p/t", b"1")
        assert c.commit()
        assert c.read(b"/p/t") == b"1"
        with c.monitor() as m:
            m.watch(b"/p", b"tok")
            # pyxs waits for events without a timeout: pump them through a queue we can bound.
            events: queue.Queue = queue.Queue()
            threading.Thread(target=lambda: [events.put(e) for e in m.wait()], daemon=True).start()
            assert events.get(timeout=WAIT) == (b"/p", b"tok")
            c.write(b"/p/k", b"w")
            assert events.get(timeout=WAIT) == (b"/p/k", b"tok")
        assert c.get_domain_path(4) == b"/local/domain/4"


def test_sigterm_stops_cleanly_and_removes_sockets(tmp_path) -> None:
    sock, stop = start_xenstored(tmp_path)
    try:
        Raw(sock).ok(Op.INTRODUCE, b"3\x001\x001\0")
        assert os.path.exists(sock + ".d3")
        proc = stop.proc
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        assert not os.path.exists(sock) and not os.path.exists(sock + ".d3")
    finally:
        stop()
