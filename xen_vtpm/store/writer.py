"""Writing one checkpoint: streams in, chunks sealed into packs, one commit at the end.

Crash safety: every file is named in this write's journal row *before* it is created, and the
commit transaction inserts the catalog rows and deletes the journal row together.  So after a
crash either the checkpoint is fully committed, or the journal names every file it left behind
and ``Repository.recover`` removes them.
"""
from __future__ import annotations

import hashlib
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import __version__, hashing
from ..errors import IntegrityError, PreconditionFailed, UsageError
from .context import StoreContext
from .delta import DeltaEncoder, ParentStream
from .faults import crashpoint
from .fsio import write_atomic
from .manifest import CHUNK_ENTRY, MAX_METADATA, ChunkList, Manifest, StreamRecord, StreamRoot, decode, encode
from .packs import ENTRY, PackReader, PackWriter, new_pack_name
from .pending import PendingChunks

_BATCH = 256          # chunks per catalog lookup and per sealing job (SQLite allows 999 parameters)
_BATCH_BYTES = 512 << 10   # ... or fewer: a writer waiting on its input has stored all but ~1 MiB of it


class CheckpointWriter:
    """Returned by ``Repository.begin_checkpoint``; use as a context manager (aborts on error)."""

    def __init__(self, ctx: StoreContext, checkpoint_id: str, name: str, vm_uuid: str, vm_name: str,
                 journal_id: int, lock: Any) -> None:
        self._ctx = ctx
        self.checkpoint_id, self.name, self.vm_uuid, self.vm_name = checkpoint_id, name, vm_uuid, vm_name
        self._jid = journal_id
        self._lock = lock
        self._created: list[str] = []          # state-dir-relative files this write may have made
        self._streams: list[StreamRecord] = []
        self._new = PendingChunks(ctx.catalog)
        self._pack_names: list[str] = []        # pack index -> name
        self._packs: list[tuple[str, int, int, int]] = []         # (name, size, entries, live bytes)
        self._pack: PackWriter | None = None
        self._pack_live = 0
        self._metadata = b""
        self._open = True
        self._delta: DeltaEncoder | None = None  # while a memory stream with a parent is added
        self._parent_packs = PackReader(ctx.pack_dir)   # the sealing thread's, for the parent's chunks
        self.stored_bytes = 0                   # bytes this checkpoint added to the store (after commit)
        self.delta_chunks = 0                   # new chunks stored as deltas against the parent

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self._open:
            self.abort()

    # --- input ---------------------------------------------------------------------
    def add_stream(self, name: str, source: hashing.Readable | Iterable[bytes],
                   progress: Callable[[int], Any] | None = None) -> StreamRecord:
        """Read ``source`` once (a binary file object, a fifo included, or an iterable of byte blocks):
        content-defined chunks, the tree root and the stored chunks come out of the same pass.
        ``progress(n)`` is called with each chunk's length as it is stored."""
        return self._add(name, "stream", source, progress)

    def add_blob(self, name: str, data: bytes) -> StreamRecord:
        """A small object held in memory, also addressed by its SHA-256."""
        data = bytes(data)
        return self._add(name, "blob", [data], None, hashlib.sha256(data).digest())

    def set_metadata(self, blob: bytes) -> None:
        """The caller's checkpoint metadata: stored in the manifest, MAC'd with it, never parsed by
        the store (``reader.manifest.metadata`` gives it back).  A later call replaces it."""
        self._check_open()
        if not isinstance(blob, (bytes, bytearray, memoryview)):
            raise UsageError(f"checkpoint {self.checkpoint_id}: metadata must be bytes, not {type(blob).__name__}")
        blob = bytes(blob)
        if len(blob) > MAX_METADATA:
            raise UsageError(f"checkpoint {self.checkpoint_id}: metadata is {len(blob)} bytes, more than the "
                             f"{MAX_METADATA} a manifest holds; keep large data in a blob stream")
        self._metadata = blob

    def _add(self, name: str, kind: str, source: hashing.Readable | Iterable[bytes],
             progress: Callable[[int], Any] | None, sha256: bytes | None = None) -> StreamRecord:
        self._check_open()
        if not name or any(s.name == name for s in self._streams):
            raise UsageError(f"checkpoint {self.checkpoint_id}: stream name {name!r} is empty or used twice")
        min_size, avg_size, max_size = self._ctx.chunk_sizes
        engine = hashing.Chunker(min_size=min_size, avg_size=avg_size, max_size=max_size)
        pieces = engine.consume(source) if not isinstance(source, Iterable) else _feed_all(engine, source)
        id_of = self._ctx.cipher.id_of_digest
        root = StreamRoot()
        entries = bytearray()
        batch: list[tuple[bytes, bytes, int]] = []
        length = batch_bytes = 0
        parent = self._parent_stream(name) if kind == "stream" else None
        self._delta = DeltaEncoder(parent, self._ctx.cipher, self._parent_packs) if parent is not None else None
        # One sealing job in flight (AES-GCM releases the GIL) while this thread chunks the next batch.
        with ThreadPoolExecutor(1, thread_name_prefix="seal") as pool:
            sealing: Future[Any] | None = None
            for chunk in pieces:
                cid = id_of(chunk.digest)
                root.add(chunk.digest, chunk.length)
                entries += CHUNK_ENTRY.pack(cid, chunk.length)
                batch.append((cid, chunk.data, length))
                length += chunk.length
                batch_bytes += chunk.length
                if len(batch) == _BATCH or batch_bytes >= _BATCH_BYTES:
                    sealing = self._store_batch(pool, sealing, batch, progress)
                    batch, batch_bytes = [], 0
            sealing = self._store_batch(pool, sealing, batch, progress)
            if sealing is not None:
                self._append_sealed(sealing.result())
        self._delta = None
        record = StreamRecord(name=name, kind=kind, length=length, tree_root=root.digest(), sha256=sha256,
                              chunks=ChunkList(entries))
        self._streams.append(record)
        return record

    def _store_batch(self, pool: ThreadPoolExecutor, sealing: Future[Any] | None, batch: list[tuple[bytes, bytes, int]],
                     progress: Callable[[int], Any] | None) -> Future[Any] | None:
        """Queue the batch's new chunks for sealing, then append the previous batch's sealed chunks."""
        fresh = self._fresh(batch)
        nxt = None
        if fresh:
            places = self._parent_places(fresh) if self._delta is not None else {}
            nxt = pool.submit(_seal_all, self._ctx.cipher, fresh, self._delta, places)
        if sealing is not None:
            self._append_sealed(sealing.result())
        if progress is not None and batch:
            progress(sum(len(data) for _, data, _ in batch))
        return nxt

    def _fresh(self, batch: list[tuple[bytes, bytes, int]]) -> list[tuple[bytes, bytes, int]]:
        """The chunks of ``batch`` neither this write nor the catalog holds yet (claimed now, so a
        repeat in a later batch is skipped)."""
        fresh = self._new.claim_unknown(list({cid for cid, _, _ in batch}))
        out = []
        for cid, data, offset in batch:
            if cid in fresh:
                fresh.discard(cid)
                out.append((cid, data, offset))
        return out

    # --- delta chunks (docs/formats.md, "Checkpoint store" §0) -----------------------------
    def _parent_stream(self, name: str) -> ParentStream | None:
        """Stream ``name`` of the VM's latest committed checkpoint that has one (MAC-checked), or None."""
        catalog = self._ctx.catalog
        for (pid,) in catalog.query("SELECT id FROM checkpoints WHERE vm_uuid=? ORDER BY created_us DESC, id DESC",
                                    (self.vm_uuid,)):
            rows = catalog.query("SELECT CAST(manifest AS BLOB) FROM checkpoints WHERE id=?", (pid,))
            if not rows:
                continue   # deleted meanwhile
            try:
                manifest = decode(bytes(rows[0][0]), self._ctx.mac_key, pid)
            except IntegrityError:
                return None   # an altered parent: no deltas (verify reports it)
            for rec in manifest.streams:
                if rec.name == name and rec.kind == "stream":
                    return ParentStream(pid, rec.chunks)
        return None

    def _parent_places(self, fresh: list[tuple[bytes, bytes, int]]) -> dict[bytes, tuple[Any, ...]]:
        """Where the parent chunks overlapping ``fresh`` are, and the bases of those that are deltas:
        {id: (pack, offset, sealed length, plaintext length, delta)} (looked up on this thread, which
        owns the catalog connection, for the sealing thread)."""
        assert self._delta is not None
        ids = list(self._delta.parent.ids_for((off, off + len(data)) for _, data, off in fresh))
        places: dict[bytes, tuple[Any, ...]] = {}
        catalog = self._ctx.catalog
        for i in range(0, len(ids), _BATCH):
            part = ids[i:i + _BATCH]
            marks = ",".join("?" * len(part))
            for cid, *place in catalog.query(
                    f"SELECT id, pack, offset, length, plain_len, delta FROM chunks WHERE id IN ({marks})",
                    tuple(part)):
                places[bytes(cid)] = tuple(place)
            for cid, *place in catalog.query(
                    "SELECT c.id, c.pack, c.offset, c.length, c.plain_len, c.delta FROM deps d "
                    f"JOIN chunks c ON c.id = d.base WHERE d.chunk IN ({marks})", tuple(part)):
                places[bytes(cid)] = tuple(place)
        return places

    def _append_sealed(self, sealed_chunks: list[tuple[bytes, bytes, bytes, int, list[bytes] | None]]) -> None:
        placed = []
        for cid, nonce, sealed, plain, bases in sealed_chunks:
            pack = self._pack or self._start_pack()
            offset = pack.add(cid, nonce, sealed)
            placed.append((cid, len(self._pack_names) - 1, offset, plain, len(sealed), bases))
            self._pack_live += ENTRY.size + len(sealed)
            self.delta_chunks += bases is not None
            if pack.size >= self._ctx.pack_target:
                self._finish_pack()
        self._new.place(placed)

    # --- packs ---------------------------------------------------------------------
    def _start_pack(self) -> PackWriter:
        name = new_pack_name()
        self._note_files(f"packs/{name}.pack", f"packs/{name}.pack.tmp")
        self._pack = PackWriter(self._ctx.pack_dir, name)
        self._pack_names.append(name)
        self._pack_live = 0
        return self._pack

    def _finish_pack(self) -> None:
        assert self._pack is not None
        pack, self._pack = self._pack, None
        size = pack.finish()
        self._packs.append((pack.name, size, pack.entries, self._pack_live))
        crashpoint("write.pack-published")

    def _note_files(self, *paths: str) -> None:
        """Journal the files before they exist, so recovery can always find them."""
        self._created.extend(paths)
        with self._ctx.catalog.transaction() as db:
            self._ctx.catalog.journal_update(db, self._jid, {"create": self._created})

    # --- end -----------------------------------------------------------------------
    def commit(self, in_transaction: Callable[[sqlite3.Connection], Any] | None = None) -> Manifest:
        """Publish the manifest file, then insert every catalog row in one transaction.

        ``in_transaction(db)``, if given, runs inside that same transaction (the coordinator uses
        it to record the catalog head change atomically with the checkpoint)."""
        self._check_open()
        if self._pack is not None:
            self._finish_pack()
        manifest = self._manifest()
        self._new.use(cid for rec in manifest.streams for cid, _ in rec.chunks)
        data = encode(manifest, self._ctx.mac_key)
        manifest_rel = self._ctx.manifest_rel(self.checkpoint_id)
        self._note_files(manifest_rel, manifest_rel + ".tmp")
        write_atomic(self._ctx.manifest_path(self.checkpoint_id), data)
        crashpoint("write.manifest-published")
        with self._ctx.catalog.transaction() as db:
            stored = self._insert_rows(db, manifest, data)
            db.execute("DELETE FROM journal WHERE id=?", (self._jid,))
            if in_transaction is not None:
                in_transaction(db)
        crashpoint("write.committed")
        self._open = False
        self._new.drop()
        self._parent_packs.close()
        self._lock.release()
        self.stored_bytes = stored
        return manifest

    def _insert_rows(self, db: sqlite3.Connection, manifest: Manifest, data: bytes) -> int:
        if db.execute("SELECT 1 FROM checkpoints WHERE vm_uuid=? AND name=?",
                      (self.vm_uuid, self.name)).fetchone():
            raise PreconditionFailed(f"checkpoint name {self.name!r} was taken for VM {self.vm_name} while "
                                     "this one was written; retry with another name")
        live = {name: live for name, _, _, live in self._packs}
        db.executemany("INSERT INTO packs (name, size, entries, live_bytes) VALUES (?,?,?,?)",
                       [(name, size, entries, live) for name, size, entries, live in self._packs])
        raced = set()   # a concurrent checkpoint committed the same chunk first: our copy is dead weight
        for cid, pack_index, sealed in self._new.raced(db):
            raced.add(cid)
            live[self._pack_names[pack_index]] -= ENTRY.size + sealed
        stored = 0

        def rows() -> Iterator[tuple[bytes, str, int, int, int, int]]:
            nonlocal stored
            for cid, pack_index, offset, plain, sealed, delta in self._new.placed(db):
                if cid not in raced:
                    stored += ENTRY.size + sealed
                    yield cid, self._pack_names[pack_index], offset, sealed, plain, delta

        db.executemany("INSERT INTO chunks (id, pack, offset, length, plain_len, refcount, delta) "
                       "VALUES (?,?,?,?,?,1,?)", rows())
        db.executemany("UPDATE packs SET live_bytes=? WHERE name=?", [(v, k) for k, v in live.items()])
        db.execute("INSERT INTO checkpoints (id, name, vm_uuid, vm_name, created_us, size, stored_bytes, manifest) "
                   "VALUES (?,?,?,?,?,?,?,?)", (self.checkpoint_id, self.name, self.vm_uuid, self.vm_name,
                                               manifest.created_us, manifest.size, stored, data))
        try:
            self._new.insert_refs(db, self.checkpoint_id)
            self._new.insert_deps(db)
        except sqlite3.IntegrityError:   # the foreign key: a chunk we counted on is gone
            raise PreconditionFailed(f"checkpoint {self.checkpoint_id}: a chunk vanished during the write "
                                     "(concurrent delete); retry the snapshot") from None
        # Recount every chunk this checkpoint uses, new or shared, and every base of its new deltas:
        # refcount = count(refs) + count(deps naming it as base), in one statement.
        self._new.recount(db, self.checkpoint_id)
        return stored

    def _manifest(self) -> Manifest:
        return Manifest(checkpoint_id=self.checkpoint_id, name=self.name, vm_uuid=self.vm_uuid,
                        vm_name=self.vm_name, tool_version=__version__, created_us=time.time_ns() // 1000,
                        metadata=self._metadata, streams=tuple(self._streams))

    def abort(self) -> None:
        """Remove everything this write created; the catalog never saw it."""
        if not self._open:
            return
        self._open = False
        if self._pack is not None:
            self._pack.discard()
            self._pack = None
        self._new.drop()
        self._parent_packs.close()
        self._ctx.undo_files(self._created)
        with self._ctx.catalog.transaction() as db:
            db.execute("DELETE FROM journal WHERE id=?", (self._jid,))
        self._lock.release()

    def _check_open(self) -> None:
        if not self._open:
            raise UsageError(f"checkpoint {self.checkpoint_id}: writer already committed or aborted")


def _seal_all(cipher: Any, chunks: list[tuple[bytes, bytes, int]], delta: DeltaEncoder | None,
              places: dict[bytes, tuple[Any, ...]]) -> list[tuple[bytes, bytes, bytes, int, list[bytes] | None]]:
    """Seal each chunk whole, or as a delta against the parent when that saves at least half of it:
    (id, nonce, sealed, plaintext length, base ids of a delta or None)."""
    out = []
    for cid, data, offset in chunks:
        found = delta.encode(data, offset, places) if delta is not None else None
        if found is None:
            out.append((cid, *cipher.seal(cid, data), len(data), None))
        else:
            payload, bases = found
            out.append((cid, *cipher.seal(cid, payload, delta=True), len(data), bases))
    return out


def _feed_all(engine: Any, blocks: Iterable[bytes]) -> Iterator[Any]:
    for block in blocks:
        yield from engine.feed(block)
    yield from engine.finish()
