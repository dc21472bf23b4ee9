"""Wire formats of the vTPM manager: the vTPM <-> manager packets and the checkpoint requests.

Pure functions only (no I/O besides the packet reader helpers), so they can be fuzzed.

Packets follow the TPM 1.2 header of stubdom/vtpmmgr (docs/xen-internals.md §2.1): ``be16 tag ‖ be32 paramSize ‖
be32 ordinal-or-status`` then the body; paramSize counts the whole packet and the shared page limits
a packet to 4088 bytes (docs/xen-internals.md §10).  Checkpoint requests (docs/protocol.md) are XenStore nodes; this
module validates the strings read from them.
"""
from __future__ import annotations

import re
import struct
import uuid as uuidlib
from dataclasses import dataclass

HEADER = struct.Struct(">HII")
HEADER_SIZE = HEADER.size          # 10
MAX_PACKET = 4096 - 8              # one tpmif v2 page minus its 8-byte header

VTPM_TAG_REQ = 0x01C1
VTPM_TAG_REQ2 = 0x01C2
VTPM_TAG_RSP = 0x01C4

VTPM_ORD_SAVEHASHKEY = 1
VTPM_ORD_LOADHASHKEY = 2

TPM_SUCCESS = 0
TPM_AUTHFAIL = 1
TPM_BAD_PARAMETER = 3
TPM_DISABLED = 7
TPM_FAIL = 9
TPM_BAD_ORDINAL = 10
TPM_SIZE = 23
TPM_BADTAG = 30

HASHKEY_MIN = 52                   # SHA1[20] ‖ AES-256 key[32], what the stock vTPM stores
ENTRY_SIZE = 64


class ProtocolError(ValueError):
    """A packet that does not follow the framing."""


class RequestError(ValueError):
    """A checkpoint request that cannot be executed; str() is the text for the `error` node."""


@dataclass(frozen=True)
class Packet:
    tag: int
    code: int          # ordinal in a request, return code in a response
    body: bytes


def encode(tag: int, code: int, body: bytes = b"") -> bytes:
    size = HEADER_SIZE + len(body)
    if size > MAX_PACKET:
        raise ProtocolError(f"packet of {size} bytes does not fit the {MAX_PACKET}-byte shared page")
    return HEADER.pack(tag, size, code) + body


def decode(data: bytes) -> Packet:
    if len(data) < HEADER_SIZE:
        raise ProtocolError(f"packet of {len(data)} bytes is shorter than the 10-byte header")
    tag, size, code = HEADER.unpack_from(data)
    if size != len(data):
        raise ProtocolError(f"paramSize {size} does not match the packet length {len(data)}")
    if size > MAX_PACKET:
        raise ProtocolError(f"paramSize {size} exceeds the {MAX_PACKET}-byte shared page")
    return Packet(tag, code, bytes(data[HEADER_SIZE:]))


def packet_size(header: bytes) -> int:
    """Total length announced by a 10-byte header (validated), to read the rest of a packet."""
    _tag, size, _code = HEADER.unpack(header)
    if size < HEADER_SIZE or size > MAX_PACKET:
        raise ProtocolError(f"paramSize {size} outside 10..{MAX_PACKET}")
    return size


def response(status: int, body: bytes = b"") -> bytes:
    return encode(VTPM_TAG_RSP, status, body)


def save_hashkey_request(hashkey: bytes) -> bytes:
    return encode(VTPM_TAG_REQ, VTPM_ORD_SAVEHASHKEY, hashkey)


def load_hashkey_request() -> bytes:
    return encode(VTPM_TAG_REQ, VTPM_ORD_LOADHASHKEY)


def stored_reply(entry: bytes) -> bytes:
    """LOADHASHKEY body for a stored 64-byte entry: 52 bytes when the tail is zero, as the stock one."""
    if len(entry) != ENTRY_SIZE:
        raise ProtocolError(f"entry of {len(entry)} bytes, expected {ENTRY_SIZE}")
    return entry[:HASHKEY_MIN] if not any(entry[HASHKEY_MIN:]) else entry


def pad_entry(body: bytes) -> bytes:
    """SAVEHASHKEY body (52..64 bytes) as the zero-padded 64-byte entry; ProtocolError otherwise."""
    if not HASHKEY_MIN <= len(body) <= ENTRY_SIZE:
        raise ProtocolError(f"SAVEHASHKEY body of {len(body)} bytes outside {HASHKEY_MIN}..{ENTRY_SIZE}")
    return body + bytes(ENTRY_SIZE - len(body))


# --- checkpoint extension ----------------------------------------------------------------------

OPS = ("checkpoint", "restore", "discard")
REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")
_CANONICAL_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


@dataclass(frozen=True)
class CheckpointRequest:
    op: str
    uuid: bytes | None   # 16 bytes; optional for discard only
    checkpoint: bytes    # 16 bytes


def _show(value: str) -> str:
    """A node value quoted for an error message: one line, bounded, whatever bytes it held."""
    shown = repr(value[:40])
    return shown[:60] + ("..." if len(value) > 40 or len(shown) > 60 else "")


def parse_uuid(text: str | None, what: str) -> bytes:
    """A canonical lower-case 36-char UUID (the libxl format) as 16 bytes; RequestError otherwise."""
    if text is None:
        raise RequestError(f"missing field {what!r}")
    if not _CANONICAL_UUID.fullmatch(text):
        raise RequestError(f"field {what!r} is not a canonical lower-case UUID: {_show(text)}")
    return uuidlib.UUID(text).bytes


def format_uuid(raw: bytes) -> str:
    return str(uuidlib.UUID(bytes=raw))


def parse_request(fields: dict[str, str | None]) -> CheckpointRequest:
    """Validate the nodes of one request directory (values as read; None = node absent)."""
    state = fields.get("state")
    if state != "submitted":
        raise RequestError(f"request state is {'absent' if state is None else _show(state)}, expected 'submitted'")
    op = fields.get("op")
    if op is None:
        raise RequestError("missing field 'op'")
    if op not in OPS:
        raise RequestError(f"unknown op {_show(op)}; expected one of {', '.join(OPS)}")
    checkpoint = parse_uuid(fields.get("checkpoint"), "checkpoint")
    if op == "discard" and fields.get("uuid") is None:
        return CheckpointRequest(op, None, checkpoint)
    return CheckpointRequest(op, parse_uuid(fields.get("uuid"), "uuid"), checkpoint)


def valid_request_id(name: str) -> bool:
    return bool(REQUEST_ID.fullmatch(name))
