"""Fuzz target: the delta-chunk decoder (xen_vtpm.store.delta.decode / apply) -> IntegrityError.

A delta payload is authenticated (GCM) before it is decoded, so a forger cannot reach ``decode``;
it is fuzzed anyway because it must never read out of range, and because it claims to accept
exactly what ``encode`` produces: any accepted input rebuilds a chunk of the stated length that
re-encodes to the same bytes.  Input: the chunk's plaintext length (u32, little-endian), then
the payload.
"""
from __future__ import annotations

import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm.errors import IntegrityError
    from xen_vtpm.store import delta

_LEN = struct.Struct("<I")
_BASE_SIZE = 4096


def _base(i: int) -> bytes:
    return bytes((i * 37 + k) & 0xFF for k in range(_BASE_SIZE))


def seeds() -> list[bytes]:
    ids = [bytes([i]) * 32 for i in range(3)]
    out = []
    for segments, data in (
            ([(delta.COPY, 100, 0, 0), (delta.LITERAL, 5, 0, 100), (delta.COPY, 50, 1, 200)], bytes(155)),
            ([(delta.LITERAL, 10, 0, 0)], b"0123456789"),
            ([(delta.COPY, 4096, 2, 0)], bytes(4096))):
        bases = ids[:max(s[2] for s in segments) + 1]
        out.append(_LEN.pack(len(data)) + delta.encode(bases, segments, data))
    return out


def check(data: bytes) -> bool:
    if len(data) < _LEN.size:
        return False
    plain_len, payload = _LEN.unpack_from(data)[0], data[_LEN.size:]
    try:
        bases, segments = delta.decode(payload, plain_len, "fuzz")
        chunk = delta.apply(payload, segments, [_base(i) for i in range(len(bases))], "fuzz")
    except IntegrityError as exc:
        harness.expect(exc)
        return False
    assert len(chunk) == plain_len, "a delta rebuilt a chunk of another length than it states"
    pos, in_chunk = 0, []
    for kind, length, index, offset in segments:   # literals back in the chunk's coordinates
        in_chunk.append((kind, length, index, offset if kind == delta.COPY else pos))
        pos += length
    assert delta.encode(bases, in_chunk, chunk) == payload, "accepted a delta that is not in canonical form"
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
