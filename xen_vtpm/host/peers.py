"""The other hosts of moves, as the coordinator's ports (``core.interfaces.Peers``, ``OutgoingMove``,
``IncomingMove``): the protocol of ``transfer.session`` with this host's TPM identity and trust list."""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import AbstractContextManager
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import MigrationError, MoveInDoubt, TransferError, UsageError, XenVtpmError
from xen_vtpm.transfer.link import Remote
from xen_vtpm.transfer.session import Incoming, Outgoing, PeerBusy, read_outcome
from xen_vtpm.transfer.wire import RECORD_MAX, PeerClosed, Wire

from .identity import TpmIdentity
from .trusted import TrustStore

# Record kinds of core/migration.py as tags on the wire.
_TAGS = {"meta": b"M", "vtpm": b"V", "memory": b"G", "checkpoint": b"C", "checkpoint-image": b"I",
         "checkpoint-memory": b"g"}
_KINDS = {tag: kind for kind, tag in _TAGS.items()}
_POLL = 0.5


def _tag(kind: str) -> bytes:
    try:
        return _TAGS[kind]
    except KeyError:
        raise UsageError(f"move: no record kind {kind!r}") from None


class _Link:
    """What both ends say about the session, once its hello passed."""

    def __init__(self, session: Outgoing | Incoming) -> None:
        self._hello = session

    @property
    def transfer(self) -> str:
        return self._hello.transfer

    @property
    def peer_name(self) -> str:
        assert self._hello.peer is not None
        return self._hello.peer.name

    @property
    def peer_key(self) -> str:
        assert self._hello.peer is not None
        return self._hello.peer.key.sign_key.hex()


class OutgoingLink(_Link):
    """The source's connection.  A write the destination no longer reads (it refused, or died) only
    marks the link broken: what the destination decided is read, or asked, afterwards."""

    def __init__(self, remote: Remote, session: Outgoing) -> None:
        super().__init__(session)
        self.remote, self.session = remote, session
        self._open = self._broken = False

    def recipient(self, kind: str) -> bytes:
        return self.session.recipient(kind)

    def _send(self, tag: bytes, payload: bytes | memoryview) -> None:
        if self._broken:
            return
        try:
            if not self._open:
                self.session.open_channel()
                self._open = True
            self.session.send(tag, bytes(payload))
        except OSError:
            self._broken = True

    def send_json(self, kind: str, obj: dict[str, Any]) -> None:
        self._send(_tag(kind), json.dumps(obj, sort_keys=True).encode())

    def send_bytes(self, kind: str, blocks: Iterable[bytes | memoryview[int]]) -> None:
        tag = _tag(kind)
        for block in blocks:
            view = memoryview(block).cast("B")
            for offset in range(0, len(view), RECORD_MAX):
                self._send(tag, view[offset:offset + RECORD_MAX])
            if not len(view):
                self._send(tag, b"")

    def finish(self) -> str:
        if not self._broken:
            try:
                self.session.end()
            except OSError:
                self._broken = True
        try:
            return self.session.outcome()
        except MoveInDoubt as exc:
            said = self.remote.last_error()
            raise MoveInDoubt(f"{exc}" + (f"; it said: {said}" if said else "")) from None

    def close(self) -> None:
        self.remote.close()


class IncomingLink(_Link):
    """The destination's end, over this process's own stdin/stdout (run by the source's ssh)."""

    def __init__(self, session: Incoming) -> None:
        super().__init__(session)
        self.session = session

    def records(self) -> Iterator[tuple[str, bytes]]:
        self.session.accept_channel()
        for tag, payload in self.session.records():
            kind = _KINDS.get(tag)
            if kind is None:
                raise TransferError(f"{self.peer_name}: a record of unknown kind {tag!r} "
                                    "(another version of xen-vtpm?)")
            yield kind, payload

    def answer(self, outcome: str) -> None:
        self.session.answer(outcome)

    def refuse(self, error: XenVtpmError) -> None:
        self.session.refuse(error)

    def close(self) -> None:
        self.session.close()


class HostPeers:
    """``core.interfaces.Peers``: reach another host with `SSHCOMMAND HOST xen-vtpm migrate-receive`."""

    def __init__(self, cfg: Config, identity: TpmIdentity, trust: TrustStore) -> None:
        self.cfg, self.identity, self.trust = cfg, identity, trust

    def connect(self, host: str, ssh: str) -> OutgoingLink:
        remote = Remote(ssh, host, ["migrate-receive"])
        try:
            session = Outgoing(remote.wire, self.identity, self.trust.by_sign_key)
            session.hello()
        except (PeerClosed, OSError):            # it died before its hello, or as ours went out
            remote.close()
            said = remote.last_error() or "no message"
            raise MigrationError(f"{host}: no xen-vtpm answered through {ssh!r} ({said}); check the ssh command, "
                                 "and that xen-vtpm is installed and initialised there") from None
        except XenVtpmError as exc:
            remote.close()
            said = remote.last_error()
            if said and said not in str(exc):
                raise type(exc)(f"{exc}; {host} said: {said}") from None
            raise
        return OutgoingLink(remote, session)

    def accept(self, wire: Wire, lock: Callable[[str], AbstractContextManager[Any]]) -> IncomingLink:
        session = Incoming(wire, self.identity, self.trust.by_sign_key, lock)
        try:
            session.hello()
        except XenVtpmError as exc:
            session.refuse(exc)
            session.close()
            raise
        return IncomingLink(session)

    def outcome(self, host: str, ssh: str, transfer: str, peer_key: str) -> str:
        """Ask the destination; while its session still holds the transfer, ask again (up to
        ``manager_timeout``).  MoveInDoubt when no signed answer comes."""
        deadline = time.monotonic() + self.cfg.manager_timeout
        while True:
            remote = Remote(ssh, host, ["migrate-receive", "--outcome", transfer])
            try:
                return read_outcome(remote.wire, transfer, bytes.fromhex(peer_key))
            except PeerBusy:
                if time.monotonic() > deadline:
                    raise
            except MoveInDoubt as exc:
                said = remote.last_error()
                raise MoveInDoubt(f"{exc}" + (f"; it said: {said}" if said else "")) from None
            finally:
                remote.close()
            time.sleep(_POLL)
