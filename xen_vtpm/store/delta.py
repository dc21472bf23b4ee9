"""Delta chunks: a new chunk of a memory stream stored as copies from full chunks of the parent
checkpoint plus the bytes that differ (format: docs/formats.md, "Checkpoint store" §0, "Delta chunks").

A delta keeps the chunk's id (the keyed digest of its full plaintext), so manifests, dedup and
references do not change; only how the chunk is sealed does.  Bases are always full chunks (depth
1): a parent chunk that is itself a delta is translated through its own segments.

The payload (the plaintext that is GCM-sealed, with associated data ``id || b"delta"``), little-endian:

    version u8 = 1 | base count u16 (1..16) | base ids (32 B each) | segment count u32 |
    segments: kind u8 (0 copy, 1 literal) | length u32 (>= 1) |
              copy: base index u16 | base offset u32;  literal: the bytes
"""
from __future__ import annotations

import collections
import struct
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Iterable
from typing import Any

from ..errors import IntegrityError
from .chunks import ID_SIZE
from .manifest import ChunkList

VERSION = 1
MAX_BASES = 16
COPY, LITERAL = 0, 1
COARSE = 4096        # compare in pages first ...
BLOCK = 256          # ... then the pages that differ in 256-byte blocks ...
FINE = 64            # ... and trim each differing run's ends to 64 bytes
_CACHE = 48          # decrypted parent chunks kept (neighbouring new chunks reuse them)

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


def equal_runs(new: bytes, old: bytes) -> list[tuple[int, int]]:
    """[a, b) ranges where ``new`` equals ``old`` (compared up to the shorter one), in blocks."""
    n = min(len(new), len(old))
    runs: list[list[int]] = []

    def mark(a: int, b: int) -> None:
        if runs and runs[-1][1] == a:
            runs[-1][1] = b
        else:
            runs.append([a, b])

    for i in range(0, n, COARSE):
        j = min(i + COARSE, n)
        if new[i:j] == old[i:j]:
            mark(i, j)
            continue
        for k in range(i, j, BLOCK):
            kk = min(k + BLOCK, j)
            if new[k:kk] == old[k:kk]:
                mark(k, kk)
            else:   # a differing block: its equal head joins the run before, its equal tail the run after
                a = k
                while a + FINE < kk and new[a:a + FINE] == old[a:a + FINE]:
                    a += FINE
                if a > k:
                    mark(k, a)
                b = kk
                while b - FINE > a and new[b - FINE:b] == old[b - FINE:b]:
                    b -= FINE
                if b < kk:
                    runs.append([b, kk])
    return [(a, b) for a, b in runs]


class ParentStream:
    """The parent checkpoint's stream: its chunk list and cumulative offsets (8 bytes per chunk)."""

    def __init__(self, checkpoint_id: str, chunks: ChunkList) -> None:
        self.checkpoint_id = checkpoint_id
        self.chunks = chunks
        self.starts = array("Q", [0])
        total = 0
        for _, length in chunks:
            total += length
            self.starts.append(total)
        self.length = total

    def span(self, start: int, end: int) -> range:
        """Indices of the parent chunks overlapping stream bytes [start, end)."""
        if start >= self.length or end <= start:
            return range(0)
        first = bisect_right(self.starts, start) - 1
        return range(first, min(bisect_left(self.starts, end), len(self.chunks)))

    def ids_for(self, ranges: Iterable[tuple[int, int]]) -> set[bytes]:
        return {self.chunks[k][0] for s, e in ranges for k in self.span(s, e)}


class _Unusable(Exception):
    """This chunk is stored whole (a base could not be located)."""


class DeltaEncoder:
    """Used on the sealing thread: turns a new chunk into a delta payload against the parent, or None.

    ``places`` (from the writer's thread, which owns the catalog connection) maps every parent chunk
    a batch needs, and the bases of those that are deltas, to (pack, offset, sealed length,
    plaintext length, delta flag)."""

    def __init__(self, parent: ParentStream, cipher: Any, packs: Any) -> None:
        self.parent = parent
        self._cipher = cipher
        self._packs = packs
        # id -> (plaintext, segments or None, {base id: base plaintext}); None segments = a full chunk
        self._cache: collections.OrderedDict[bytes, tuple[Any, ...]] = collections.OrderedDict()

    def _open(self, cid: bytes, places: dict[Any, Any], want_full: bool = False) -> tuple[Any, ...]:
        hit = self._cache.get(cid)
        if hit is not None:
            self._cache.move_to_end(cid)
            return hit
        place = places.get(cid)
        if place is None:
            raise _Unusable()
        pack, offset, sealed_len, plain_len, is_delta = place
        where = f"checkpoint {self.parent.checkpoint_id} (parent of a delta)"
        nonce, sealed = self._packs.read_entry(pack, offset, sealed_len, cid, where)
        if not is_delta:
            plain = self._cipher.decrypt(cid, nonce, sealed, where)
            if len(plain) != plain_len:
                raise _Unusable()
            entry: tuple[Any, ...] = (plain, None, {cid: plain})
        elif want_full:
            raise _Unusable()   # a base must be a full chunk
        else:
            payload = self._cipher.decrypt(cid, nonce, sealed, where, delta=True)
            base_ids, segs = decode(payload, plain_len, where)
            base_plain = [self._open(b, places, want_full=True)[0] for b in base_ids]
            plain = apply(payload, segs, base_plain, where)
            # Re-express the segments in this chunk's coordinates: (start, length, base id or None, base offset).
            mapped, pos = [], 0
            for kind, length, index, off in segs:
                mapped.append((pos, length, base_ids[index] if kind == COPY else None, off))
                pos += length
            entry = (plain, mapped, dict(zip(base_ids, base_plain, strict=True)))
        self._cache[cid] = entry
        while len(self._cache) > _CACHE:
            self._cache.popitem(last=False)
        return entry

    def encode(self, data: bytes, start: int, places: dict[Any, Any]) -> tuple[bytes, list[bytes]] | None:
        """(payload, base ids) if a delta saves at least half of the chunk, else None."""
        end = start + len(data)
        span = self.parent.span(start, end)
        if not span:
            return None
        try:
            sources = []   # (stream start of the parent chunk, its cache entry)
            for k in span:
                pid, _ = self.parent.chunks[k]
                sources.append((self.parent.starts[k], pid, self._open(pid, places)))
        except (_Unusable, IntegrityError):
            return None   # a damaged or vanished parent only costs the saving; verify reports it
        old = b"".join(entry[0][max(start, ps) - ps:min(end, ps + len(entry[0])) - ps]
                       for ps, _, entry in sources)
        runs = equal_runs(data, old)
        if sum(b - a for a, b in runs) * 2 < len(data):
            return None
        segs: list[list[Any]] = []   # [kind, length, base id (copy), offset (base for copy, chunk for literal)]
        used: dict[bytes, bytes] = {}

        def add(kind: int, length: int, base: bytes | None, offset: int) -> None:
            if segs:
                last = segs[-1]
                if last[0] == kind and last[2] == base and last[3] + last[1] == offset:
                    last[1] += length
                    return
            segs.append([kind, length, base, offset])

        pos = 0
        for a, b in runs:
            if a > pos:
                add(LITERAL, a - pos, None, pos)
            x, y = start + a, start + b
            for ps, pid, (plain, mapped, bases) in sources:
                lo, hi = max(x, ps) - ps, min(y, ps + len(plain)) - ps
                if lo >= hi:
                    continue
                if mapped is None:
                    add(COPY, hi - lo, pid, lo)
                    used[pid] = plain
                    continue
                i = bisect_right(mapped, (lo, 1 << 62)) - 1
                while i < len(mapped) and mapped[i][0] < hi:
                    mstart, mlen, base, boff = mapped[i]
                    s0, s1 = max(lo, mstart), min(hi, mstart + mlen)
                    if s0 < s1:
                        if base is None:
                            add(LITERAL, s1 - s0, None, ps + s0 - start)
                        else:
                            add(COPY, s1 - s0, base, boff + s0 - mstart)
                            used[base] = bases[base]
                    i += 1
            pos = b
        if pos < len(data):
            add(LITERAL, len(data) - pos, None, pos)
        weight: dict[bytes, int] = collections.Counter()
        for kind, length, base, _ in segs:
            if kind == COPY:
                weight[base] += length
        if not weight:
            return None
        keep = sorted(weight, key=lambda b: (-weight[b], b))[:MAX_BASES]
        if len(keep) < len(weight):   # too many bases: the least used become literals
            kept, old_segs, segs, pos = set(keep), segs, [], 0
            for kind, length, base, offset in old_segs:
                if kind == COPY and base not in kept:
                    add(LITERAL, length, None, pos)
                else:
                    add(kind, length, base, offset if kind == COPY else pos)
                pos += length
        index = {b: i for i, b in enumerate(keep)}
        final = [(kind, length, index[base] if kind == COPY else 0, offset) for kind, length, base, offset in segs]
        if encoded_size(len(keep), final) * 2 > len(data):
            return None
        payload = encode(keep, final, data)
        # Belt and braces: the delta must rebuild the chunk from exactly the bases it names.
        _, check = decode(payload, len(data), "delta check")
        if apply(payload, check, [used[b] for b in keep], "delta check") != data:
            return None
        return payload, keep
