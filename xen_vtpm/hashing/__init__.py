"""State hashing: the Merkle root of an image and its content-defined chunks.

The C extension (``xen_vtpm._hashing``, sources in cext/) does the work on all cores with the GIL
released; this package is its only Python face.  ``_reference`` holds the pure-Python versions
(``py_tree_hash``, ``PyChunker``, ``PyStreamTreeHash``) that define the results byte for byte.
The constructions are specified in docs/formats.md, "State hashing".
"""
from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence

from .._hashing import ffi, lib
from ..errors import HashSourceError
from ._native import Stream, check, engine_name, threads_arg
from ._reference import PyChunker, PyStreamTreeHash, gear_table, py_tree_hash
from ._spec import DEFAULT_AVG, DEFAULT_LEAF, DEFAULT_MAX, DEFAULT_MIN, Chunk, Readable, check_chunk_sizes, check_leaf

__all__ = [
    "Readable",
    "Chunk", "Chunker", "ChunkAndTree", "StreamTreeHash", "tree_hash", "sha256_many", "SHA256_ENGINE",
    "PyChunker", "PyStreamTreeHash", "py_tree_hash", "gear_table",
    "DEFAULT_LEAF", "DEFAULT_MIN", "DEFAULT_AVG", "DEFAULT_MAX",
]

SHA256_ENGINE: str = engine_name()
"""How the C code computes SHA-256 in this process: "sha-ni, 4 lanes" or "libcrypto"."""


def sha256_many(messages: Sequence[bytes | bytearray | memoryview], prefix: int | None = None) -> list[bytes]:
    """SHA-256 of each message (preceded by the byte ``prefix``, if given), several at once per core."""
    if prefix is not None and (not isinstance(prefix, int) or not 0 <= prefix <= 255):
        raise ValueError(f"sha256_many: prefix must be a byte value, not {prefix!r}")
    keep = [ffi.from_buffer(m) for m in messages]
    out = ffi.new("unsigned char[]", 32 * len(keep) or 1)
    check(lib.xv_sha256_batch(len(keep), ffi.new("const unsigned char *[]", keep),
                              ffi.new("size_t[]", [len(b) for b in keep]), -1 if prefix is None else prefix,
                              out), "sha256_many")
    digest = ffi.buffer(out)
    return [bytes(digest[32 * i:32 * i + 32]) for i in range(len(keep))]


def tree_hash(source: str | os.PathLike | bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF,
              *, threads: int | None = None) -> bytes:
    """Merkle root (32 bytes) of a regular file (``str``/``PathLike``) or of a buffer (anything else).

    Leaves are hashed on ``threads`` cores (default: all) with the GIL released; files are mapped in
    bounded windows.  A file that changes size while it is hashed raises HashSourceError.
    """
    check_leaf(leaf_size)
    n = threads_arg(threads)
    out = ffi.new("unsigned char[32]")
    if isinstance(source, (str, os.PathLike)):
        _tree_hash_file(os.fspath(source), leaf_size, n, out)
    else:
        view = memoryview(source)
        if not view.contiguous:
            raise ValueError("tree_hash: the buffer is not contiguous; pass bytes or a contiguous buffer")
        with view.cast("B") if view.format != "B" or view.ndim != 1 else view as flat:
            check(lib.xv_tree_hash_buf(ffi.from_buffer(flat), len(flat), leaf_size, n, out),
                  "tree_hash of a buffer")
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
        check(lib.xv_tree_hash_fd(fd, before.st_size, leaf_size, threads, out, err), path, err[0])
        after = os.fstat(fd)
        if (after.st_size, after.st_mtime_ns) != (before.st_size, before.st_mtime_ns):
            raise HashSourceError(f"{path}: changed while it was being hashed; "
                                  "hash it again once nothing writes to it")
    finally:
        os.close(fd)


class Chunker:
    """Content-defined chunks (gear hash, normalized FastCDC-style) of a stream fed in pieces.

    ``feed(data)`` and ``finish()`` return the chunks completed so far, in order, each with its
    SHA-256; boundaries do not depend on how the stream is split.  Boundary scanning runs in the
    calling thread while worker threads hash earlier chunks.
    """

    def __init__(self, min_size: int = DEFAULT_MIN, avg_size: int = DEFAULT_AVG,
                 max_size: int = DEFAULT_MAX, *, threads: int | None = None) -> None:
        check_chunk_sizes(min_size, avg_size, max_size)
        self._stream = Stream("Chunker", chunking=True, sizes=(min_size, avg_size, max_size), tree=False,
                              leaf_size=0, threads=threads)

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        return self._stream.feed(data)

    def finish(self) -> list[Chunk]:
        return self._stream.finish()

    def consume(self, f: Readable | int) -> Iterator[Chunk]:
        """All chunks of ``f`` read to EOF (a pipe or fifo works), then finished."""
        return self._stream.consume(f)


class ChunkAndTree(Chunker):
    """One pass over a stream yields its chunks and its Merkle root (``== tree_hash`` of the bytes).

    Both share one buffer and one pool of threads, so a fifo from ``xl save`` is read exactly once.
    """

    def __init__(self, leaf_size: int = DEFAULT_LEAF, min_size: int = DEFAULT_MIN,
                 avg_size: int = DEFAULT_AVG, max_size: int = DEFAULT_MAX, *,
                 threads: int | None = None) -> None:
        # Not Chunker.__init__: this stream also builds the tree, and a stream's shape is fixed.
        check_chunk_sizes(min_size, avg_size, max_size)
        self._stream = Stream("ChunkAndTree", chunking=True, sizes=(min_size, avg_size, max_size), tree=True,
                              leaf_size=check_leaf(leaf_size), threads=threads)

    def digest(self) -> bytes:
        """The Merkle root; valid after ``finish()`` (or after ``consume`` is exhausted)."""
        return self._stream.root()


class StreamTreeHash:
    """``tree_hash`` of a stream fed in pieces (e.g. a fifo, which cannot be mapped).

    ``digest()`` ends the stream: later ``update()`` calls raise ValueError.
    """

    def __init__(self, leaf_size: int = DEFAULT_LEAF, *, threads: int | None = None) -> None:
        self._stream = Stream("StreamTreeHash", chunking=False, sizes=(0, 0, 0), tree=True,
                              leaf_size=check_leaf(leaf_size), threads=threads)

    def update(self, data: bytes | bytearray | memoryview) -> None:
        self._stream.feed(data)

    def digest(self) -> bytes:
        if not self._stream.finished:
            self._stream.finish()
        return self._stream.root()
