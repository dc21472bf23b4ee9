"""The C ingest pipeline (cext/ingest.c) as the writer drives it: one batch of chunks at a time.

A feeding thread copies the source into the pipeline's ring; C threads cut the chunks, hash them and
compute their ids, all cores, without the GIL.  The writer takes them in stream order a batch at a
time (``take``), decides which are new to the store (one catalog query per batch) and which become
deltas, and has the pipeline seal those into pack entries written straight to the pack (``seal``).
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from .._hashing import ffi, lib
from ..errors import HashEngineError, UsageError
from ..hashing import Readable
from .fsio import storage_error

RING_BYTES = 16 << 20     # input held between its arrival and its seal: bounds the pipeline's memory
BATCH_BYTES = 4 << 20     # chunks per decision: one catalog query; sealed into one of two arenas
BATCH_MAX = 1024          # ... and at most this many (SQLite binds up to 32766 parameters)
_FEED = 1 << 20           # bytes per read from a file source
_CORES = max(1, len(os.sched_getaffinity(0)))
SEAL, DELTA = 1, 2        # what ``seal`` does with a chunk (0: nothing, the store has it; DELTA: whole if not worth it)
STAGES = ("chunk", "hash", "seal", "write", "read", "open", "delta")


@runtime_checkable
class GrowingFile(Protocol):
    """A source the pipeline maps and reads in place instead of copying it: a memory file another
    process appends to, which can never shrink (sealed with F_SEAL_SHRINK)."""
    def fileno(self) -> int: ...
    def wait_beyond(self, size: int) -> tuple[int, bool]:
        """Block until the file is longer than ``size`` bytes or complete: (its size, complete)."""
        ...


class _Cancelled(Exception):
    """The pipeline was cancelled: whoever cancelled it has the reason."""


def check(rc: int, what: str, path: Any = None, err_errno: int = 0) -> None:
    """Raise the error for a C status of the store pipelines."""
    if rc == lib.XV_OK:
        return
    if rc == lib.XV_ECANCELLED:
        raise _Cancelled(what)
    if rc == lib.XV_EIO:
        raise storage_error(OSError(err_errno, os.strerror(err_errno)), path or what, what)
    if rc == lib.XV_ENOMEM:
        raise MemoryError(f"{what}: out of memory in the store pipeline; free memory and retry")
    if rc == lib.XV_ECRYPTO:
        raise HashEngineError(f"{what}: libcrypto refused an operation (SHA-256, HMAC or AES-256-GCM); check the "
                              "OpenSSL configuration (OPENSSL_CONF and its providers)")
    raise HashEngineError(f"{what}: the C store pipeline returned status {rc}; this is a bug, please report it")


class KnownIds:
    """The ids a write has for certain (in the store or taken already), kept in C: 32 bytes each."""

    def __init__(self) -> None:
        made = ffi.new("xv_idset **")
        check(lib.xv_idset_new(made), "the ids of a write")
        self._set = ffi.gc(made[0], lib.xv_idset_free)

    def add(self, ids: bytes) -> int:
        """Add ids (back to back, 32 bytes each); returns how many were new."""
        added = ffi.new("size_t *")
        check(lib.xv_idset_add(self._set, ids, len(ids) // 32, added), "the ids of a write")
        return int(added[0])

    @property
    def handle(self) -> Any:
        return self._set


class Parent:
    """The stream a new memory stream is delta-encoded against, for the pipeline's workers: its chunk
    list and where its chunks and its deltas' bases are (docs/formats.md, "Checkpoint store" §0)."""

    def __init__(self, entries: bytes) -> None:
        made = ffi.new("xv_parent **")
        check(lib.xv_parent_new(entries, len(entries) // 36, made), "the parent of a delta")
        self._p = ffi.gc(made[0], lib.xv_parent_free)

    def add(self, places: list[tuple[int, int, int, int, bytes, bool]]) -> None:
        """(pack fd, entry offset, sealed length, plaintext length, id, is a delta) of some chunks."""
        arr = ffi.new("xv_rplace[]", max(len(places), 1))
        flags = bytearray(len(places))
        for i, (fd, off, sealed, plain, cid, delta) in enumerate(places):
            p = arr[i]
            p.fd, p.entry_offset, p.sealed_len, p.plain_len = fd, off, sealed, plain
            ffi.memmove(p.id, cid, 32)
            flags[i] = delta
        check(lib.xv_parent_places(self._p, arr, ffi.from_buffer("unsigned char[]", flags) if places else ffi.NULL,
                                   len(places)), "the parent of a delta")

    def ready(self) -> None:
        check(lib.xv_parent_ready(self._p), "the parent of a delta")

    @property
    def handle(self) -> Any:
        return self._p


@dataclass
class Batch:
    """Chunks taken in stream order; their bytes stay valid until the batch is sealed."""
    ids: list[bytes]
    offsets: list[int]
    lengths: list[int]
    known: list[bool]          # the write or the store has the id: nothing to store
    entries: bytes             # the manifest's (id | length) records
    _out: Any

    def __len__(self) -> int:
        return len(self.ids)

    def data(self, i: int) -> bytes:
        return bytes(ffi.buffer(self._out[i].data, self.lengths[i]))


class IngestPipe:
    """One stream through the pipeline.  ``run_feeder`` starts the thread that reads the source."""

    def __init__(self, sizes: tuple[int, int, int], id_key: bytes, enc_key: bytes, known: KnownIds,
                 parent: Parent | None, *, label: str, workers: int | None = None) -> None:
        self._label = label
        self._parent = parent   # the C pipeline reads it: kept alive as long as the pipeline
        made = ffi.new("xv_ingest **")
        check(lib.xv_ingest_new(*sizes, id_key, enc_key, known.handle, parent.handle if parent else ffi.NULL,
                                _CORES if workers is None else workers, RING_BYTES, BATCH_BYTES, made), label)
        self._g = ffi.gc(made[0], lib.xv_ingest_free)
        self._out = ffi.new("xv_ichunk[]", BATCH_MAX)
        self._entries = ffi.new("unsigned char[]", 36 * BATCH_MAX)
        self._n = ffi.new("size_t *")
        self._feed_error: BaseException | None = None
        self.feeder_cpu = 0.0
        self._feeder: threading.Thread | None = None

    # --- the feeding side -----------------------------------------------------------------
    def run_feeder(self, source: Readable | Iterable[bytes] | GrowingFile) -> None:
        self._feeder = threading.Thread(target=self._feed, args=(source,), name="store-feed-ring", daemon=True)
        self._feeder.start()

    def _space(self, want: int) -> Any:
        buf, got = ffi.new("unsigned char **"), ffi.new("size_t *")
        check(lib.xv_ingest_space(self._g, want, buf, got), self._label)
        return ffi.buffer(buf[0], got[0])

    def _commit(self, n: int, final: bool = False) -> None:
        check(lib.xv_ingest_commit(self._g, n, int(final)), self._label)

    def _feed(self, source: Readable | Iterable[bytes] | GrowingFile) -> None:
        start = time.thread_time()
        try:
            self._feed_all(source)
        finally:
            self.feeder_cpu = time.thread_time() - start   # reading the source, and cutting it (commit)

    def _feed_all(self, source: Readable | Iterable[bytes] | GrowingFile) -> None:
        try:
            if isinstance(source, GrowingFile):
                # Mapped in place; what the pipeline is done with is punched out of it as it goes.
                check(lib.xv_ingest_source(self._g, source.fileno(), 1), self._label)
                head, complete = 0, False
                while not complete:
                    size, complete = source.wait_beyond(head)
                    self._commit(size - head)
                    head = size
            elif isinstance(source, Iterable) and not hasattr(source, "readinto"):
                for block in source:
                    view = memoryview(block).cast("B")
                    while view:
                        space = self._space(len(view))
                        k = len(space)
                        space[:k] = view[:k]
                        self._commit(k)
                        view = view[k:]
            else:
                while True:
                    n = source.readinto(self._space(_FEED))
                    if n is None:
                        raise UsageError(f"{self._label}: the source is non-blocking and has no data; "
                                         "pass a blocking file")
                    if not n:
                        break
                    self._commit(n)
            self._commit(0, final=True)
        except _Cancelled:
            pass   # the writer stopped: it reports why
        except BaseException as exc:  # noqa: BLE001 - handed to the writer's thread
            self._feed_error = exc
            lib.xv_ingest_cancel(self._g)
        finally:
            close = getattr(source, "close", None)
            if close is not None and not hasattr(source, "readinto") and not isinstance(source, GrowingFile):
                close()   # a generator: let it free what it holds (the spool punches its holes)

    # --- the deciding side -----------------------------------------------------------------
    def take(self) -> Batch | None:
        """The next batch in stream order, or None at the end of the stream."""
        try:
            check(lib.xv_ingest_take(self._g, self._out, BATCH_MAX, self._entries, self._n), self._label)
        except _Cancelled:
            self._raise_feed_error()
            raise
        n = int(self._n[0])
        if not n:
            self._join()
            return None
        out = self._out
        ids, offsets, lengths, known = [], [], [], []
        for i in range(n):
            c = out[i]
            ids.append(bytes(ffi.buffer(c.id)))
            offsets.append(c.offset)
            lengths.append(c.length)
            known.append(bool(c.flags & lib.XV_CHUNK_KNOWN))
        return Batch(ids, offsets, lengths, known, bytes(ffi.buffer(self._entries, 36 * n)), out)

    def seal(self, batch: Batch, start: int, plan: bytearray, fd: int, offset: int, limit: int,
             path: Any) -> tuple[list[tuple[int, int, int, list[bytes] | None]], int, int]:
        """Seal the chunks ``start:`` of the batch (those not handed over yet) that ``plan`` marks into
        entries written back to back at ``fd``:``offset``, up to the one that takes them to ``limit``
        bytes.  Returns [(index, entry offset, sealed length, base ids of a delta or None)], the bytes
        written and how many chunks from ``start`` it handled."""
        n = len(batch) - start
        entry_offset, sealed_len = ffi.new("uint64_t[]", max(n, 1)), ffi.new("uint32_t[]", max(n, 1))
        nbases, base_ids = ffi.new("unsigned char[]", max(n, 1)), ffi.new("unsigned char[][32]", 16 * max(n, 1))
        written, done, err = ffi.new("uint64_t *"), ffi.new("size_t *"), ffi.new("int *")
        todo = ffi.from_buffer("unsigned char[]", plan)[start:len(plan)] if n else ffi.NULL
        rc = lib.xv_ingest_seal(self._g, n, todo, fd, offset, limit, entry_offset,
                                sealed_len, nbases, base_ids, written, done, err)
        try:
            check(rc, "writing pack", path, err[0])
        except _Cancelled:
            self._raise_feed_error()
            raise
        out = []
        for k in range(int(done[0])):
            if plan[start + k]:
                b = nbases[k]
                bases = [bytes(base_ids[16 * k + j]) for j in range(b)] if b else None
                out.append((start + k, int(entry_offset[k]), int(sealed_len[k]), bases))
        return out, int(written[0]), int(done[0])

    def flush(self, path: Any) -> None:
        """Wait until every entry sealed so far is written (the pipeline writes them on a thread)."""
        err = ffi.new("int *")
        check(lib.xv_ingest_flush(self._g, err), "writing pack", path, err[0])

    def result(self) -> tuple[bytes, int, int]:
        """(stream root, length, chunk count) once ``take`` returned None."""
        root, length, chunks = ffi.new("unsigned char[32]"), ffi.new("uint64_t *"), ffi.new("uint64_t *")
        check(lib.xv_ingest_result(self._g, root, length, chunks), self._label)
        return bytes(root), int(length[0]), int(chunks[0])

    def stats(self) -> dict[str, float]:
        """Thread CPU seconds per stage."""
        ns = ffi.new("uint64_t[]", lib.XV_STAGE_COUNT)
        check(lib.xv_ingest_stats(self._g, ns), self._label)
        return {name: ns[i] / 1e9 for i, name in enumerate(STAGES)}

    def cancel(self) -> None:
        lib.xv_ingest_cancel(self._g)
        self._join()

    def _join(self) -> None:
        if self._feeder is not None:
            self._feeder.join()
            self._feeder = None
        self._raise_feed_error()

    def _raise_feed_error(self) -> None:
        if self._feed_error is not None:
            exc, self._feed_error = self._feed_error, None
            raise exc

    def close(self) -> None:
        """Stop the threads and free the ring (the writer calls it whatever happened)."""
        if self._feeder is not None:
            lib.xv_ingest_cancel(self._g)
            self._feeder.join()
            self._feeder = None
        ffi.release(self._g)   # its destructor, xv_ingest_free, runs now


