"""XenStore client: pyxs 0.4.1 for the connection, our own bounded waits on top.

We keep pyxs's connection classes, Router thread and Packet framing, but send
every request through ``Router.send`` ourselves instead of
``Client.execute_command`` because 0.4.1 (docs/xen-internals.md §13):
  * waits for replies with no timeout, so a dead router thread or a stuck
    daemon would hang the tool forever — we wait in bounded slices and notice
    a dead router;
  * rejects empty values (``write(path, b"")`` raises) and strips trailing
    NULs from replies — we build payloads and parse replies ourselves;
  * wraps request ids past 2**32 into a struct error — we keep our own u32 ids.
Everything else in pyxs (sockets, XenBus, the watch-event dispatch by token)
is used as is.
"""
from __future__ import annotations

import copy
import itertools
import os
import queue
import random
import socket
import time
from collections.abc import Callable
from typing import Any

from pyxs import Client, Router
from pyxs._internal import Op, Packet
from pyxs.connection import UnixSocketConnection, XenBusConnection, _UnixSocketTransport
from pyxs.exceptions import PyXSError

from xen_vtpm.errors import XenStoreError, XenStoreNotFound, XenStorePermission, XenStoreTimeout, XenStoreUnavailable

DEFAULT_SOCKET = "/var/run/xenstored/socket"
XENBUS_DEVICE = "/dev/xen/xenbus"
PAYLOAD_MAX = 4096
MAX_TX_ATTEMPTS = 50
POLL_INTERVAL = 0.5      # XenBus has no usable watches: how often a polled Watch hints
_SLICE = 0.1             # how quickly a wait notices that the router thread died

_HINTS = {
    "EINVAL": "check the path (characters A-Za-z0-9-/_@, no '//' or trailing '/') and arguments",
    "EEXIST": "it is already there",
    "E2BIG": "the reply would exceed 4096 bytes; split the data",
    "EAGAIN": "a conflicting write happened; redo the transaction",
    "ENOSPC": "a xenstored quota was hit; remove stale nodes or transactions",
    "ENOSYS": "this xenstored does not implement the request",
}


def _b(text: str) -> bytes:
    # surrogateescape: XenStore values are bytes; any byte string round-trips through str.
    return text.encode("utf-8", "surrogateescape")


def _p(path: str) -> bytes:
    """A path as a NUL-terminated wire string (the daemon validates the rest)."""
    if "\0" in path:
        raise XenStoreError(f"XenStore path {path!r}: contains NUL; use [A-Za-z0-9-/_@] only")
    return _b(path) + b"\0"


def _s(data: bytes) -> str:
    return data.decode("utf-8", "surrogateescape")


def _strings(payload: bytes) -> list[str]:
    return [_s(p) for p in payload.split(b"\0")[:-1]] if payload else []


def _under(path: str, top: str) -> bool:
    if top.startswith("@"):
        return path == top
    return path == top or top == "/" or path.startswith(top + "/")


def xs_error(name: str, what: str) -> XenStoreError:
    """The exception for an ERROR reply; ``.code`` keeps the errno name."""
    if name == "ENOENT":
        exc: XenStoreError = XenStoreNotFound(f"XenStore {what}: no such node (ENOENT); check the path")
    elif name in ("EACCES", "EPERM"):
        exc = XenStorePermission(
            f"XenStore {what}: permission denied ({name}); run as dom0 or have the owner grant access")
    else:
        exc = XenStoreError(f"XenStore {what}: {name}; {_HINTS.get(name, 'see xenstored log')}")
    exc.code = name  # type: ignore[attr-defined]
    return exc


class _QuietRouter(Router):
    """pyxs's router thread dies by raising into the void when the socket
    closes; we remember why so the next call raises XenStoreUnavailable."""

    failure = ""

    def __call__(self) -> None:
        try:
            super().__call__()
        except Exception as exc:  # noqa: BLE001 — any death of the thread is "unavailable"
            self.failure = f"{exc.__class__.__name__}: {exc}"


class _TimedUnixConnection(UnixSocketConnection):
    """pyxs connects with no timeout; a wedged daemon's full backlog would block us."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__(path)
        self._timeout = timeout

    def create_transport(self) -> _UnixSocketTransport:
        transport = _UnixSocketTransport.__new__(_UnixSocketTransport)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self._timeout)
        try:
            sock.connect(self.path)
        except OSError as exc:
            sock.close()
            raise PyXSError(f"{exc.strerror or exc}") from None
        sock.settimeout(None)
        transport.sock = sock
        return transport


def resolve_endpoint(path: str | None) -> tuple[str, str]:
    """("socket"|"xenbus", path): argument, $XENSTORED_PATH, the default socket, then XenBus."""
    if path:
        return "socket", path
    if os.environ.get("XENSTORED_PATH"):
        return "socket", os.environ["XENSTORED_PATH"]
    if os.path.exists(DEFAULT_SOCKET) or not os.path.exists(XENBUS_DEVICE):
        return "socket", DEFAULT_SOCKET
    return "xenbus", XENBUS_DEVICE


class _Ops:
    """The node operations shared by the store and a transaction."""

    def _call(self, op: int, payload: bytes, what: str) -> bytes:
        raise NotImplementedError

    def read(self, path: str) -> str:
        return _s(self._call(Op.READ, _p(path), path))

    def read_or(self, path: str, default: str | None = None) -> str | None:
        try:
            return self.read(path)
        except XenStoreNotFound:
            return default

    def write(self, path: str, value: str) -> None:
        self._call(Op.WRITE, _p(path) + _b(value), path)

    def mkdir(self, path: str) -> None:
        self._call(Op.MKDIR, _p(path), path)

    def rm(self, path: str) -> None:
        self._call(Op.RM, _p(path), path)

    def ls(self, path: str) -> list[str]:
        return _strings(self._call(Op.DIRECTORY, _p(path), path))

    def exists(self, path: str) -> bool:
        try:
            self._call(Op.READ, _p(path), path)
        except XenStoreNotFound:
            return False
        return True

    def get_perms(self, path: str) -> list[str]:
        return _strings(self._call(Op.GET_PERMS, _p(path), path))

    def set_perms(self, path: str, perms: list[str]) -> None:
        self._call(Op.SET_PERMS, _p(path) + b"".join(_b(p) + b"\0" for p in perms), path)


class Transaction(_Ops):
    """Operations inside one XenStore transaction (given to ``transact``'s fn)."""

    def __init__(self, xs: XenStore, client: Client) -> None:
        self._xs = xs
        # One pyxs Client per transaction: pyxs keeps tx_id per Client (docs/xen-internals.md §13).
        self._client = client

    def _call(self, op: int, payload: bytes, what: str) -> bytes:
        return self._xs._request(op, payload, what, tx_id=self._client.tx_id)


class Watch:
    """A registered watch; ``wait`` returns (path, token) hints or None on timeout."""

    def __init__(self, xs: XenStore, paths: list[str], token: str) -> None:
        self._xs = xs
        self._paths = list(paths)
        self.token = token
        self.events: queue.Queue = queue.Queue()     # filled by pyxs's router thread
        self._registered: list[str] = []
        self._first_poll = True
        if xs.polling:
            return
        xs._router.subscribe(_b(token), self)
        try:
            for path in self._paths:
                xs._request(Op.WATCH, _p(path) + _b(token) + b"\0", f"watch {path}")
                self._registered.append(path)
        except BaseException:
            self.close()
            raise

    def wait(self, timeout: float) -> tuple[str, str] | None:
        if self._xs.polling:
            return self._poll(timeout)
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            try:
                event = self.events.get(timeout=min(remaining, _SLICE))
            except queue.Empty:
                self._xs._check_router("watch")
                continue
            path = _s(event.path)
            if any(_under(path, top) for top in self._paths):
                return path, self.token

    def _poll(self, timeout: float) -> tuple[str, str] | None:
        # XenBus delivers no watch events to pyxs, so we hand out periodic
        # hints; callers re-read state on every event anyway.
        if not self._first_poll:
            time.sleep(min(POLL_INTERVAL, max(timeout, 0)))
        self._first_poll = False
        return self._paths[0], self.token

    def close(self) -> None:
        for path in self._registered:
            try:
                self._xs._request(Op.UNWATCH, _p(path) + _b(self.token) + b"\0", f"unwatch {path}")
            except XenStoreError:
                pass       # the connection is gone; so is the watch
        self._registered.clear()
        if not self._xs.polling:
            try:
                self._xs._router.unsubscribe(_b(self.token), self)
            except ValueError:
                pass

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


class XenStore(_Ops):
    def __init__(self, path: str | None = None, timeout: float = 10.0) -> None:
        self.kind, self.path = resolve_endpoint(path)
        self.timeout = timeout
        self.polling = self.kind == "xenbus"
        self._ids = itertools.count(1)
        connection = (XenBusConnection(self.path) if self.polling
                      else _TimedUnixConnection(self.path, timeout))
        self._router = _QuietRouter(connection)
        self._client = Client(router=self._router)
        self._closed = False
        try:
            self._router.start()
        except (PyXSError, OSError) as exc:
            raise XenStoreUnavailable(
                f"XenStore {self.kind} {self.path}: cannot connect ({exc}); is xenstored running? "
                f"set XENSTORED_PATH to its socket") from None

    # --- plumbing -------------------------------------------------------------
    def _unavailable(self, what: str) -> XenStoreUnavailable:
        cause = self._router.failure or "connection closed"
        return XenStoreUnavailable(
            f"XenStore {what}: lost the connection to {self.path} ({cause}); "
            f"is xenstored running? reconnect or set XENSTORED_PATH")

    def _check_router(self, what: str) -> None:
        if self._closed or not self._router.thread.is_alive():
            raise self._unavailable(what)

    def _request(self, op: int, payload: bytes, what: str, tx_id: int = 0) -> bytes:
        """Send one request and wait at most ``timeout`` for its reply."""
        if len(payload) > PAYLOAD_MAX:
            raise XenStoreError(f"XenStore {what}: request of {len(payload)} bytes exceeds the "
                                f"{PAYLOAD_MAX}-byte payload limit; store less per node")
        self._check_router(what)
        packet = Packet(op, payload, rq_id=next(self._ids) & 0xFFFFFFFF, tx_id=tx_id)
        try:
            rvar = self._router.send(packet)
        except (PyXSError, OSError):
            raise self._unavailable(what) from None
        deadline = time.monotonic() + self.timeout
        with rvar.condition:
            while rvar.target is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise XenStoreTimeout(
                        f"XenStore {what}: no reply from {self.path} within {self.timeout:g} s; "
                        f"is xenstored stuck? check it or raise the timeout")
                if not self._router.thread.is_alive():
                    raise self._unavailable(what)
                rvar.condition.wait(min(remaining, _SLICE))
        reply = rvar.target
        if reply.op == Op.ERROR:
            raise xs_error(_s(reply.payload.rstrip(b"\0")), what)
        if reply.op != op:
            raise XenStoreError(f"XenStore {what}: reply of type {reply.op} to a request of type {op}; "
                                f"xenstored or the connection is confused, reconnect")
        return reply.payload

    def _call(self, op: int, payload: bytes, what: str) -> bytes:
        return self._request(op, payload, what)

    # --- domains --------------------------------------------------------------
    def get_domain_path(self, domid: int) -> str:
        return _s(self._call(Op.GET_DOMAIN_PATH, f"{domid}\0".encode(), f"domain {domid}").rstrip(b"\0"))

    def introduce(self, domid: int, mfn: int, port: int) -> None:
        self._call(Op.INTRODUCE, f"{domid}\0{mfn}\0{port}\0".encode(), f"introduce domain {domid}")

    def release(self, domid: int) -> None:
        self._call(Op.RELEASE, f"{domid}\0".encode(), f"release domain {domid}")

    def is_introduced(self, domid: int) -> bool:
        return self._call(Op.IS_DOMAIN_INTRODUCED, f"{domid}\0".encode(), f"domain {domid}") == b"T\0"

    # --- transactions -----------------------------------------------------------
    def transact(self, fn: Callable[[Transaction], Any]) -> Any:
        """Run ``fn(tx)`` in a transaction, redoing it while commits hit EAGAIN."""
        for attempt in range(MAX_TX_ATTEMPTS):
            client = copy.copy(self._client)
            client.tx_id = int(self._request(Op.TRANSACTION_START, b"\0", "transaction start").rstrip(b"\0"))
            tx = Transaction(self, client)
            try:
                result = fn(tx)
            except (XenStoreTimeout, XenStoreUnavailable):
                raise            # nobody left to abort with
            except XenStoreError as exc:
                self._end(client, commit=False)
                if getattr(exc, "code", "") != "EAGAIN":
                    raise
            except BaseException:
                self._end(client, commit=False)
                raise
            else:
                try:
                    self._request(Op.TRANSACTION_END, b"T\0", "transaction commit", tx_id=client.tx_id)
                    return result
                except XenStoreError as exc:
                    if getattr(exc, "code", "") != "EAGAIN":
                        raise
            # Jittered backoff so that colliding writers stop colliding.
            time.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise XenStoreError(f"XenStore transaction: still conflicting after {MAX_TX_ATTEMPTS} attempts "
                            f"(EAGAIN); retry later or reduce concurrent writers")

    def _end(self, client: Client, commit: bool) -> None:
        try:
            self._request(Op.TRANSACTION_END, b"T\0" if commit else b"F\0", "transaction end",
                          tx_id=client.tx_id)
        except XenStoreError:
            pass      # aborting is best effort; the daemon drops it with the connection anyway

    # --- watches ------------------------------------------------------------------
    def watch(self, path: str, token: str) -> Watch:
        return Watch(self, [path], token)

    def wait_for(self, predicate: Callable[[], bool], paths: list[str], timeout: float) -> bool:
        """Re-check ``predicate`` on every event on ``paths`` until it holds or ``timeout`` passes."""
        deadline = time.monotonic() + timeout
        with Watch(self, paths, f"wait_for/{id(self)}/{next(self._ids)}") as watch:
            while True:
                if predicate():
                    return True
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                watch.wait(remaining)

    # --- lifetime -------------------------------------------------------------------
    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self._router.terminate()

    def __enter__(self) -> XenStore:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
