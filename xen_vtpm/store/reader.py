"""Reading one checkpoint back, verifying as it goes.

Opening checks the manifest MAC, that the catalog copy equals the manifest file and that the
catalog row agrees with the manifest.  Each chunk is checked (entry header, GCM tag with the id
as associated data, id recomputed from the plaintext, length) before it is yielded; the
stream root is compared at its end.  A consumer that must not act on unverified data verifies
first (``Repository.verify``) and then streams with ``full_check=False``: the GCM tag alone
then authenticates each chunk under its id, which skips the SHA-256 pass.

Chunks are located one batch at a time and decrypted on worker threads a few batches ahead of
the consumer, so memory stays bounded by the batches in flight, whatever the checkpoint's size.
"""
from __future__ import annotations

import collections
import hashlib
import hmac
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from .. import timings
from .._hashing import lib
from ..errors import IntegrityError, UsageError
from ..hashing import sha256_many
from . import delta as deltas
from .context import StoreContext
from .fsio import storage_error
from .manifest import Manifest, StreamRecord, StreamRoot, decode
from .packs import PackReader, pack_path
from .restore import RestorePipe, Sink

_BATCH = 256       # chunks located per catalog query and decrypted per job
_CHECK_BATCH = 128  # chunks located per catalog query and handed to the C pipeline at once (~8 MiB)
_AHEAD = 3         # batches in flight: two decrypting (both cores), one ready for the consumer
_BASE_CACHE = 64   # decrypted bases of delta chunks (neighbouring deltas share them)


class CheckpointReader:
    """Returned by ``Repository.open_checkpoint``; holds the store lock shared until ``close``."""

    def __init__(self, ctx: StoreContext, checkpoint_id: str, lock: Any) -> None:
        self._ctx = ctx
        self._lock = lock
        self.checkpoint_id = checkpoint_id
        self.label = f"checkpoint {checkpoint_id}"
        self._packs = PackReader(ctx.pack_dir)
        self._pack_lock = threading.Lock()   # PackReader caches descriptors in a dict
        self._refs_checked = False
        self._bases: collections.OrderedDict[bytes, bytes] = collections.OrderedDict()
        self._base_lock = threading.Lock()
        try:
            self.manifest = self._load_manifest()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> CheckpointReader:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._packs.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _load_manifest(self) -> Manifest:
        row = self._ctx.catalog.query(
            "SELECT name, vm_uuid, vm_name, created_us, size, CAST(manifest AS BLOB) FROM checkpoints WHERE id=?",
            (self.checkpoint_id,))
        if not row:
            raise IntegrityError(f"{self.label}: catalog row vanished while opening; run `xen-vtpm recover`")
        name, vm_uuid, vm_name, created_us, size, blob = row[0]
        manifest = decode(bytes(blob), self._ctx.mac_key, self.checkpoint_id)
        path = self._ctx.manifest_path(self.checkpoint_id)
        try:
            file_bytes = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{self.label}: manifest file {path.name} is missing; "
                                 "restore the state dir from backup or delete the checkpoint") from None
        except OSError as exc:
            raise storage_error(exc, path, "reading manifest") from None
        if not hmac.compare_digest(file_bytes, bytes(blob)):
            raise IntegrityError(f"{self.label}: catalog manifest differs from manifest file {path.name}; "
                                 "one of them was altered — do not use this checkpoint")
        got = (manifest.checkpoint_id, manifest.name, manifest.vm_uuid, manifest.vm_name, manifest.created_us,
               manifest.size)
        want = (self.checkpoint_id, name, vm_uuid, vm_name, created_us, size)
        for field, a, b in zip(("id", "name", "vm_uuid", "vm_name", "time", "size"), got, want, strict=True):
            if a != b:
                raise IntegrityError(f"{self.label}: catalog {field} {b!r} does not match the signed manifest "
                                     f"({a!r}); the catalog was altered — do not use this checkpoint")
        return manifest

    _PLACES = ("SELECT c.id, c.pack, c.offset, c.length, c.plain_len, c.delta FROM refs r "
               "JOIN chunks c ON c.id = r.chunk WHERE r.checkpoint=?")

    def refs_checked(self) -> None:
        """The caller compared this checkpoint's references with its manifest as sets: reads need
        not look each reference up again."""
        self._refs_checked = True

    def _places_of(self, ids: list[bytes], with_refs: bool) -> dict[bytes, tuple[Any, ...]]:
        """Where the chunks are: {id: (pack, offset, sealed length, plaintext length, delta flag,
        {base id: its place} for a delta)}.  ``with_refs`` also requires this checkpoint's reference
        to each (a full check; a verified checkpoint skips that second lookup per chunk).  A delta's
        bases are located by id, whichever checkpoints reference them (often only older ones)."""
        marks = ",".join("?" * len(ids))
        if with_refs and not self._refs_checked:
            rows = self._ctx.catalog.query(f"{self._PLACES} AND r.chunk IN ({marks})", (self.checkpoint_id, *ids))
        else:
            rows = self._ctx.catalog.query(
                f"SELECT id, pack, offset, length, plain_len, delta FROM chunks WHERE id IN ({marks})", tuple(ids))
        places: dict[bytes, tuple[Any, ...]] = {bytes(r[0]): (r[1], r[2], r[3], r[4], r[5], {}) for r in rows}
        delta_ids = [cid for cid, p in places.items() if p[4]]
        if delta_ids:
            marks = ",".join("?" * len(delta_ids))
            for cid, base, *where in self._ctx.catalog.query(
                    "SELECT d.chunk, d.base, c.pack, c.offset, c.length, c.plain_len, c.delta FROM deps d "
                    f"LEFT JOIN chunks c ON c.id = d.base WHERE d.chunk IN ({marks})", tuple(delta_ids)):
                places[bytes(cid)][5][bytes(base)] = None if where[0] is None else tuple(where)
        return places

    def _base(self, bid: bytes, place: tuple[Any, ...] | None, cid: bytes, where: str) -> bytes:
        """The plaintext of a delta's base (a full chunk), decrypted once for neighbouring deltas."""
        with self._base_lock:
            data = self._bases.get(bid)
            if data is not None:
                self._bases.move_to_end(bid)
                return data
        if place is None:
            raise IntegrityError(f"{where}: base {bid.hex()[:16]} of delta chunk {cid.hex()[:16]} is not in the "
                                 "catalog; the catalog was altered — do not use this checkpoint")
        pack, offset, sealed_len, plain_len, is_delta = place
        if is_delta:
            raise IntegrityError(f"{where}: base {bid.hex()[:16]} of delta chunk {cid.hex()[:16]} is itself a "
                                 "delta; the catalog was altered — do not use this checkpoint")
        with self._pack_lock:
            nonce, sealed = self._packs.read_entry(pack, offset, sealed_len, bid, where)
        data = self._ctx.cipher.decrypt(bid, nonce, sealed, f"{where} base")
        if len(data) != plain_len:
            raise IntegrityError(f"{where}: base {bid.hex()[:16]} has length {len(data)}, the catalog says "
                                 f"{plain_len}; the catalog was altered — do not use this checkpoint")
        with self._base_lock:
            self._bases[bid] = data
            while len(self._bases) > _BASE_CACHE:
                self._bases.popitem(last=False)
        return data

    def _assemble(self, cid: bytes, payload: bytes, length: int, deps: dict[bytes, tuple[Any, ...] | None],
                  where: str) -> bytes:
        base_ids, segments = deltas.decode(payload, length, where)
        if set(base_ids) != set(deps):
            raise IntegrityError(f"{where}: delta chunk {cid.hex()[:16]} names bases the catalog's deps rows do "
                                 "not list (or the reverse); the catalog was altered — do not use this checkpoint")
        return deltas.apply(payload, segments, [self._base(b, deps[b], cid, where) for b in base_ids], where)

    def _open_batch(self, jobs: list[tuple[bytes, int, str, tuple[Any, ...] | None]],
                    full_check: bool) -> list[tuple[bytes, bytes | None]]:
        """Decrypt a batch (on a worker thread): [(plaintext, its SHA-256 or None)]."""
        cipher, plain = self._ctx.cipher, []
        for cid, length, where, place in jobs:
            if place is None:
                raise IntegrityError(f"{where}: chunk {cid.hex()[:16]} is not in the catalog for this "
                                     "checkpoint; the catalog was altered — do not use this checkpoint")
            pack, offset, sealed_len, plain_len, is_delta, deps = place
            with self._pack_lock:
                nonce, sealed = self._packs.read_entry(pack, offset, sealed_len, cid, where)
            data = cipher.decrypt(cid, nonce, sealed, where, delta=bool(is_delta))
            if is_delta:
                data = self._assemble(cid, data, plain_len, deps, where)
            if len(data) != length or plain_len != length:
                raise IntegrityError(f"{where}: chunk {cid.hex()[:16]} has length {len(data)}, the manifest "
                                     f"says {length}; do not use this checkpoint")
            plain.append(data)
        if not full_check:
            return [(data, None) for data in plain]
        digests = sha256_many(plain)   # the C engine: the batch's digests several at a time per core
        for (cid, _, where, _), digest in zip(jobs, digests, strict=True):
            cipher.check_id(cid, digest, where)
        return list(zip(plain, digests, strict=True))

    def stream(self, name: str, progress: Callable[[int], Any] | None = None, *,
               full_check: bool = True) -> Iterator[bytes]:
        """Yield the plaintext of stream ``name`` chunk by chunk, each authenticated before it is
        yielded.  ``full_check`` also recomputes every id and the stream root; pass False only for
        a checkpoint ``Repository.verify`` has just checked (the GCM tags still authenticate)."""
        record = self._record(name)
        where = f"{self.label} stream {name}"
        root = StreamRoot()
        chunks = record.chunks
        with ThreadPoolExecutor(2, thread_name_prefix="open") as pool:
            pending: collections.deque[Any] = collections.deque()
            for start in range(0, len(chunks), _BATCH):
                part = [chunks[i] for i in range(start, min(start + _BATCH, len(chunks)))]
                places = self._places_of(list({cid for cid, _ in part}), full_check)
                jobs = [(cid, ln, f"{where} chunk {start + k}", places.get(cid)) for k, (cid, ln) in enumerate(part)]
                pending.append(pool.submit(self._open_batch, jobs, full_check))
                if len(pending) >= _AHEAD:
                    yield from self._deliver(pending.popleft().result(), root, progress)
            while pending:
                yield from self._deliver(pending.popleft().result(), root, progress)
        if full_check and not hmac.compare_digest(root.digest(), record.tree_root):
            raise IntegrityError(f"{where}: stream root mismatch (chunks reordered or replaced); "
                                 "do not use this checkpoint")

    def check_into(self, name: str, sink: Sink | None,
                   progress: Callable[[int], Any] | None = None) -> dict[str, float]:
        """Check stream ``name`` completely (every check ``stream`` makes with ``full_check``) in one
        pass on all cores, writing its plaintext at its offsets of ``sink`` (None: check only).
        Nothing may use the sink's bytes unless this returns; returns CPU seconds per stage."""
        record = self._record(name)
        where = f"{self.label} stream {name}"
        chunks = record.chunks
        pipe = RestorePipe(self._ctx.cipher.id_key, self._ctx.cipher.enc_key, sink, label=where)
        try:
            offset = 0
            for start in range(0, len(chunks), _CHECK_BATCH):
                part = [chunks[i] for i in range(start, min(start + _CHECK_BATCH, len(chunks)))]
                with timings.stage("catalog"):
                    places = self._places_of(list({cid for cid, _ in part}), True)
                    batch = []
                    for k, (cid, length) in enumerate(part):
                        batch.append(self._located(cid, length, offset, places.get(cid), f"{where} chunk {start + k}"))
                        offset += length
                failure = pipe.submit(batch)
                if failure is None and progress is not None:
                    progress(sum(length for _, length in part))
                if failure is not None:
                    break
            else:
                failure = pipe.wait()
            if failure is not None:
                self._explain(failure, record, where, sink)
            if not hmac.compare_digest(pipe.root(), record.tree_root):
                raise IntegrityError(f"{where}: stream root mismatch (chunks reordered or replaced); "
                                     "do not use this checkpoint")
            stats = pipe.stats()
            for stage, seconds in stats.items():
                timings.add(stage, seconds)
            return stats
        finally:
            pipe.close()

    def _located(self, cid: bytes, length: int, offset: int, place: tuple[Any, ...] | None,
                 where: str) -> tuple[Any, ...]:
        """A chunk as the C pipeline takes it, after the checks that need the catalog."""
        if place is None:
            raise IntegrityError(f"{where}: chunk {cid.hex()[:16]} is not in the catalog for this "
                                 "checkpoint; the catalog was altered — do not use this checkpoint")
        pack, entry, sealed_len, plain_len, is_delta, deps = place
        bases = []
        if is_delta:
            for bid, bplace in deps.items():
                if bplace is None:
                    raise IntegrityError(f"{where}: base {bid.hex()[:16]} of delta chunk {cid.hex()[:16]} is not in "
                                         "the catalog; the catalog was altered — do not use this checkpoint")
                bpack, bentry, bsealed, bplain, bdelta = bplace
                if bdelta:
                    raise IntegrityError(f"{where}: base {bid.hex()[:16]} of delta chunk {cid.hex()[:16]} is itself "
                                         "a delta; the catalog was altered — do not use this checkpoint")
                bases.append((self._packs.fd_of(bpack, where), bentry, bsealed, bplain, bid))
            if not bases:
                raise IntegrityError(f"{where}: delta chunk {cid.hex()[:16]} names bases the catalog's deps rows do "
                                     "not list (or the reverse); the catalog was altered — do not use this checkpoint")
        return (self._packs.fd_of(pack, where), entry, sealed_len, plain_len, cid, offset, length, bases)

    def _explain(self, failure: Any, record: StreamRecord, where: str, sink: Sink | None) -> None:
        """Raise the error for the chunk the C pipeline refused, worded as the Python reader words it."""
        if failure.writing:
            raise storage_error(OSError(failure.errno, os.strerror(failure.errno)), f"fd {sink.fd if sink else -1}",
                                "writing the checked image to its spool")
        cid, length = record.chunks[failure.chunk]
        chunk_where = f"{where} chunk {failure.chunk}"
        places = self._places_of([cid], True)
        if failure.status == lib.XV_EIO:
            place = places.get(cid)
            raise storage_error(OSError(failure.errno, os.strerror(failure.errno)),
                                pack_path(self._ctx.pack_dir, place[0]) if place else chunk_where, "reading pack")
        self._open_batch([(cid, length, chunk_where, places.get(cid))], full_check=True)   # raises the reason
        raise IntegrityError(f"{chunk_where}: chunk {cid.hex()[:16]} fails its checks (status {failure.status}); "
                             "the store was altered — do not use this checkpoint")

    @staticmethod
    def _deliver(opened: list[tuple[bytes, bytes | None]], root: StreamRoot,
                 progress: Callable[[int], Any] | None) -> Iterator[bytes]:
        for data, digest in opened:
            if digest is not None:
                root.add(digest, len(data))
            if progress is not None:
                progress(len(data))
            yield data

    def read_blob(self, name: str) -> bytes:
        record = self._record(name)
        data = b"".join(self.stream(name))
        if record.sha256 is not None and not hmac.compare_digest(hashlib.sha256(data).digest(), record.sha256):
            raise IntegrityError(f"{self.label} blob {name}: SHA-256 mismatch; do not use this checkpoint")
        return data

    def _record(self, name: str) -> StreamRecord:
        try:
            return self.manifest.stream(name)
        except KeyError:
            have = ", ".join(s.name for s in self.manifest.streams) or "none"
            raise UsageError(f"{self.label}: no stream {name!r} (has: {have})") from None

    def pack_names(self) -> set[str]:
        """The packs holding this checkpoint's chunks and the bases of its delta chunks."""
        return {r[0] for r in self._ctx.catalog.query(
            "SELECT DISTINCT c.pack FROM chunks c WHERE c.id IN (SELECT chunk FROM refs WHERE checkpoint=?1) "
            "OR c.id IN (SELECT d.base FROM refs r JOIN deps d ON d.chunk = r.chunk WHERE r.checkpoint=?1)",
            (self.checkpoint_id,))}

