"""The C engine's binding: its status codes as exceptions, and one stream object over xv_stream."""
from __future__ import annotations

import os
from collections.abc import Iterator

from .._hashing import ffi, lib
from ..errors import HashEngineError, HashSourceError
from ._spec import Chunk, Readable

MAX_THREADS = 1024
_CORES = max(1, len(os.sched_getaffinity(0)))
_READ_SIZE = 1 << 20
_BUG = "this is a bug, please report it"


def threads_arg(threads: int | None) -> int:
    if threads is None:
        return _CORES
    if not isinstance(threads, int) or isinstance(threads, bool) or not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"threads {threads!r}: must be an integer from 1 to {MAX_THREADS}, "
                         "or None for all cores")
    return threads


def check(rc: int, what: str, err_errno: int = 0) -> None:
    """Raise the exception for a C status (every xv_* function returns one)."""
    if rc == lib.XV_OK:
        return
    if rc == lib.XV_ECHANGED:
        raise HashSourceError(f"{what}: changed size while it was being hashed; "
                              "hash it again once nothing writes to it")
    if rc == lib.XV_EIO:
        raise HashSourceError(f"{what}: cannot map it ({os.strerror(err_errno)}); check the file")
    if rc == lib.XV_ENOMEM:
        raise MemoryError(f"{what}: out of memory while hashing; free memory or pass fewer threads")
    if rc == lib.XV_ESTATE:
        raise ValueError(f"{what}: already finished; start a new one")
    if rc == lib.XV_ECRYPTO:
        raise HashEngineError(f"{what}: libcrypto cannot compute SHA-256; check the OpenSSL "
                              "configuration (OPENSSL_CONF and its providers)")
    if rc == lib.XV_EINVAL:
        raise HashEngineError(f"{what}: the C engine refused parameters its Python face accepted; {_BUG}")
    raise HashEngineError(f"{what}: unknown status {rc} from the C engine; {_BUG}")


def engine_name() -> str:
    engine = ffi.new("enum xv_engine *")
    check(lib.xv_sha256_engine(engine), "SHA-256 engine")
    names = {lib.XV_ENGINE_SHA_NI_LANES: "sha-ni, 4 lanes", lib.XV_ENGINE_LIBCRYPTO: "libcrypto"}
    return names[engine[0]]


class Stream:
    """One C stream: content-defined chunks and/or the Merkle root of everything fed.

    Like a hashlib object, one stream is fed by one thread at a time.
    """

    def __init__(self, label: str, *, chunking: bool, sizes: tuple[int, int, int], tree: bool,
                 leaf_size: int, threads: int | None) -> None:
        self._label = label
        workers = threads_arg(threads) - 1
        made = ffi.new("xv_stream **")
        check(lib.xv_stream_new(int(chunking), *sizes, int(tree), leaf_size, workers, made), label)
        self._s = ffi.gc(made[0], lib.xv_stream_free)
        max_out = ffi.new("size_t *")
        check(lib.xv_stream_max_out(self._s, max_out), label)
        self._out = ffi.new("xv_chunk[]", max_out[0])
        self._nout = ffi.new("size_t *")
        self._buf = ffi.new("unsigned char **")
        self._got = ffi.new("size_t *")
        self.finished = False

    def _space(self, want: int):
        """The engine's buffer to write up to ``want`` bytes into, and how many it takes."""
        check(lib.xv_stream_space(self._s, want, self._buf, self._got), self._label)
        return self._buf[0], self._got[0]

    def _commit(self, n: int, final: bool, chunks: list[Chunk]) -> None:
        check(lib.xv_stream_commit(self._s, n, int(final), self._out, self._nout), self._label)
        out = self._out
        for i in range(self._nout[0]):
            c = out[i]
            chunks.append(Chunk(c.offset, c.length, bytes(ffi.buffer(c.digest)),
                                bytes(ffi.buffer(c.data, c.length))))

    def _check_open(self) -> None:
        if self.finished:
            raise ValueError(f"{self._label}: already finished; start a new one")

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        self._check_open()
        chunks: list[Chunk] = []
        with memoryview(data) as view, view.cast("B") if view.format != "B" or view.ndim != 1 else view as mv:
            pos, n = 0, len(mv)
            while pos < n:
                p, k = self._space(n - pos)
                ffi.memmove(p, mv[pos:pos + k], k)
                self._commit(k, False, chunks)
                pos += k
        return chunks

    def finish(self) -> list[Chunk]:
        self._check_open()
        chunks: list[Chunk] = []
        self._commit(0, True, chunks)
        self.finished = True
        return chunks

    def consume(self, f: Readable | int) -> Iterator[Chunk]:
        """Read ``f`` (a binary file object or fd) to EOF straight into the engine's buffer."""
        self._check_open()
        while True:
            chunks: list[Chunk] = []
            space = ffi.buffer(*self._space(_READ_SIZE))
            n = os.readv(f, [space]) if isinstance(f, int) else f.readinto(space)
            if n is None:
                raise BlockingIOError(f"{self._label}: the source is non-blocking and has no data; "
                                      "pass a blocking file")
            if n == 0:
                yield from self.finish()
                return
            self._commit(n, False, chunks)
            yield from chunks

    def root(self) -> bytes:
        if not self.finished:
            raise ValueError(f"{self._label}: the root exists once the stream is finished; call finish() first")
        out = ffi.new("unsigned char[32]")
        check(lib.xv_stream_root(self._s, out), self._label)
        return bytes(out)
