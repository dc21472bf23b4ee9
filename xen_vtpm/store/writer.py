"""Writing one checkpoint: streams in, chunks sealed into packs, one commit at the end.

Crash safety: every file is named in this write's journal row *before* it is created, and the
commit transaction inserts the catalog rows and deletes the journal row together.  So after a
crash either the checkpoint is fully committed, or the journal names every file it left behind
and ``Repository.recover`` removes them.
"""
from __future__ import annotations

import hashlib
import itertools
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from .. import __version__, hashing, timings
from ..errors import IntegrityError, PreconditionFailed, UsageError
from .context import StoreContext
from .faults import crashpoint
from .fsio import fsync_dir, write_atomic
from .ingest import DELTA, SEAL, Batch, GrowingFile, IngestPipe, KnownIds, Parent
from .manifest import MAX_METADATA, ChunkList, Manifest, StreamRecord, decode, encode
from .packs import ENTRY, PackReader, PackWriter, new_pack_name
from .pending import PendingChunks

_LOOKUP = 500         # ids per catalog query (SQLite binds up to 32766 parameters)
_NAMES_AHEAD = 8      # pack names journaled per journal update: one catalog commit per 8 packs


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
        self._parent_packs = PackReader(ctx.pack_dir)   # for the parent's chunks (delta chunks)
        self._known = KnownIds()                # ids the store has for sure, and those this write took
        self._spare_names: list[str] = []       # pack names journaled, not used yet
        self._publishing: list[Future[tuple[str, int, int, int]]] = []
        self._publisher: ThreadPoolExecutor | None = None
        self.stored_bytes = 0                   # bytes this checkpoint added to the store (after commit)
        self.delta_chunks = 0                   # new chunks stored as deltas against the parent
        self.stats: dict[str, float] = {}       # CPU seconds per stage of the ingest pipelines

    def __enter__(self) -> CheckpointWriter:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self._open:
            self.abort()

    # --- input ---------------------------------------------------------------------
    def add_stream(self, name: str, source: hashing.Readable | Iterable[bytes] | GrowingFile,
                   progress: Callable[[int], Any] | None = None) -> StreamRecord:
        """Read ``source`` once (a binary file object, a fifo included, an iterable of byte blocks, or a
        growing memory file read in place):
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

    def _add(self, name: str, kind: str, source: hashing.Readable | Iterable[bytes] | GrowingFile,
             progress: Callable[[int], Any] | None, sha256: bytes | None = None) -> StreamRecord:
        self._check_open()
        if not name or any(s.name == name for s in self._streams):
            raise UsageError(f"checkpoint {self.checkpoint_id}: stream name {name!r} is empty or used twice")
        found = self._parent_stream(name) if kind == "stream" else None
        parent = None
        if found is not None:   # committed, and our shared store lock keeps it: its chunks need no lookup
            with timings.stage("delta"):
                parent = self._parent(*found)
        cipher = self._ctx.cipher
        pipe = IngestPipe(self._ctx.chunk_sizes, cipher.id_key, cipher.enc_key, self._known, parent,
                          label=f"checkpoint {self.checkpoint_id} stream {name}")
        entries = bytearray()
        try:
            pipe.run_feeder(source)
            while (batch := pipe.take()) is not None:
                entries += batch.entries
                self._store_batch(pipe, batch, parent)
                if progress is not None:
                    progress(sum(batch.lengths))
            pipe.flush(self._pack.path if self._pack is not None else None)
            root, length, _ = pipe.result()
            stats = pipe.stats()
            stats["read"] = max(0.0, pipe.feeder_cpu - stats["chunk"])   # the feeding thread also cuts
            for stage, seconds in stats.items():
                self.stats[stage] = self.stats.get(stage, 0.0) + seconds
                timings.add(stage, seconds)
        finally:
            pipe.close()
        record = StreamRecord(name=name, kind=kind, length=length, tree_root=root, sha256=sha256,
                              chunks=ChunkList(entries))
        self._streams.append(record)
        return record

    def _store_batch(self, pipe: IngestPipe, batch: Batch, parent: Parent | None) -> None:
        """Seal the batch's chunks the store lacks (as deltas against the parent where that is worth it)
        into packs."""
        with timings.stage("lookup"):
            self._new.use(batch.ids)
            asked = [cid for cid, known in zip(batch.ids, batch.known, strict=True) if not known]
            fresh = self._new.unknown(asked) if asked else set()
        kind = DELTA if parent is not None else SEAL
        plan = bytearray(kind if cid in fresh and not known else 0 for cid, known in zip(batch.ids, batch.known,
                                                                                        strict=True))
        start = 0
        while start < len(batch):   # a pack closes at the first chunk that takes it past its target
            pack = (self._pack or self._start_pack()) if any(plan[start:]) else None
            sealed, nbytes, done = pipe.seal(batch, start, plan, pack.fd if pack else -1,
                                             pack.size if pack else 0,
                                             self._ctx.pack_target - pack.size if pack else 1 << 62,
                                             pack.path if pack else None)
            start += done
            if pack is None:
                continue
            pack.appended([(batch.ids[i], off, ln) for i, off, ln, _ in sealed], nbytes)
            index = len(self._pack_names) - 1
            self._new.place([(batch.ids[i], index, off, batch.lengths[i], ln, bases) for i, off, ln, bases in sealed])
            self._pack_live += nbytes
            self.delta_chunks += sum(1 for *_, bases in sealed if bases)
            if pack.size >= self._ctx.pack_target:
                pipe.flush(pack.path)
                self._finish_pack()

    # --- delta chunks (docs/formats.md, "Checkpoint store" §0) -----------------------------
    def _parent_stream(self, name: str) -> tuple[str, ChunkList] | None:
        """Stream ``name`` of the VM's latest committed checkpoint that has one (MAC-checked): (its
        checkpoint id, its chunk list), or None."""
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
                    return pid, rec.chunks
        return None

    def _parent(self, checkpoint_id: str, chunks: ChunkList) -> Parent:
        """The parent for the pipeline: its chunk list and where its chunks and its deltas' bases are."""
        parent = Parent(chunks.raw)
        where = f"checkpoint {checkpoint_id} (parent of a delta)"
        for sql in ("SELECT c.id, c.pack, c.offset, c.length, c.plain_len, c.delta FROM refs r "
                    "JOIN chunks c ON c.id = r.chunk WHERE r.checkpoint=?",
                    "SELECT DISTINCT c.id, c.pack, c.offset, c.length, c.plain_len, c.delta FROM refs r "
                    "JOIN deps d ON d.chunk = r.chunk JOIN chunks c ON c.id = d.base WHERE r.checkpoint=?"):
            rows = self._ctx.catalog.rows(sql, (checkpoint_id,))
            while part := list(itertools.islice(rows, 4096)):
                parent.add([(fd, off, sealed, plain, bytes(cid), bool(delta))
                            for cid, pack, off, sealed, plain, delta in part
                            if (fd := self._pack_fd(pack, where)) is not None])
        parent.ready()
        return parent

    def _pack_fd(self, pack: str, where: str) -> int | None:
        """A parent pack's descriptor; None for one that cannot be opened, which only costs the chunks
        in it their deltas (verify reports the damage)."""
        try:
            return self._parent_packs.fd_of(pack, where)
        except IntegrityError:
            return None

    # --- packs ---------------------------------------------------------------------
    def _start_pack(self) -> PackWriter:
        if not self._spare_names:   # journaled before any of them exists, a few at a time
            names = [new_pack_name() for _ in range(_NAMES_AHEAD)]
            self._note_files(*(f"packs/{n}.pack{tmp}" for n in names for tmp in ("", ".tmp")))
            self._spare_names = names[::-1]
        name = self._spare_names.pop()
        self._pack = PackWriter(self._ctx.pack_dir, name)
        self._pack_names.append(name)
        self._pack_live = 0
        return self._pack

    def _finish_pack(self) -> None:
        """Make the pack durable and rename it on a thread of its own while the next one fills; the
        directory fsync that makes the renames durable comes once, before the commit (``_published``)."""
        assert self._pack is not None
        pack, live, self._pack = self._pack, self._pack_live, None
        if self._publisher is None:
            self._publisher = ThreadPoolExecutor(1, thread_name_prefix="pack-publish")
        self._publishing.append(self._publisher.submit(_publish, pack, live))

    def _published(self) -> None:
        """Wait for every pack to be published, then make their names durable."""
        futures, self._publishing = self._publishing, []
        for future in futures:
            self._packs.append(future.result())
        if futures:
            fsync_dir(self._ctx.pack_dir)

    def _stop_publisher(self) -> None:
        if self._publisher is not None:
            self._publisher.shutdown(wait=True)
            self._publisher = None

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
        with timings.stage("fsync"):
            try:
                self._published()
            finally:
                self._stop_publisher()
        with timings.stage("commit"):
            manifest = self._manifest()
            data = encode(manifest, self._ctx.mac_key)
            manifest_rel = self._ctx.manifest_rel(self.checkpoint_id)
            self._note_files(manifest_rel, manifest_rel + ".tmp")
        with timings.stage("fsync"):
            write_atomic(self._ctx.manifest_path(self.checkpoint_id), data)
        crashpoint("write.manifest-published")
        with timings.stage("commit"), self._ctx.catalog.transaction() as db:
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
        self._stop_publisher()   # let a pack being published finish: its files are undone below
        self._publishing = []
        self._new.drop()
        self._parent_packs.close()
        self._ctx.undo_files(self._created)
        with self._ctx.catalog.transaction() as db:
            db.execute("DELETE FROM journal WHERE id=?", (self._jid,))
        self._lock.release()

    def _check_open(self) -> None:
        if not self._open:
            raise UsageError(f"checkpoint {self.checkpoint_id}: writer already committed or aborted")


def _publish(pack: PackWriter, live: int) -> tuple[str, int, int, int]:
    """(name, size, entries, live bytes) of a pack made durable under its final name."""
    with timings.stage("fsync"):
        size = pack.finish(publish_dir=False)
    crashpoint("write.pack-published")
    return pack.name, size, pack.entries, live
