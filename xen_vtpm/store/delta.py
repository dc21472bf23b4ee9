"""Delta chunks: a new chunk of a memory stream stored as copies from full chunks of the parent
checkpoint plus the bytes that differ (format: docs/formats.md, "Checkpoint store" §0, "Delta chunks").

A delta keeps the chunk's id (the keyed digest of its full plaintext), so manifests, dedup and
references do not change; only how the chunk is sealed does.  Bases are always full chunks (depth
1): a parent chunk that is itself a delta is translated through its own segments.  The ingest
pipeline's workers make deltas (cext/delta.c); this module reads them, and ``encode`` builds payloads
for the tests and the fuzzer.

The payload (the plaintext that is GCM-sealed, with associated data ``id || b"delta"``), little-endian:

    version u8 = 1 | base count u16 (1..16) | base ids (32 B each) | segment count u32 |
    segments: kind u8 (0 copy, 1 literal) | length u32 (>= 1) |
              copy: base index u16 | base offset u32;  literal: the bytes
"""
from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Any

from ..errors import IntegrityError
from .chunks import ID_SIZE

VERSION = 1
MAX_BASES = 16
COPY, LITERAL = 0, 1

_HEAD = struct.Struct("<BH")
_COUNT = struct.Struct("<I")
_SEG = struct.Struct("<BI")
_COPY = struct.Struct("<HI")

# A segment: (kind, length, base index or base id, offset) - the offset is in the base for a copy,
# in the chunk (encoding) or the payload (decoding) for a literal.
Segment = tuple[Any, ...]


def encode(base_ids: list[bytes], segments: list[Segment], data: bytes) -> bytes:
    """The payload of ``data`` as ``segments`` (copies name a base by its index in ``base_ids``)."""
    out = bytearray(_HEAD.pack(VERSION, len(base_ids)))
    for bid in base_ids:
        out += bid
    out += _COUNT.pack(len(segments))
    for kind, length, index, offset in segments:
        out += _SEG.pack(kind, length)
        if kind == COPY:
            out += _COPY.pack(index, offset)
        else:
            out += data[offset:offset + length]
    return bytes(out)


def encoded_size(bases: int, segments: Iterable[Segment]) -> int:
    size = _HEAD.size + bases * ID_SIZE + _COUNT.size
    for kind, length, _, _ in segments:
        size += _SEG.size + (_COPY.size if kind == COPY else length)
    return size


def decode(payload: bytes, plain_len: int, where: str) -> tuple[list[bytes], list[Segment]]:
    """(base ids, segments) of a payload; every bound checked, lengths must add up to ``plain_len``."""
    def bad(what: str, at: int) -> IntegrityError:
        return IntegrityError(f"{where}: delta chunk malformed: {what} at byte {at}; "
                              "the store was altered — do not use this checkpoint")

    n = len(payload)
    if n < _HEAD.size:
        raise bad("truncated header", 0)
    version, nbases = _HEAD.unpack_from(payload, 0)
    if version != VERSION:
        raise bad(f"unsupported version {version}", 0)
    if not 1 <= nbases <= MAX_BASES:
        raise bad(f"base count {nbases}", 1)
    pos = _HEAD.size
    if pos + nbases * ID_SIZE + _COUNT.size > n:
        raise bad("truncated base list", pos)
    bases = [payload[pos + i * ID_SIZE:pos + (i + 1) * ID_SIZE] for i in range(nbases)]
    if len(set(bases)) != nbases:
        raise bad("repeated base", pos)
    pos += nbases * ID_SIZE
    count, = _COUNT.unpack_from(payload, pos)
    pos += _COUNT.size
    if count > plain_len:
        raise bad(f"segment count {count}", pos - _COUNT.size)
    segments: list[Segment] = []
    total = 0
    for _ in range(count):
        if pos + _SEG.size > n:
            raise bad("truncated segment", pos)
        kind, length = _SEG.unpack_from(payload, pos)
        if kind not in (COPY, LITERAL) or length == 0:
            raise bad(f"segment kind {kind} length {length}", pos)
        pos += _SEG.size
        total += length
        if total > plain_len:
            raise bad("segments longer than the chunk", pos)
        if kind == COPY:
            if pos + _COPY.size > n:
                raise bad("truncated copy", pos)
            index, offset = _COPY.unpack_from(payload, pos)
            if index >= nbases:
                raise bad(f"base index {index}", pos)
            segments.append((COPY, length, index, offset))
            pos += _COPY.size
        else:
            if pos + length > n:
                raise bad("truncated literal", pos)
            segments.append((LITERAL, length, 0, pos))
            pos += length
    if pos != n:
        raise bad("trailing bytes", pos)
    if total != plain_len:
        raise bad(f"segments add up to {total}, the chunk has {plain_len}", pos)
    return bases, segments


def apply(payload: bytes, segments: list[Segment], base_plain: list[bytes], where: str) -> bytes:
    """Assemble a decoded delta from its bases' plaintexts (copies checked against each base's length)."""
    out = bytearray()
    for kind, length, index, offset in segments:
        if kind == COPY:
            base = base_plain[index]
            if offset + length > len(base):
                raise IntegrityError(f"{where}: delta chunk copies {length} bytes at {offset} from a base of "
                                     f"{len(base)} bytes; the store was altered — do not use this checkpoint")
            out += memoryview(base)[offset:offset + length]
        else:
            out += memoryview(payload)[offset:offset + length]
    return bytes(out)
