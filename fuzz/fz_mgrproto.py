"""Fuzz target: the vTPM manager's wire formats (xen_vtpm_sim.mgrproto).

First input byte < 0x80: the rest is a vTPM <-> manager packet for ``decode``/``packet_size``
(-> ProtocolError) and, when it decodes, a SAVEHASHKEY body for ``pad_entry``.
Otherwise: the rest is a checkpoint request, NUL-separated: the values of its nodes state, op,
checkpoint, uuid (one 0x7f byte = node absent), decoded as the XenStore client decodes
values, then the request id (its directory name); ``parse_request`` must return or raise
RequestError, and the request id check must accept only names of the documented characters.
"""
from __future__ import annotations

import re
import sys
import uuid as uuidlib
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm_sim import mgrproto as mp

PACKET, REQUEST = b"\x00", b"\x80"
FIELDS = ("state", "op", "checkpoint", "uuid")
ABSENT = b"\x7f"
_REQUEST_ID = re.compile(r"[A-Za-z0-9_.-]{1,64}")   # docs/protocol.md, checked independently of mgrproto
CKPT = "5b0e7c1d-2a3f-4b6c-8d9e-0f1a2b3c4d5e"
VTPM = "0d3c5b7a-9e1f-4a2b-8c3d-4e5f60718293"


def request_bytes(state: str | None, op: str | None, checkpoint: str | None, vtpm: str | None) -> bytes:
    values = (state, op, checkpoint, vtpm)
    rid = uuidlib.uuid5(uuidlib.NAMESPACE_OID, repr(values)).hex   # the tool names requests uuid4().hex
    return REQUEST + b"\0".join(ABSENT if v is None else v.encode() for v in values) + b"\0" + rid.encode()


def seeds() -> list[bytes]:
    """What the stub domain and the manager send, and what the tool writes as requests."""
    entry = bytes(range(52)) + bytes(12)
    return [
        PACKET + mp.save_hashkey_request(bytes(range(52))),
        PACKET + mp.save_hashkey_request(bytes(range(64))),
        PACKET + mp.load_hashkey_request(),
        PACKET + mp.response(mp.TPM_SUCCESS, mp.stored_reply(entry)),
        PACKET + mp.response(mp.TPM_BAD_PARAMETER),
        request_bytes("submitted", "checkpoint", CKPT, VTPM),
        request_bytes("submitted", "restore", CKPT, VTPM),
        request_bytes("submitted", "discard", CKPT, None),
        request_bytes("submitted", "discard", CKPT, VTPM),
    ]


def fields_of(raw: bytes) -> tuple[dict[str, str | None], str]:
    parts = raw.split(b"\0", len(FIELDS))
    out: dict[str, str | None] = {}
    for i, key in enumerate(FIELDS):
        value = parts[i] if i < len(parts) else ABSENT
        # xen_vtpm.xen.xenstore decodes values with surrogateescape: any bytes reach the parser.
        out[key] = None if value == ABSENT else value.decode("utf-8", "surrogateescape")
    rid = parts[len(FIELDS)] if len(parts) > len(FIELDS) else b""
    return out, rid.decode("utf-8", "surrogateescape")


def _check_packet(data: bytes) -> bool:
    if len(data) >= mp.HEADER_SIZE:
        try:
            size = mp.packet_size(data[:mp.HEADER_SIZE])
        except mp.ProtocolError as exc:
            harness.expect(exc)
        else:
            assert mp.HEADER_SIZE <= size <= mp.MAX_PACKET
    try:
        packet = mp.decode(data)
    except mp.ProtocolError as exc:
        harness.expect(exc)
        return False
    assert mp.encode(packet.tag, packet.code, packet.body) == data
    try:
        entry = mp.pad_entry(packet.body)
    except mp.ProtocolError as exc:
        harness.expect(exc)
    else:
        # LOADHASHKEY may drop a zero tail (52 bytes, as the stock manager), never anything else.
        assert len(entry) == mp.ENTRY_SIZE and entry.startswith(packet.body), "pad_entry changed the body"
        assert mp.stored_reply(entry).ljust(mp.ENTRY_SIZE, b"\0") == entry, "stored_reply lost data"
    return True


def _check_request(data: bytes) -> bool:
    fields, rid = fields_of(data)
    assert mp.valid_request_id(rid) == bool(_REQUEST_ID.fullmatch(rid)), f"request id check wrong for {rid!r}"
    try:
        req = mp.parse_request(fields)
    except mp.RequestError as exc:
        harness.expect(exc)
        return False
    assert req.op in mp.OPS
    assert mp.format_uuid(req.checkpoint) == fields["checkpoint"], "non-canonical checkpoint id accepted"
    if req.uuid is None:
        assert req.op == "discard" and fields["uuid"] is None
    else:
        assert mp.format_uuid(req.uuid) == fields["uuid"], "non-canonical vTPM uuid accepted"
    return True


def check(data: bytes) -> bool:
    if not data:
        return False
    return _check_packet(data[1:]) if data[0] < 0x80 else _check_request(data[1:])


if __name__ == "__main__":
    harness.main(check, seeds)
