"""The two ends of a move's conversation (docs/migration.md, "The protocol").

    source                                           destination (migrate-receive)
    H  hello: its host key, nonce_S            ->
                                               <-    D  hello: its keys, nonce_D, transfer id,
                                                        a TPM quote over both nonces and its keys
    K  its ephemeral ECDH key, signed          ->
    R… records sealed under the channel key    ->
    R  end (record count)                      ->
                                               <-    O  outcome (committed | aborted), signed
    (E  an error, instead of any message, in either direction)

Each side checks the other's host key against its own trust list.  The channel key comes from ECDH
with the destination's TPM-resident transfer key (TPM2_ECDH_ZGen there), so a captured stream opens
nowhere else; both nonces go into it, so a replayed stream opens in no later session.  Outcomes are
signed, because the source acts on them: "committed" makes it delete its copy, "aborted" makes
it resume the guest.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import uuid as uuidlib
from collections.abc import Callable, Iterator, Mapping
from contextlib import AbstractContextManager
from typing import Any, Protocol

from xen_vtpm.errors import (
    AuthorizationDenied,
    MigrationError,
    MoveInDoubt,
    TransferError,
    UntrustedPeer,
    XenVtpmError,
)

from . import crypto
from .peer import HostKey, TrustedPeer
from .wire import SEALED, Opener, PeerClosed, Sealer, Wire

VERSION = 1
END = b"Z"
COMMITTED = "committed"
ABORTED = "aborted"


@dataclasses.dataclass(frozen=True)
class Quote:
    attest: bytes
    signature: bytes
    pcrs: tuple[int, ...]
    values: dict[int, bytes]


class Identity(Protocol):
    """This host's TPM-resident keys (host/identity.py)."""
    def host_key(self) -> HostKey: ...
    def sign(self, message: bytes) -> bytes: ...
    def quote(self, qualifying: bytes) -> Quote: ...
    def zgen(self, point: bytes) -> bytes: ...


TrustLookup = Callable[[bytes], TrustedPeer | None]


def _hello_digest(nonce_s: bytes, nonce_d: bytes, transfer: str, sign_key: bytes, transfer_key: bytes,
                  backend_keys: Mapping[str, bytes]) -> bytes:
    """What the destination's quote covers: both nonces, the transfer id and all its keys."""
    keys = json.dumps({k: v.hex() for k, v in sorted(backend_keys.items())}).encode()
    return crypto.digest(crypto.HELLO, nonce_s, nonce_d, transfer.encode(), sign_key, transfer_key, keys)


def _key_digest(nonce_s: bytes, nonce_d: bytes, transfer: str, eph: bytes, source: bytes, dest: bytes) -> bytes:
    return crypto.digest(crypto.KEY, nonce_s, nonce_d, transfer.encode(), eph, source, dest)


def outcome_message(transfer: str, outcome: str) -> bytes:
    return crypto.digest(crypto.OUTCOME, transfer.encode(), outcome.encode())


def _hex(obj: Mapping[str, Any], key: str, size: int, who: str) -> bytes:
    try:
        raw = bytes.fromhex(str(obj[key]))
        if size and len(raw) != size:
            raise ValueError
    except (KeyError, ValueError):
        raise TransferError(f"{who}: field {key!r} of its message is missing or malformed") from None
    return raw


def _refused(obj: Mapping[str, Any], who: str) -> XenVtpmError:
    """An error the other side sent, as the error class its exit code names."""
    text = f"{who}: {str(obj.get('error', 'refused'))[:400]}"
    return UntrustedPeer(text) if obj.get("code") == AuthorizationDenied.exit_code else MigrationError(text)


def _check_pcrs(peer: TrustedPeer, quote: Quote, who: str) -> None:
    """A peer trusted with --bind-pcrs must be booted as it was when its host key was exported."""
    if not peer.bind_pcrs:
        return
    moved = [p for p in peer.key.pcrs if quote.values.get(p) != peer.key.pcr_values[p]]
    if moved:
        names = ", ".join(f"sha256:{p}" for p in moved)
        raise UntrustedPeer(f"{who}: its boot PCRs differ from the ones it was trusted with ({names}); "
                            "check that host's boot chain, or trust its new `xen-vtpm host-key`")


class Outgoing:
    """The source's end: hello, then the sealed stream, then the signed outcome."""

    def __init__(self, wire: Wire, me: Identity, trust: TrustLookup) -> None:
        self.wire, self.me, self.trust = wire, me, trust
        self.who = wire.peer
        self.peer: TrustedPeer | None = None
        self.transfer = ""
        self._nonces = (b"", b"")
        self._sealer: Sealer | None = None

    def hello(self) -> TrustedPeer:
        mine = self.me.host_key()
        nonce_s = os.urandom(32)
        self.wire.send_json(b"H", {"version": VERSION, "host": mine.host, "sign_key": mine.sign_key.hex(),
                                   "nonce": nonce_s.hex()})
        tag, obj = self.wire.recv_json(b"D", b"E")
        if tag == b"E":
            raise _refused(obj, self.who)
        if obj.get("version") != VERSION:
            raise MigrationError(f"{self.who}: speaks move protocol version {obj.get('version')!r}, this host "
                                 f"{VERSION}; install the same xen-vtpm on both hosts")
        sign_key = crypto.point(str(obj.get("sign_key", "")), f"{self.who} sign_key")
        peer = self.trust(sign_key)
        if peer is None:
            raise UntrustedPeer(f"{self.who}: its host key ({crypto.fingerprint(sign_key)}) is not trusted here; "
                                "run `xen-vtpm host-key` there and `xen-vtpm trust add NAME FILE` here")
        transfer_key = crypto.point(str(obj.get("transfer_key", "")), f"{self.who} transfer_key")
        backend_keys = {str(k): crypto.point(str(v), f"{self.who} backend key")
                        for k, v in dict(obj.get("backend_keys") or {}).items()}
        if transfer_key != peer.key.transfer_key or any(
                backend_keys.get(kind) != value for kind, value in peer.key.backend_keys.items()):
            raise UntrustedPeer(f"{self.who} ({peer.name}): presents keys other than the ones trusted here "
                                "(its TPM or its vTPM manager changed?); export and trust its host key again")
        nonce_d = _hex(obj, "nonce", 32, self.who)
        transfer = str(obj.get("transfer", ""))
        try:
            transfer = str(uuidlib.UUID(transfer))
        except ValueError:
            raise TransferError(f"{self.who}: sent a malformed transfer id") from None
        q = obj.get("quote") or {}
        try:
            pcrs = tuple(int(p) for p in q["pcrs"])
            values = {int(p): bytes.fromhex(v) for p, v in q["values"].items()}
        except (KeyError, TypeError, ValueError, AttributeError):
            raise TransferError(f"{self.who}: sent a malformed quote") from None
        quote = Quote(_hex(q, "attest", 0, self.who), _hex(q, "signature", 64, self.who), pcrs, values)
        if set(values) != set(pcrs):
            raise TransferError(f"{self.who}: its quote's PCR list and values disagree")
        crypto.verify_quote(sign_key, quote.attest, quote.signature,
                            _hello_digest(nonce_s, nonce_d, transfer, sign_key, transfer_key, backend_keys),
                            list(pcrs), values, f"{self.who} ({peer.name})")
        _check_pcrs(peer, quote, f"{self.who} ({peer.name})")
        self.peer, self.transfer, self._nonces = peer, transfer, (nonce_s, nonce_d)
        return peer

    def recipient(self, kind: str) -> bytes:
        """The destination's key for a vTPM of this backend kind."""
        assert self.peer is not None
        key = self.peer.key.backend_keys.get(kind)
        if key is None:
            raise MigrationError(f"{self.who} ({self.peer.name}): cannot receive a vTPM of kind {kind!r} (its "
                                 "host key lists no such backend); enable it there and trust its host key again")
        return key

    def open_channel(self) -> None:
        assert self.peer is not None
        eph, z = crypto.ephemeral(self.peer.key.transfer_key)
        nonce_s, nonce_d = self._nonces
        mine = self.me.host_key().sign_key
        signature = self.me.sign(_key_digest(nonce_s, nonce_d, self.transfer, eph, mine, self.peer.key.sign_key))
        self.wire.send_json(b"K", {"ephemeral": eph.hex(), "signature": signature.hex()})
        self._sealer = Sealer(crypto.channel_key(z, nonce_s, nonce_d, self.transfer, eph))

    def send(self, kind: bytes, payload: bytes) -> None:
        assert self._sealer is not None
        self.wire.send(SEALED, self._sealer.seal(kind, payload))

    def end(self) -> None:
        assert self._sealer is not None
        self.send(END, json.dumps({"records": self._sealer.seq}).encode())

    def outcome(self) -> str:
        """The destination's signed verdict; MoveInDoubt if it gives none (the source must ask again)."""
        try:
            tag, obj = self.wire.recv_json(b"O", b"E")
        except TransferError as exc:
            raise MoveInDoubt(f"{self.who}: no outcome for transfer {self.transfer} ({exc})") from None
        if tag == b"E":
            raise MoveInDoubt(f"{self.who}: no outcome for transfer {self.transfer}: {str(obj.get('error'))[:300]}")
        assert self.peer is not None
        return check_outcome(obj, self.transfer, self.peer.key.sign_key, self.who)


def check_outcome(obj: Mapping[str, Any], transfer: str, sign_key: bytes, who: str) -> str:
    outcome = str(obj.get("outcome", ""))
    if obj.get("transfer") != transfer or not (outcome == COMMITTED or outcome.startswith(ABORTED)):
        raise MoveInDoubt(f"{who}: answered for another transfer or with an unknown outcome {outcome[:60]!r}")
    if not crypto.verify_signature(sign_key, outcome_message(transfer, outcome), _hex(obj, "signature", 64, who)):
        raise MoveInDoubt(f"{who}: its outcome for transfer {transfer} is not signed by its trusted host key")
    return outcome


class Incoming:
    """The destination's end.  ``lock(transfer)`` is taken before the transfer id is sent and held
    until ``close``: an outcome query for that id waits for this session to decide."""

    def __init__(self, wire: Wire, me: Identity, trust: TrustLookup,
                 lock: Callable[[str], AbstractContextManager[Any]]) -> None:
        self.wire, self.me, self.trust, self.lock = wire, me, trust, lock
        self.who = wire.peer
        self.peer: TrustedPeer | None = None
        self.transfer = ""
        self._held = contextlib.ExitStack()
        self._nonces = (b"", b"")
        self._opener: Opener | None = None

    def close(self) -> None:
        self._held.close()

    def hello(self) -> TrustedPeer:
        _, obj = self.wire.recv_json(b"H")
        if obj.get("version") != VERSION:
            raise MigrationError(f"the source speaks move protocol version {obj.get('version')!r}, this host "
                                 f"{VERSION}; install the same xen-vtpm on both hosts")
        sign_key = crypto.point(str(obj.get("sign_key", "")), "the source's sign_key")
        nonce_s = _hex(obj, "nonce", 32, "the source")
        peer = self.trust(sign_key)
        if peer is None:
            raise UntrustedPeer(f"source {str(obj.get('host'))[:64]!r} (host key {crypto.fingerprint(sign_key)}) "
                                "is not trusted on this host; run `xen-vtpm host-key` there and "
                                "`xen-vtpm trust add NAME FILE` here")
        self.transfer = str(uuidlib.uuid4())
        self._held.enter_context(self.lock(self.transfer))
        nonce_d = os.urandom(32)
        mine = self.me.host_key()
        quote = self.me.quote(_hello_digest(nonce_s, nonce_d, self.transfer, mine.sign_key, mine.transfer_key,
                                            mine.backend_keys))
        self.wire.send_json(b"D", {
            "version": VERSION, "host": mine.host, "sign_key": mine.sign_key.hex(),
            "transfer_key": mine.transfer_key.hex(),
            "backend_keys": {k: v.hex() for k, v in mine.backend_keys.items()},
            "nonce": nonce_d.hex(), "transfer": self.transfer,
            "quote": {"attest": quote.attest.hex(), "signature": quote.signature.hex(), "pcrs": list(quote.pcrs),
                      "values": {str(p): v.hex() for p, v in quote.values.items()}}})
        self.peer, self._nonces = peer, (nonce_s, nonce_d)
        return peer

    def accept_channel(self) -> None:
        assert self.peer is not None
        _, obj = self.wire.recv_json(b"K")
        eph = crypto.point(str(obj.get("ephemeral", "")), "the source's ephemeral key")
        nonce_s, nonce_d = self._nonces
        mine = self.me.host_key().sign_key
        if not crypto.verify_signature(self.peer.key.sign_key,
                                       _key_digest(nonce_s, nonce_d, self.transfer, eph, self.peer.key.sign_key, mine),
                                       _hex(obj, "signature", 64, "the source")):
            raise TransferError(f"{self.peer.name}: the stream's key is not signed by its trusted host key for this "
                                "session (replayed or forged); nothing was changed")
        self._opener = Opener(crypto.channel_key(self.me.zgen(eph), nonce_s, nonce_d, self.transfer, eph),
                              self.peer.name)

    def records(self) -> Iterator[tuple[bytes, bytes]]:
        """Every record until the end record, which must count them all (else TransferError)."""
        assert self._opener is not None and self.peer is not None
        while True:
            try:
                tag, body = self.wire.recv()
            except PeerClosed:
                raise TransferError(f"{self.peer.name}: the transfer ended before its end record (truncated); "
                                    "nothing was changed") from None
            if tag != SEALED:
                raise TransferError(f"{self.peer.name}: unsealed message {tag!r} inside the transfer (altered)")
            seq = self._opener.seq
            kind, payload = self._opener.open(body)
            if kind == END:
                try:
                    count = int(json.loads(payload.decode())["records"])
                except (ValueError, KeyError, TypeError, UnicodeDecodeError):
                    count = -1
                if count != seq:
                    raise TransferError(f"{self.peer.name}: the end record counts {count} records, {seq} arrived")
                return
            yield kind, payload

    def answer(self, outcome: str) -> None:
        """Tell the source (best effort: it may be gone; then it asks again with --outcome)."""
        send_outcome(self.wire, self.me, self.transfer, outcome)

    def refuse(self, exc: XenVtpmError) -> None:
        send_error(self.wire, exc)


def send_outcome(wire: Wire, me: Identity, transfer: str, outcome: str) -> None:
    signature = me.sign(outcome_message(transfer, outcome))
    with contextlib.suppress(OSError, ValueError):
        wire.send_json(b"O", {"transfer": transfer, "outcome": outcome, "signature": signature.hex()})


class PeerBusy(MoveInDoubt):
    """The destination is still deciding that transfer (its receiving session holds it): ask again."""


def send_error(wire: Wire, exc: XenVtpmError, *, busy: bool = False) -> None:
    with contextlib.suppress(OSError, ValueError):
        wire.send_json(b"E", {"error": str(exc), "code": exc.exit_code, "busy": busy})


def read_outcome(wire: Wire, transfer: str, sign_key: bytes) -> str:
    """The answer to `migrate-receive --outcome`; MoveInDoubt for anything but a signed outcome."""
    try:
        tag, obj = wire.recv_json(b"O", b"E")
    except TransferError as exc:
        raise MoveInDoubt(f"{wire.peer}: no outcome for transfer {transfer} ({exc})") from None
    if tag == b"E":
        cls = PeerBusy if obj.get("busy") is True else MoveInDoubt
        raise cls(f"{wire.peer}: no outcome for transfer {transfer}: {str(obj.get('error'))[:300]}")
    return check_outcome(obj, transfer, sign_key, wire.peer)
