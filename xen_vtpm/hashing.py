"""State hashing: the Merkle root of an image and its content-defined chunks.

The C extension (``xen_vtpm._hashing``, sources in cext/) does the work on all cores with the GIL
released; this module is its only Python face and also holds pure-Python reference versions
(``py_tree_hash``, ``PyChunker``, ``PyStreamTreeHash``) that define the results byte for byte.
The constructions are specified in docs/formats.md, "State hashing".
"""
from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Iterator, Sequence
from typing import BinaryIO, NamedTuple

from ._hashing import ffi, lib
from .errors import HashSourceError

__all__ = [
    "Chunk", "Chunker", "ChunkAndTree", "StreamTreeHash", "tree_hash", "sha256_many", "SHA256_ENGINE",
    "PyChunker", "PyStreamTreeHash", "py_tree_hash", "gear_table",
    "DEFAULT_LEAF", "DEFAULT_MIN", "DEFAULT_AVG", "DEFAULT_MAX",
]

DEFAULT_LEAF = 1 << 20
DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX = 16 << 10, 64 << 10, 256 << 10
LEAF_MIN, LEAF_MAX = 64, 64 << 20
_READ_SIZE = 1 << 20
_GEAR_LABEL = b"xen-vtpm gear v1"


class Chunk(NamedTuple):
    offset: int        # stream offset of the first byte
    length: int
    digest: bytes      # SHA-256 of data
    data: bytes


# --------------------------------------------------------------------------- parameters

def _check_leaf(leaf_size: int) -> int:
    if (not isinstance(leaf_size, int) or leaf_size < LEAF_MIN or leaf_size > LEAF_MAX
            or leaf_size & (leaf_size - 1)):
        raise ValueError(f"leaf size {leaf_size!r}: must be a power of two from {LEAF_MIN} to {LEAF_MAX}; "
                         f"use the default {DEFAULT_LEAF}")
    return leaf_size


def _check_chunk_sizes(min_size: int, avg_size: int, max_size: int) -> None:
    ok = all(isinstance(v, int) for v in (min_size, avg_size, max_size))
    ok = ok and 64 <= min_size < avg_size < max_size <= LEAF_MAX
    ok = ok and avg_size >= 256 and not avg_size & (avg_size - 1)
    if not ok:
        raise ValueError(f"chunk sizes min={min_size!r} avg={avg_size!r} max={max_size!r}: need "
                         f"64 <= min < avg < max <= {LEAF_MAX} with avg a power of two >= 256; "
                         f"use the defaults {DEFAULT_MIN}/{DEFAULT_AVG}/{DEFAULT_MAX}")


_CORES = max(1, len(os.sched_getaffinity(0)))


def _threads(threads: int | None) -> int:
    if threads is None:
        return _CORES
    if not isinstance(threads, int) or threads < 1:
        raise ValueError(f"threads {threads!r}: must be a positive integer or None (all cores)")
    return threads


def _raise_for(rc: int, what: str, err_errno: int = 0) -> None:
    if rc == lib.XV_OK:
        return
    if rc == lib.XV_ECHANGED:
        raise HashSourceError(f"{what}: changed size while it was being hashed; "
                              "hash it again once nothing writes to it")
    if rc == lib.XV_EMMAP:
        raise HashSourceError(f"{what}: cannot map it ({os.strerror(err_errno)}); check the file")
    if rc == lib.XV_ENOMEM:
        raise MemoryError(f"{what}: out of memory while hashing")
    if rc == lib.XV_ESTATE:
        raise ValueError(f"{what}: already finished; start a new one")
    raise RuntimeError(f"{what}: hashing engine failed (code {rc}); this is a bug, please report it")


SHA256_ENGINE: str = ffi.string(lib.xv_sha256_engine()).decode()
"""How the C code computes SHA-256 here: "sha-ni, 4 lanes" or "libcrypto"."""

# --------------------------------------------------------------------------- SHA-256 of many messages

def sha256_many(messages: Sequence[bytes | bytearray | memoryview], prefix: int | None = None) -> list[bytes]:
    """SHA-256 of each message (preceded by the byte ``prefix``, if given), several at once per core."""
    if prefix is not None and not 0 <= prefix <= 255:
        raise ValueError(f"sha256_many: prefix must be a byte value, not {prefix}")
    keep = [ffi.from_buffer(m) for m in messages]
    out = ffi.new("unsigned char[]", 32 * len(keep) or 1)
    rc = lib.xv_sha256_batch(len(keep), ffi.new("const unsigned char *[]", keep),
                             ffi.new("size_t[]", [len(b) for b in keep]), -1 if prefix is None else prefix, out)
    _raise_for(rc, "sha256_many")
    digest = ffi.buffer(out)
    return [bytes(digest[32 * i:32 * i + 32]) for i in range(len(keep))]


# --------------------------------------------------------------------------- tree hash

def tree_hash(source: str | os.PathLike | bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF,
              *, threads: int | None = None) -> bytes:
    """Merkle root (32 bytes) of a regular file (``str``/``PathLike``) or of a buffer (anything else).

    Leaves are hashed on ``threads`` cores (default: all) with the GIL released; files are mapped in
    bounded windows.  A file that changes size while it is hashed raises HashSourceError.
    """
    _check_leaf(leaf_size)
    n = _threads(threads)
    out = ffi.new("unsigned char[32]")
    if isinstance(source, (str, os.PathLike)):
        _tree_hash_file(os.fspath(source), leaf_size, n, out)
    else:
        view = memoryview(source)
        if not view.contiguous:
            raise ValueError("tree_hash: the buffer is not contiguous; pass bytes or a contiguous buffer")
        with view.cast("B") if view.format != "B" or view.ndim != 1 else view as flat:
            rc = lib.xv_tree_hash_buf(ffi.from_buffer(flat), len(flat), leaf_size, n, out)
        _raise_for(rc, "buffer")
    return bytes(out)


def _tree_hash_file(path: str, leaf_size: int, threads: int, out) -> None:
    try:
        # O_NONBLOCK: opening a fifo must not hang; it is rejected below as not a regular file.
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError as e:
        raise HashSourceError(f"{path}: no such file; check the path") from e
    except PermissionError as e:
        raise HashSourceError(f"{path}: permission denied; run as a user who can read it") from e
    except OSError as e:
        raise HashSourceError(f"{path}: cannot open ({e.strerror}); check the path") from e
    try:
        before = os.fstat(fd)
        if stat.S_ISDIR(before.st_mode):
            raise HashSourceError(f"{path}: is a directory; pass a regular file")
        if not stat.S_ISREG(before.st_mode):
            raise HashSourceError(f"{path}: not a regular file; hash a pipe or device with StreamTreeHash")
        err = ffi.new("int *")
        rc = lib.xv_tree_hash_fd(fd, before.st_size, leaf_size, threads, out, err)
        _raise_for(rc, path, err[0])
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise HashSourceError(f"{path}: changed while it was being hashed; "
                                  "hash it again once nothing writes to it")
    finally:
        os.close(fd)


# --------------------------------------------------------------------------- streaming engine

class _Stream:
    """One C stream: content-defined chunks and/or the Merkle root of everything fed.

    Like a hashlib object, one stream is fed by one thread at a time.
    """

    def __init__(self, label: str, *, chunking: bool, sizes: tuple[int, int, int], tree: bool,
                 leaf_size: int, threads: int | None) -> None:
        self._label = label
        workers = _threads(threads) - 1
        ptr = lib.xv_stream_new(int(chunking), *sizes, int(tree), leaf_size, workers)
        if ptr == ffi.NULL:
            raise MemoryError(f"{label}: cannot allocate the hashing engine")
        self._s = ffi.gc(ptr, lib.xv_stream_free)
        self._out = ffi.new("xv_chunk[]", lib.xv_stream_max_out(ptr))
        self._nout = ffi.new("size_t *")
        self._got = ffi.new("size_t *")
        self._rc = ffi.new("int *")
        self._finished = False

    def _space(self, want: int):
        p = lib.xv_stream_space(self._s, want, self._got, self._rc)
        if p == ffi.NULL:
            _raise_for(self._rc[0], self._label)
        return p

    def _commit(self, n: int, final: bool, chunks: list[Chunk]) -> None:
        rc = lib.xv_stream_commit(self._s, n, int(final), self._out, self._nout)
        _raise_for(rc, self._label)
        out = self._out
        for i in range(self._nout[0]):
            c = out[i]
            chunks.append(Chunk(c.offset, c.length, bytes(ffi.buffer(c.digest)),
                                bytes(ffi.buffer(c.data, c.length))))

    def _check_open(self) -> None:
        if self._finished:
            raise ValueError(f"{self._label}: already finished; start a new one")

    def _feed(self, data) -> list[Chunk]:
        self._check_open()
        chunks: list[Chunk] = []
        with memoryview(data) as view, view.cast("B") if view.format != "B" or view.ndim != 1 else view as mv:
            pos, n = 0, len(mv)
            while pos < n:
                p = self._space(n - pos)
                k = self._got[0]
                ffi.memmove(p, mv[pos:pos + k], k)
                self._commit(k, False, chunks)
                pos += k
        return chunks

    def _finish(self) -> list[Chunk]:
        self._check_open()
        chunks: list[Chunk] = []
        self._commit(0, True, chunks)
        self._finished = True
        return chunks

    def _consume(self, f: BinaryIO | int) -> Iterator[Chunk]:
        """Read ``f`` (a binary file object or fd) to EOF straight into the engine's buffer."""
        self._check_open()
        fd = f if isinstance(f, int) else None
        while True:
            chunks: list[Chunk] = []
            p = self._space(_READ_SIZE)
            buf = ffi.buffer(p, self._got[0])
            n = os.readv(fd, [buf]) if fd is not None else f.readinto(buf)
            if n is None:
                raise BlockingIOError(f"{self._label}: the source is non-blocking and has no data; "
                                      "pass a blocking file")
            if n == 0:
                yield from chunks
                yield from self._finish()
                return
            self._commit(n, False, chunks)
            yield from chunks

    def _root(self) -> bytes:
        out = ffi.new("unsigned char[32]")
        _raise_for(lib.xv_stream_root(self._s, out), self._label)
        return bytes(out)


class Chunker(_Stream):
    """Content-defined chunks (gear hash, normalized FastCDC-style) of a stream fed in pieces.

    ``feed(data)`` and ``finish()`` return the chunks completed so far, in order, each with its
    SHA-256; boundaries do not depend on how the stream is split.  Boundary scanning runs in the
    calling thread while worker threads hash earlier chunks.
    """

    def __init__(self, min_size: int = DEFAULT_MIN, avg_size: int = DEFAULT_AVG,
                 max_size: int = DEFAULT_MAX, *, threads: int | None = None) -> None:
        _check_chunk_sizes(min_size, avg_size, max_size)
        super().__init__("Chunker", chunking=True, sizes=(min_size, avg_size, max_size), tree=False,
                         leaf_size=0, threads=threads)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        return self._feed(data)

    def finish(self) -> list[Chunk]:
        return self._finish()

    def consume(self, f: BinaryIO | int) -> Iterator[Chunk]:
        """All chunks of ``f`` read to EOF (a pipe or fifo works), then finished."""
        return self._consume(f)


class StreamTreeHash(_Stream):
    """``tree_hash`` of a stream fed in pieces (e.g. a fifo, which cannot be mapped).

    ``digest()`` ends the stream: later ``update()`` calls raise ValueError.
    """

    def __init__(self, leaf_size: int = DEFAULT_LEAF, *, threads: int | None = None) -> None:
        super().__init__("StreamTreeHash", chunking=False, sizes=(0, 0, 0), tree=True,
                         leaf_size=_check_leaf(leaf_size), threads=threads)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._feed(data)

    def digest(self) -> bytes:
        if not self._finished:
            self._finish()
        return self._root()


class ChunkAndTree(Chunker):
    """One pass over a stream yields its chunks and its Merkle root (``== tree_hash`` of the bytes).

    Both share one buffer and one pool of threads, so a fifo from ``xl save`` is read exactly once.
    """

    def __init__(self, leaf_size: int = DEFAULT_LEAF, min_size: int = DEFAULT_MIN,
                 avg_size: int = DEFAULT_AVG, max_size: int = DEFAULT_MAX, *,
                 threads: int | None = None) -> None:
        _check_chunk_sizes(min_size, avg_size, max_size)
        _Stream.__init__(self, "ChunkAndTree", chunking=True, sizes=(min_size, avg_size, max_size), tree=True,
                         leaf_size=_check_leaf(leaf_size), threads=threads)

    def digest(self) -> bytes:
        """The Merkle root; valid after ``finish()`` (or after ``consume`` is exhausted)."""
        return self._root()


# --------------------------------------------------------------------------- pure-Python reference

def _sha(*parts: bytes) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def _final(top: bytes, length: int, leaf_size: int) -> bytes:
    return _sha(b"\x02", length.to_bytes(8, "big"), leaf_size.to_bytes(4, "big"), top)


def py_tree_hash(data: bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF) -> bytes:
    """Reference Merkle root, level by level (the C code and PyStreamTreeHash use a stack)."""
    _check_leaf(leaf_size)
    data = bytes(data)
    level = [_sha(b"\x00", data[i:i + leaf_size]) for i in range(0, max(len(data), 1), leaf_size)]
    while len(level) > 1:
        nxt = [_sha(b"\x01", level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])     # an odd node moves up unchanged
        level = nxt
    return _final(level[0], len(data), leaf_size)


class PyStreamTreeHash:
    """Reference streaming Merkle root: a stack of perfect subtrees, folded right to left at the end."""

    def __init__(self, leaf_size: int = DEFAULT_LEAF) -> None:
        self._leaf = _check_leaf(leaf_size)
        self._pending = bytearray()
        self._stack: list[tuple[bytes, int]] = []
        self._length = 0
        self._root: bytes | None = None

    def _push(self, h: bytes) -> None:
        size = 1
        while self._stack and self._stack[-1][1] == size:
            left, _ = self._stack.pop()
            h, size = _sha(b"\x01", left, h), size * 2
        self._stack.append((h, size))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._root is not None:
            raise ValueError("PyStreamTreeHash: already finished; start a new one")
        self._pending += data
        self._length += len(data)
        while len(self._pending) >= self._leaf:
            self._push(_sha(b"\x00", self._pending[:self._leaf]))
            del self._pending[:self._leaf]

    def digest(self) -> bytes:
        if self._root is None:
            if self._pending or not self._length:
                self._push(_sha(b"\x00", self._pending))
            acc = self._stack[-1][0]
            for h, _ in reversed(self._stack[:-1]):
                acc = _sha(b"\x01", h, acc)
            self._root = _final(acc, self._length, self._leaf)
        return self._root


def gear_table() -> list[int]:
    """The chunker's 256 gear values: first 8 bytes (little-endian) of SHA-256(label || i)."""
    return [int.from_bytes(_sha(_GEAR_LABEL, bytes([i]))[:8], "little") for i in range(256)]


class PyChunker:
    """Reference content-defined chunker; same API and results as Chunker."""

    def __init__(self, min_size: int = DEFAULT_MIN, avg_size: int = DEFAULT_AVG,
                 max_size: int = DEFAULT_MAX) -> None:
        _check_chunk_sizes(min_size, avg_size, max_size)
        self.min, self.avg, self.max = min_size, avg_size, max_size
        bits = avg_size.bit_length() - 1
        self._mask_s = _top_bits(bits + 2)
        self._mask_l = _top_bits(bits - 2)
        self._gear = gear_table()
        self._buf = bytearray()
        self._offset = 0
        self._finished = False

    def cut(self, data: bytes | bytearray, final: bool = False) -> int:
        """Length of the chunk at the start of ``data`` (0 if more data is needed to decide)."""
        n = len(data)
        if n < self.max and not final:
            return 0
        if n <= self.min:
            return n
        end = min(n, self.max)
        normal = min(self.avg, end)
        h, gear, m64 = 0, self._gear, (1 << 64) - 1
        for i in range(self.min, end):
            h = ((h << 1) + gear[data[i]]) & m64
            if not h & (self._mask_s if i < normal else self._mask_l):
                return i + 1
        return end

    def _emit(self, final: bool) -> list[Chunk]:
        out = []
        while self._buf:
            n = self.cut(self._buf, final)
            if not n:
                break
            data = bytes(self._buf[:n])
            del self._buf[:n]
            out.append(Chunk(self._offset, n, _sha(data), data))
            self._offset += n
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        if self._finished:
            raise ValueError("PyChunker: already finished; start a new one")
        self._buf += data
        return self._emit(False)

    def finish(self) -> list[Chunk]:
        if self._finished:
            raise ValueError("PyChunker: already finished; start a new one")
        self._finished = True
        return self._emit(True)


def _top_bits(n: int) -> int:
    return ((1 << n) - 1) << (64 - n)
