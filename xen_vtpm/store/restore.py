"""The C restore pipeline (cext/restore.c) as the reader drives it: batches of located chunks in,
checked plaintext out at its stream offset of a sink, on every core."""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from .._hashing import ffi, lib
from .ingest import STAGES, check

_CORES = max(1, len(os.sched_getaffinity(0)))


@dataclass(frozen=True)
class Sink:
    """Where a checked stream goes: a descriptor written at stream offsets, its bytes AES-256-CTR
    encrypted under ``ctr = (key, counter block of offset 0)`` when given (a spool on disk)."""
    fd: int
    ctr: tuple[bytes, bytes] | None = None


@dataclass(frozen=True)
class Failure:
    """The first check that failed: the chunk (its index in the stream), the base of a delta at fault
    (its index in the chunk's batch) or None, whether the output write failed, and the status."""
    chunk: int
    base: int | None
    writing: bool
    status: int
    errno: int


class RestorePipe:
    def __init__(self, id_key: bytes, enc_key: bytes, sink: Sink | None, *, label: str,
                 workers: int | None = None) -> None:
        self._label = label
        made = ffi.new("xv_restore **")
        key, iv = sink.ctr if sink is not None and sink.ctr is not None else (ffi.NULL, ffi.NULL)
        check(lib.xv_restore_new(id_key, enc_key, _CORES if workers is None else workers,
                                 sink.fd if sink is not None else -1, key, iv, made), label)
        self._r = ffi.gc(made[0], lib.xv_restore_free)

    def submit(self, chunks: list[tuple[int, int, int, int, bytes, int, int, list[tuple[int, int, int, int, bytes]]]]
               ) -> Failure | None:
        """Queue a batch: per chunk (pack fd, entry offset, sealed length, plaintext length, id, stream
        offset, manifest length, its bases as (fd, entry offset, sealed length, plaintext length, id)).
        A failure of an earlier batch may show here already."""
        rchunks = ffi.new("xv_rchunk[]", max(len(chunks), 1))
        nbases = sum(len(c[7]) for c in chunks)
        rbases = ffi.new("xv_rplace[]", max(nbases, 1))
        b = 0
        for i, (fd, off, sealed, plain, cid, offset, length, bases) in enumerate(chunks):
            c = rchunks[i]
            _place(c.place, fd, off, sealed, plain, cid)
            c.offset, c.length, c.first_base, c.nbases = offset, length, b, len(bases)
            for base in bases:
                _place(rbases[b], *base)
                b += 1
        rc = lib.xv_restore_submit(self._r, rchunks, len(chunks), rbases, nbases)
        if rc in _CHECKS:
            return self.wait()   # an earlier batch failed: wait reports which chunk
        check(rc, self._label)
        return None

    def wait(self) -> Failure | None:
        chunk, base, err = ffi.new("uint64_t *"), ffi.new("int64_t *"), ffi.new("int *")
        rc = lib.xv_restore_wait(self._r, chunk, base, err)
        if rc == lib.XV_OK:
            return None
        if rc in _CHECKS or rc == lib.XV_EIO:
            return Failure(int(chunk[0]), int(base[0]) if base[0] >= 0 else None, base[0] == -2, rc, int(err[0]))
        check(rc, self._label)
        return None

    def root(self) -> bytes:
        out = ffi.new("unsigned char[32]")
        check(lib.xv_restore_root(self._r, out), self._label)
        return bytes(out)

    def stats(self) -> dict[str, float]:
        ns = ffi.new("uint64_t[]", lib.XV_STAGE_COUNT)
        check(lib.xv_restore_stats(self._r, ns), self._label)
        return {name: ns[i] / 1e9 for i, name in enumerate(STAGES)}

    def close(self) -> None:
        ffi.release(self._r)   # its destructor, xv_restore_free, waits for the batches in flight


_CHECKS = (lib.XV_EFORMAT, lib.XV_EAUTH, lib.XV_EBADID, lib.XV_EIO)


def _place(p: Any, fd: int, off: int, sealed: int, plain: int, cid: bytes) -> None:
    p.fd, p.entry_offset, p.sealed_len, p.plain_len = fd, off, sealed, plain
    ffi.memmove(p.id, cid, 32)
