"""xen_vtpm.xen.xenstore against the simulated xenstored (and Debian's C clients as the other party)."""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import threading

import pytest
from xs_fixture import start_xenstored, xenstored  # noqa: F401  (fixture)

from xen_vtpm.errors import XenStoreError, XenStoreNotFound, XenStorePermission, XenStoreTimeout, XenStoreUnavailable
from xen_vtpm.xen.xenstore import DEFAULT_SOCKET, XenStore, resolve_endpoint
from xen_vtpm_sim.xenstored import HEADER, Op

WAIT = 10.0


def c_client(sock: str, *args: str) -> str:
    env = dict(os.environ, XENSTORED_PATH=sock)
    return subprocess.run(list(args), env=env, capture_output=True, text=True, timeout=WAIT,
                          check=True).stdout


def test_basic_operations(xenstored: str) -> None:
    with XenStore(xenstored, timeout=WAIT) as xs:
        xs.write("/vm/a/name", "guest1")
        xs.write("/vm/a/empty", "")
        xs.write("/vm/a/bin", "tail\0nul é")
        assert xs.read("/vm/a/name") == "guest1"
        assert xs.read("/vm/a/empty") == ""
        assert xs.read("/vm/a/bin") == "tail\0nul é"     # trailing data and NULs survive
        assert xs.ls("/vm/a") == ["name", "empty", "bin"]
        assert xs.ls("/vm/a/name") == []
        assert xs.exists("/vm/a") and not xs.exists("/vm/zz")
        assert xs.read_or("/vm/zz") is None and xs.read_or("/vm/zz", "d") == "d"
        xs.mkdir("/vm/b/c")
        assert xs.read("/vm/b/c") == ""
        xs.mkdir("/vm/a/name")                               # existing: value untouched
        assert xs.read("/vm/a/name") == "guest1"
        xs.rm("/vm/a")
        assert not xs.exists("/vm/a/name")
        xs.rm("/vm/a")                                       # gone already, parent exists: fine
        with pytest.raises(XenStoreNotFound, match="/vm/a/name"):
            xs.read("/vm/a/name")
        with pytest.raises(XenStoreNotFound):
            xs.rm("/nothing/here")
        assert xs.get_domain_path(3) == "/local/domain/3"
    # The C clients see what we wrote.
    with XenStore(xenstored) as xs:
        xs.write("/seen/by", "c")
    assert c_client(xenstored, "xenstore-read", "/seen/by") == "c\n"


def test_errors_are_mapped(xenstored: str) -> None:
    with XenStore(xenstored) as xs:
        with pytest.raises(XenStoreError, match="EINVAL") as bad:
            xs.write("/a//b", "x")
        assert not isinstance(bad.value, (XenStoreNotFound, XenStorePermission))
        with pytest.raises(XenStoreError, match="EINVAL"):
            xs.read("/trailing/")
        with pytest.raises(XenStoreError, match="NUL"):
            xs.read("/a\0b")
        with pytest.raises(XenStoreError, match="4096-byte payload limit"):
            xs.write("/big", "x" * 5000)
        xs.write("/big", "x" * (4096 - len("/big") - 1))      # exactly at the limit
        assert len(xs.read("/big")) == 4091
        for i in range(160):
            xs.mkdir(f"/many/child-with-a-long-name-{i:04d}")
        with pytest.raises(XenStoreError, match="E2BIG"):
            xs.ls("/many")
        assert xs.read("/big") == "x" * 4091                  # the connection is still fine


def test_permissions_domain_client(xenstored: str) -> None:
    with XenStore(xenstored) as dom0:
        dom0.introduce(5, 1234, 7)
        assert dom0.is_introduced(5) and not dom0.is_introduced(6)
        dom0.mkdir("/local/domain/5")
        dom0.set_perms("/local/domain/5", ["n5"])
        dom0.write("/vm/secret", "s")
        with XenStore(f"{xenstored}.d5") as dom5:
            with pytest.raises(XenStorePermission, match="/vm/secret"):
                dom5.read("/vm/secret")
            with pytest.raises(XenStorePermission):
                dom5.write("/vm/secret", "mine")
            with pytest.raises(XenStorePermission):
                dom5.introduce(6, 1, 1)
            c_client(xenstored, "xenstore-chmod", "/vm/secret", "n0", "r5")
            assert dom5.read("/vm/secret") == "s"
            assert dom0.get_perms("/vm/secret") == ["n0", "r5"]
            dom5.write("state", "1")                          # relative: /local/domain/5/state
            assert dom0.read("/local/domain/5/state") == "1"
            assert dom0.get_perms("/local/domain/5/state") == ["n5"]
            with pytest.raises(XenStorePermission, match="EPERM"):
                dom5.set_perms("state", ["n0"])               # only dom0 changes ownership
            dom0.release(5)
            with pytest.raises(XenStoreUnavailable):
                dom5.read("state")
        assert not dom0.is_introduced(5)


def test_transact_retries_until_every_increment_lands(xenstored: str) -> None:
    with XenStore(xenstored) as xs:
        xs.write("/counter", "0")
        calls = []

        def increment(tx) -> int:
            calls.append(1)
            value = int(tx.read("/counter")) + 1
            if len(calls) == 1:
                # Someone else commits in between: our first commit must get EAGAIN.
                with XenStore(xenstored) as other:
                    other.write("/counter", "100")
            tx.write("/counter", str(value))
            tx.write("/counter-by", "me")
            return value

        assert xs.transact(increment) == 101
        assert len(calls) == 2 and xs.read("/counter") == "101"

        def add_one(tx) -> None:
            tx.write("/counter", str(int(tx.read("/counter")) + 1))

        def worker() -> None:
            with XenStore(xenstored) as mine:
                for _ in range(25):
                    mine.transact(add_one)

        threads = [threading.Thread(target=worker) for _ in range(4)] + \
                  [threading.Thread(target=lambda: [xs.transact(add_one) for _ in range(25)])]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert xs.read("/counter") == str(101 + 125)

        def fails(tx) -> None:
            tx.write("/aborted", "x")
            raise RuntimeError("boom")

        with pytest.raises(RuntimeError):
            xs.transact(fails)
        assert not xs.exists("/aborted")


def test_watches(xenstored: str) -> None:
    with XenStore(xenstored) as xs:
        with xs.watch("/w", "tok") as w:
            assert w.wait(WAIT) == ("/w", "tok")             # fires on registration
            c_client(xenstored, "xenstore-write", "/w/x", "1")
            assert w.wait(WAIT) == ("/w/x", "tok")
            xs.write("/elsewhere", "1")
            assert w.wait(0.2) is None
        with xs.watch("@introduceDomain", "in") as intro, xs.watch("@releaseDomain", "out") as rel:
            assert intro.wait(WAIT) == ("@introduceDomain", "in")
            assert rel.wait(WAIT) == ("@releaseDomain", "out")
            xs.introduce(9, 1, 1)
            assert intro.wait(WAIT) == ("@introduceDomain", "in")
            xs.release(9)
            assert rel.wait(WAIT) == ("@releaseDomain", "out")


def test_wait_for(xenstored: str) -> None:
    with XenStore(xenstored) as xs:
        xs.write("/be/state", "1")
        writer = threading.Timer(0.2, lambda: c_client(xenstored, "xenstore-write", "/be/state", "2"))
        writer.start()
        try:
            assert xs.wait_for(lambda: xs.read("/be/state") == "2", ["/be"], timeout=WAIT)
        finally:
            writer.join()
        assert not xs.wait_for(lambda: xs.read("/be/state") == "4", ["/be"], timeout=0.3)


def test_unavailable_without_server(tmp_path, monkeypatch) -> None:
    missing = str(tmp_path / "none.sock")
    with pytest.raises(XenStoreUnavailable, match="XENSTORED_PATH") as exc:
        XenStore(missing)
    assert missing in str(exc.value)
    monkeypatch.setenv("XENSTORED_PATH", missing)
    assert resolve_endpoint(None) == ("socket", missing)
    assert resolve_endpoint("/x") == ("socket", "/x")
    with pytest.raises(XenStoreUnavailable, match=str(tmp_path)):
        XenStore()
    monkeypatch.delenv("XENSTORED_PATH")
    assert resolve_endpoint(None)[1] in (DEFAULT_SOCKET, "/dev/xen/xenbus")


def test_timeout_when_server_stops_mid_call(tmp_path) -> None:
    sock, stop = start_xenstored(tmp_path)
    proc = stop.proc
    try:
        xs = XenStore(sock, timeout=0.5)
        xs.write("/k", "v")
        proc.send_signal(signal.SIGSTOP)
        with pytest.raises(XenStoreTimeout, match="no reply"):
            xs.read("/k")
        # Killed while a call is waiting: the call ends with Unavailable, never hangs.
        xs.timeout = WAIT
        outcome: list[BaseException] = []

        def call() -> None:
            try:
                xs.read("/k")
            except BaseException as exc:      # noqa: BLE001 — we inspect it below
                outcome.append(exc)

        t = threading.Thread(target=call)
        t.start()
        proc.kill()
        proc.wait()
        t.join()
        assert len(outcome) == 1 and isinstance(outcome[0], (XenStoreUnavailable, XenStoreTimeout))
        with pytest.raises(XenStoreUnavailable, match="is xenstored running"):
            xs.ls("/")
        xs.close()
    finally:
        stop()


def test_dead_router_is_unavailable_not_a_hang(tmp_path) -> None:
    # A peer answering with a request id nobody asked for kills pyxs's router thread
    # (docs/xen-internals.md §13); our client must notice instead of waiting forever.
    path = str(tmp_path / "bad.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(1)

    def serve() -> None:
        conn, _ = server.accept()
        with conn:
            typ, req, tx, length = HEADER.unpack(conn.recv(HEADER.size))
            conn.recv(length)
            conn.sendall(HEADER.pack(Op.READ, req + 1000, tx, 1) + b"x")
            conn.recv(1)             # hold the socket open until the client goes away

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        with XenStore(path, timeout=WAIT) as xs:
            with pytest.raises(XenStoreUnavailable, match="UnexpectedPacket"):
                xs.read("/k")
    finally:
        t.join(WAIT)
        server.close()
