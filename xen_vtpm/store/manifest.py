"""Manifest: the versioned binary record of one checkpoint, MAC'd (docs/formats.md, "Checkpoint store" §2).

``encode`` is deterministic, so the MAC is over canonical bytes; ``parse`` accepts exactly what
``encode`` produces and turns every other input into one IntegrityError (it is fuzzed);
``decode`` checks the MAC before parsing anything.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import struct
from collections.abc import Iterable, Iterator
from typing import Any

from ..errors import IntegrityError, UsageError
from .chunks import ID_SIZE

MAGIC = b"XVTPMANI"
VERSION = 3                   # 3: the caller's checkpoint metadata is one opaque blob
MAX_METADATA = 1 << 20        # bounds the metadata blob a writer may set and a parser accepts
MAC_SIZE = 32
DIGEST_SIZE = 32
MAX_CHUNK = 16 << 20          # far above any chunker's max_size; bounds what a parser accepts
KIND_STREAM, KIND_BLOB = 1, 2
_KINDS = {KIND_STREAM: "stream", KIND_BLOB: "blob"}
_ZERO = bytes(DIGEST_SIZE)
CHUNK_ENTRY = struct.Struct(f"<{ID_SIZE}sI")
ROOT_LABEL = b"xen-vtpm stream root v2\0"


class ChunkList:
    """(chunk id, plaintext length) pairs in stream order, packed as in the manifest (36 bytes
    each): a 4 GiB guest has ~260,000 chunks, which as Python tuples would cost ~40 MiB."""

    __slots__ = ("raw",)

    def __init__(self, raw: bytes | bytearray | Iterable[tuple[bytes, int]] = b"") -> None:
        if not isinstance(raw, (bytes, bytearray)):
            raw = b"".join(CHUNK_ENTRY.pack(cid, ln) for cid, ln in raw)
        self.raw = bytes(raw)

    def __len__(self) -> int:
        return len(self.raw) // CHUNK_ENTRY.size

    def __iter__(self) -> Iterator[tuple[bytes, int]]:
        return CHUNK_ENTRY.iter_unpack(self.raw)

    def __getitem__(self, i: int) -> tuple[bytes, int]:
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return CHUNK_ENTRY.unpack_from(self.raw, (i % n) * CHUNK_ENTRY.size)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ChunkList):
            return self.raw == other.raw
        try:
            return tuple(self) == tuple(other)  # type: ignore[arg-type]
        except TypeError:
            return NotImplemented

    def __hash__(self) -> int:
        return hash(self.raw)

    def __repr__(self) -> str:
        return f"ChunkList({len(self)} chunks)"


class StreamRoot:
    """The stream root of format 2: SHA-256(ROOT_LABEL || per chunk in order: SHA-256(chunk) ||
    length u32).  It binds the exact byte stream as the chunk list does, from the digests the
    chunker (on write) or the id check (on verify) computes anyway: no extra pass over the data."""

    def __init__(self) -> None:
        self._h = hashlib.sha256(ROOT_LABEL)

    def add(self, sha256: bytes, length: int) -> None:
        self._h.update(sha256 + length.to_bytes(4, "little"))

    def digest(self) -> bytes:
        return self._h.digest()


@dataclasses.dataclass(frozen=True)
class StreamRecord:
    name: str
    kind: str                            # "stream" (tree root only) or "blob" (also a SHA-256)
    length: int
    tree_root: bytes                     # StreamRoot of the chunks
    sha256: bytes | None
    chunks: ChunkList                    # (chunk id, plaintext length) in stream order


@dataclasses.dataclass(frozen=True)
class Manifest:
    """What the store records about one checkpoint.  The catalog groups and names checkpoints
    per VM, hence vm_uuid and vm_name; everything else the caller binds to the checkpoint is
    ``metadata``, MAC'd with the rest but never parsed by the store."""
    checkpoint_id: str
    name: str
    vm_uuid: str
    vm_name: str
    tool_version: str
    created_us: int                       # Unix time in microseconds
    metadata: bytes                       # the caller's, opaque, at most MAX_METADATA bytes
    streams: tuple[StreamRecord, ...]

    def stream(self, name: str) -> StreamRecord:
        for rec in self.streams:
            if rec.name == name:
                return rec
        raise KeyError(name)

    @property
    def size(self) -> int:
        return sum(rec.length for rec in self.streams)


def encode(manifest: Manifest, mac_key: bytes) -> bytes:
    body = _encode_body(manifest)
    return body + hmac.digest(mac_key, body, "sha256")


def _count(fmt: str, n: int, what: str) -> bytes:
    try:
        return struct.pack(fmt, n)
    except struct.error:
        raise UsageError(f"manifest: {what} is too long ({n})") from None


def _prefixed(fmt: str, raw: bytes, what: str) -> bytes:
    return _count(fmt, len(raw), what) + raw


def _encode_body(m: Manifest) -> bytes:
    out = [MAGIC, struct.pack("<H", VERSION)]
    for what, text in (("checkpoint id", m.checkpoint_id), ("name", m.name), ("VM UUID", m.vm_uuid),
                       ("VM name", m.vm_name), ("tool version", m.tool_version)):
        out.append(_prefixed("<H", text.encode("utf-8"), what))
    out.append(struct.pack("<Q", m.created_us))
    if len(m.metadata) > MAX_METADATA:
        raise UsageError(f"manifest: metadata is too long ({len(m.metadata)} bytes, at most {MAX_METADATA})")
    out.append(_prefixed("<I", bytes(m.metadata), "metadata"))
    out.append(_count("<H", len(m.streams), "stream list"))
    for rec in m.streams:
        kind = KIND_BLOB if rec.kind == "blob" else KIND_STREAM
        out.append(_prefixed("<H", rec.name.encode("utf-8"), "stream name"))
        out.append(struct.pack("<BQ", kind, rec.length) + rec.tree_root + (rec.sha256 or _ZERO))
        chunks = rec.chunks if isinstance(rec.chunks, ChunkList) else ChunkList(rec.chunks)
        out.append(_count("<I", len(chunks), "chunk list"))
        out.append(chunks.raw)
    return b"".join(out)


def decode(data: bytes, mac_key: bytes, label: str) -> Manifest:
    """Check the MAC, then parse.  ``label`` names the checkpoint in errors."""
    if len(data) < MAC_SIZE or not hmac.compare_digest(
            hmac.digest(mac_key, data[:-MAC_SIZE], "sha256"), data[-MAC_SIZE:]):
        raise IntegrityError(f"checkpoint {label}: manifest MAC mismatch (tampered, truncated or another "
                             "host's key); do not use this checkpoint")
    return parse(data[:-MAC_SIZE], label)


class _Reader:
    def __init__(self, data: bytes, label: str) -> None:
        self.data, self.pos, self.label = data, 0, label

    def fail(self, what: str) -> IntegrityError:
        return IntegrityError(f"checkpoint {self.label}: manifest malformed: {what} at byte {self.pos}; "
                              "do not use this checkpoint")

    def take(self, n: int, what: str) -> bytes:
        if n > len(self.data) - self.pos:
            raise self.fail(f"{what} runs past the end")
        raw = self.data[self.pos:self.pos + n]
        self.pos += n
        return raw

    def unpack(self, fmt: str, what: str) -> tuple[Any, ...]:
        return struct.unpack(fmt, self.take(struct.calcsize(fmt), what))

    def text(self, what: str) -> str:
        (n,) = self.unpack("<H", what)
        try:
            return self.take(n, what).decode("utf-8")
        except UnicodeDecodeError:
            raise self.fail(f"{what} is not UTF-8") from None



def parse(body: bytes, label: str) -> Manifest:
    """Parse manifest bytes without the MAC; anything but canonical input raises IntegrityError."""
    r = _Reader(bytes(body), label)
    if r.take(len(MAGIC), "magic") != MAGIC:
        r.pos = 0
        raise r.fail("bad magic")
    (version,) = r.unpack("<H", "version")
    if version in (1, 2):
        raise IntegrityError(f"checkpoint {label}: manifest format version {version} comes from a pre-release "
                             f"xen-vtpm and is not read by this release (it reads version {VERSION}); delete the "
                             "checkpoint with `xen-vtpm delete` and take a new one")
    if version != VERSION:
        raise r.fail(f"unsupported version {version}")
    texts = [r.text(what) for what in ("checkpoint id", "name", "VM UUID", "VM name", "tool version")]
    (created_us,) = r.unpack("<Q", "creation time")
    (n,) = r.unpack("<I", "metadata length")
    if n > MAX_METADATA:
        raise r.fail(f"metadata length {n} exceeds {MAX_METADATA}")
    metadata = r.take(n, "metadata")
    (n_streams,) = r.unpack("<H", "stream count")
    streams: list[StreamRecord] = []
    for _ in range(n_streams):
        streams.append(_parse_stream(r))
    if len({s.name for s in streams}) != len(streams):
        raise r.fail("duplicate stream name")
    if r.pos != len(r.data):
        raise r.fail("trailing bytes")
    checkpoint_id, name, vm_uuid, vm_name, tool_version = texts
    return Manifest(checkpoint_id=checkpoint_id, name=name, vm_uuid=vm_uuid, vm_name=vm_name, tool_version=tool_version,
                    created_us=created_us, metadata=metadata, streams=tuple(streams))


def _parse_stream(r: _Reader) -> StreamRecord:
    name = r.text("stream name")
    if not name:
        raise r.fail("empty stream name")
    kind, length = r.unpack("<BQ", "stream kind and length")
    if kind not in _KINDS:
        raise r.fail(f"stream {name!r} has unknown kind {kind}")
    tree_root = r.take(DIGEST_SIZE, "tree root")
    digest = r.take(DIGEST_SIZE, "stream digest")
    if (kind == KIND_STREAM) != (digest == _ZERO):
        raise r.fail(f"stream {name!r} digest does not fit its kind")
    (count,) = r.unpack("<I", "chunk count")
    chunks = ChunkList(r.take(count * CHUNK_ENTRY.size, f"chunk list of {name!r}"))
    total = 0
    for i, (_, ln) in enumerate(chunks):
        if not 0 < ln <= MAX_CHUNK:
            raise r.fail(f"stream {name!r} chunk {i} has length {ln}")
        total += ln
    if total != length:
        raise r.fail(f"stream {name!r} chunks sum to {total}, not {length}")
    return StreamRecord(name=name, kind=_KINDS[kind], length=length, tree_root=tree_root,
                        sha256=digest if kind == KIND_BLOB else None, chunks=chunks)
