"""Framing of a move's byte stream, and its sealed records.

A frame is ``be32 length ‖ tag (1 byte) ‖ body``.  Before the channel key exists the bodies are
JSON (hello, key, outcome, error); after it, every frame of the source is one record sealed with
AES-256-GCM under the channel key, its nonce the record's sequence number, so a record dropped,
repeated, reordered or altered fails to open, and a stream cut short lacks its end record.
"""
from __future__ import annotations

import json
import struct
from typing import IO, Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from xen_vtpm.errors import TransferError

RECORD_MAX = 1 << 20                  # payload bytes per record
_FRAME_MAX = RECORD_MAX + 1024        # a sealed record, or a JSON message
_AAD = b"xen-vtpm move record v1"
SEALED = b"R"


class PeerClosed(TransferError):
    """The other end closed the stream at a frame boundary."""


class Wire:
    """Frames over a pair of byte streams (a pipe to ssh, or this process's stdin/stdout)."""

    def __init__(self, rfile: IO[bytes], wfile: IO[bytes], peer: str) -> None:
        self.rfile, self.wfile, self.peer = rfile, wfile, peer

    def send(self, tag: bytes, body: bytes) -> None:
        self.wfile.write(struct.pack(">I", len(body) + 1) + tag + body)
        self.wfile.flush()

    def send_json(self, tag: bytes, obj: dict[str, Any]) -> None:
        self.send(tag, json.dumps(obj, sort_keys=True, separators=(",", ":")).encode())

    def _read(self, n: int, started: bool) -> bytes:
        data = self.rfile.read(n)
        if len(data) == n:
            return data
        if not data and not started:
            raise PeerClosed(f"{self.peer}: closed the connection")
        raise TransferError(f"{self.peer}: the stream was cut short (truncated after {len(data)} of {n} bytes)")

    def recv(self) -> tuple[bytes, bytes]:
        (size,) = struct.unpack(">I", self._read(4, False))
        if not 1 <= size <= _FRAME_MAX:
            raise TransferError(f"{self.peer}: a frame of {size} bytes is not part of the protocol (altered stream)")
        frame = self._read(size, True)
        return frame[:1], frame[1:]

    def recv_json(self, *tags: bytes) -> tuple[bytes, dict[str, Any]]:
        tag, body = self.recv()
        if tag not in tags:
            raise TransferError(f"{self.peer}: sent message {tag!r} where {b'/'.join(tags)!r} belongs; "
                                "not the xen-vtpm move protocol or an altered stream")
        try:
            obj = json.loads(body.decode())
            if not isinstance(obj, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise TransferError(f"{self.peer}: sent an unreadable {tag!r} message (altered stream)") from None
        return tag, obj


def _nonce(seq: int) -> bytes:
    return b"\0\0\0\0" + seq.to_bytes(8, "big")


class Sealer:
    """The sending side of the channel: one sequence number per record."""

    def __init__(self, key: bytes) -> None:
        self._gcm, self.seq = AESGCM(key), 0

    def seal(self, kind: bytes, payload: bytes) -> bytes:
        if len(payload) > RECORD_MAX:
            raise ValueError("record payload over RECORD_MAX")
        body = self._gcm.encrypt(_nonce(self.seq), kind + payload, _AAD)
        self.seq += 1
        return body


class Opener:
    def __init__(self, key: bytes, peer: str) -> None:
        self._gcm, self.seq, self.peer = AESGCM(key), 0, peer

    def open(self, body: bytes) -> tuple[bytes, bytes]:
        try:
            plain = self._gcm.decrypt(_nonce(self.seq), body, _AAD)
        except InvalidTag:
            raise TransferError(f"{self.peer}: record {self.seq} does not authenticate (altered, reordered, "
                                "replayed or not made for this host's TPM); nothing was changed") from None
        self.seq += 1
        return plain[:1], plain[1:]
