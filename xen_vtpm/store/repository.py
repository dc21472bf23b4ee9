"""The checkpoint store's public face: write, read, list[Any], verify, delete, recover.

Layers (each testable alone): ``chunks`` (ids and AEAD), ``packs`` (file format), ``manifest``
(record format and MAC), ``catalog`` (SQLite tables), ``writer``/``reader`` (one checkpoint, given
a ``context.StoreContext``).
Files under the state dir: ``catalog.sqlite`` (shared), ``packs/<name>.pack``,
``manifests/<checkpoint>.manifest``, ``store-locks/``.  Format: docs/formats.md, "Checkpoint store".
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import secrets
from pathlib import Path
from typing import Any

from ..errors import CheckpointNotFound, IntegrityError, StorageError, UsageError
from .catalog import Catalog
from .chunks import ChunkCipher
from .context import STORE_FILE_RE, StoreContext
from .faults import crashpoint
from .fsio import make_dirs, storage_error, unlink_if_present
from .locking import OwnerLock, StoreLock, owner_alive
from .packs import ENTRY, HEADER, SUFFIX, PackReader, PackWriter, new_pack_name, pack_path, read_index
from .reader import CheckpointReader
from .writer import CheckpointWriter

DEFAULT_PACK_TARGET = 32 << 20
# min/avg/max chunk sizes, smaller than the chunker's defaults: guests dirty memory in runs of
# pages and a changed run costs about (run + avg) stored bytes; with 5% of an image rewritten in
# 64 KiB runs, avg 16 KiB stores 8% new bytes where 64 KiB stores 15% (docs/formats.md, "Checkpoint store" §5).
DEFAULT_CHUNK_SIZES = (4 << 10, 16 << 10, 64 << 10)
_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


class Repository:
    def __init__(self, state_dir: os.PathLike[str] | str, keys: Any, *, pack_target: int = DEFAULT_PACK_TARGET,
                 chunk_sizes: tuple[int, int, int] = DEFAULT_CHUNK_SIZES, compact_below: float = 0.5,
                 lock_timeout: float = 60.0) -> None:
        """``keys``: any object with chunk_enc, chunk_id and manifest_mac (32-byte keys)."""
        self.state_dir = Path(state_dir)
        self.pack_dir = self.state_dir / "packs"
        self.manifest_dir = self.state_dir / "manifests"
        self.lock_dir = self.state_dir / "store-locks"
        for d in (self.pack_dir, self.manifest_dir, self.lock_dir):
            # Durably: a pack published into a directory whose own entry is lost is lost with it.
            make_dirs(d, what="creating the store directory")
        self.pack_target = pack_target
        self.chunk_sizes = chunk_sizes
        self.compact_below = compact_below
        self.lock_timeout = lock_timeout
        self.cipher = ChunkCipher(keys)
        self.mac_key = bytes(keys.manifest_mac)
        self.catalog = Catalog(self.state_dir / "catalog.sqlite")
        self._ctx = StoreContext(state_dir=self.state_dir, pack_dir=self.pack_dir, manifest_dir=self.manifest_dir,
                                 catalog=self.catalog, cipher=self.cipher, mac_key=self.mac_key,
                                 chunk_sizes=chunk_sizes, pack_target=pack_target)

    def close(self) -> None:
        self.catalog.close()

    def __enter__(self) -> Repository:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # --- helpers ---------------------------------------------------------------------
    def manifest_path(self, checkpoint_id: str) -> Path:
        return self._ctx.manifest_path(checkpoint_id)

    def undo_files(self, relpaths: list[str]) -> None:
        self._ctx.undo_files(relpaths)

    def check_writable(self) -> None:
        """Raise StorageError/DiskFull now rather than halfway through a snapshot."""
        probe = self.pack_dir / f".probe-{secrets.token_hex(4)}"
        try:
            with open(probe, "wb") as fh:
                fh.write(bytes(4096))
                fh.flush()
                os.fsync(fh.fileno())
            os.unlink(probe)
        except OSError as exc:
            raise storage_error(exc, self.pack_dir, "writing a test file") from None

    def _owner(self, exclusive: bool) -> OwnerLock:
        store_lock = StoreLock(self.lock_dir, exclusive, self.lock_timeout)
        try:
            return OwnerLock(self.lock_dir, store_lock)
        except BaseException:
            store_lock.release()
            raise

    # --- write / read ----------------------------------------------------------------
    def begin_checkpoint(self, vm_uuid: str, vm_name: str, *, name: str | None = None,
                         checkpoint_id: str | None = None) -> CheckpointWriter:
        """Start a checkpoint; the writer's ``commit`` makes it visible, ``abort`` removes it."""
        checkpoint_id = checkpoint_id or secrets.token_hex(8)
        if not _ID_RE.fullmatch(checkpoint_id):
            raise UsageError(f"checkpoint id {checkpoint_id!r}: use 1-64 letters, digits, '_', '.', '-'")
        name = name or checkpoint_id
        if self.catalog.query("SELECT 1 FROM checkpoints WHERE id=? OR (vm_uuid=? AND name=?)",
                              (checkpoint_id, vm_uuid, name)):
            raise UsageError(f"checkpoint {name!r} ({checkpoint_id}) already exists for VM {vm_name}; "
                             "choose another name")
        lock = self._owner(exclusive=False)
        try:
            jid = self.catalog.journal_add("write", checkpoint_id, lock.token, {"create": []})
        except BaseException:
            lock.release()
            raise
        crashpoint("write.journaled")
        return CheckpointWriter(self._ctx, checkpoint_id, name, vm_uuid, vm_name, jid, lock)

    def open_checkpoint(self, checkpoint_id: str) -> CheckpointReader:
        """A verified reader; close it (or use ``with``) to let deletes proceed."""
        self._row(checkpoint_id)
        lock = StoreLock(self.lock_dir, exclusive=False, timeout=self.lock_timeout)
        return CheckpointReader(self._ctx, checkpoint_id, lock)

    # --- queries -----------------------------------------------------------------------
    _COLUMNS = "id, name, vm_uuid, vm_name, created_us, size, stored_bytes"

    @staticmethod
    def _as_dict(row: tuple[Any, ...]) -> dict[str, Any]:
        when = dt.datetime.fromtimestamp(row[4] / 1e6, dt.UTC)
        return {"id": row[0], "name": row[1], "vm_uuid": row[2], "vm_name": row[3],
                "time": when.isoformat(timespec="seconds").replace("+00:00", "Z"),
                "size": row[5], "stored_bytes": row[6]}

    def _row(self, checkpoint_id: str) -> dict[str, Any]:
        rows = self.catalog.query(f"SELECT {self._COLUMNS} FROM checkpoints WHERE id=?", (checkpoint_id,))
        if not rows:
            raise CheckpointNotFound(f"checkpoint {checkpoint_id}: not found; see `xen-vtpm checkpoints`")
        return self._as_dict(rows[0])

    def list_checkpoints(self, vm_uuid: str | None = None) -> list[dict[str, Any]]:
        """id, name, vm_uuid, vm_name, time (UTC ISO 8601), size (logical bytes), stored_bytes (added)."""
        sql = f"SELECT {self._COLUMNS} FROM checkpoints"
        rows = self.catalog.query(sql + " WHERE vm_uuid=? ORDER BY created_us, id" if vm_uuid else
                                  sql + " ORDER BY created_us, id", (vm_uuid,) if vm_uuid else ())
        return [self._as_dict(r) for r in rows]

    def resolve(self, ref: str, vm_uuid: str | None = None) -> dict[str, Any]:
        """A checkpoint by id, or by name (unique within its VM; pass vm_uuid if names repeat across VMs)."""
        rows = self.catalog.query(f"SELECT {self._COLUMNS} FROM checkpoints WHERE id=?", (ref,))
        if not rows:
            sql = f"SELECT {self._COLUMNS} FROM checkpoints WHERE name=?"
            rows = self.catalog.query(sql + " AND vm_uuid=?", (ref, vm_uuid)) if vm_uuid else \
                self.catalog.query(sql, (ref,))
        if vm_uuid and rows and rows[0][2] != vm_uuid:
            rows = []
        if not rows:
            raise CheckpointNotFound(f"checkpoint {ref}: not found; see `xen-vtpm checkpoints`")
        if len(rows) > 1:
            raise UsageError(f"checkpoint {ref}: name used by {len(rows)} VMs; give the id or the domain")
        return self._as_dict(rows[0])

    def is_committed(self, checkpoint_id: str) -> bool:
        return bool(self.catalog.query("SELECT 1 FROM checkpoints WHERE id=?", (checkpoint_id,)))

    def catalog_digest(self) -> bytes:
        """SHA-256 over every checkpoint row (its columns and its manifest MAC) and every hold, for the
        TPM-bound catalog head: a row added, removed or edited — even a display-only column such as
        stored_bytes, which no manifest can hold — or a hold added or removed no longer matches the head.
        Holds come last and only when there are some, so a catalog without any keeps its digest."""
        h = hashlib.sha256(b"xen-vtpm store v2\0")
        for row in self.catalog.query("SELECT id, name, vm_uuid, vm_name, created_us, size, stored_bytes, manifest "
                                      "FROM checkpoints ORDER BY id"):
            h.update(json.dumps([*row[:7], bytes(row[7])[-32:].hex()]).encode() + b"\n")
        for (held,) in self.catalog.query("SELECT checkpoint FROM holds ORDER BY checkpoint"):
            h.update(json.dumps(["hold", held]).encode() + b"\n")
        return h.digest()

    # --- holds ---------------------------------------------------------------------------
    def holds(self) -> set[str]:
        """Checkpoints the caller asked to keep; the store only records them (the catalog digest
        covers them) and drops a hold with its checkpoint."""
        return {row[0] for row in self.catalog.query("SELECT checkpoint FROM holds")}

    def set_hold(self, checkpoint_id: str, held: bool) -> None:
        """Add or remove a hold; idempotent, so a journaled caller can repeat it."""
        with self.catalog.transaction() as db:
            if not held:
                db.execute("DELETE FROM holds WHERE checkpoint=?", (checkpoint_id,))
            elif db.execute("SELECT 1 FROM checkpoints WHERE id=?", (checkpoint_id,)).fetchone():
                db.execute("INSERT OR IGNORE INTO holds (checkpoint) VALUES (?)", (checkpoint_id,))
            else:
                raise CheckpointNotFound(f"checkpoint {checkpoint_id}: not found; see `xen-vtpm checkpoints`")

    # --- verify ------------------------------------------------------------------------
    def verify(self, checkpoint_id: str) -> dict[str, Any]:
        """Check every MAC, tag and digest of one checkpoint, reading all of it; changes nothing.
        Memory stays bounded: the catalog answers the set comparisons and is read per pack and per batch."""
        info = self._row(checkpoint_id)
        with self.open_checkpoint(checkpoint_id) as reader:
            label = reader.label
            listed = (cid for rec in reader.manifest.streams for cid, _ in rec.chunks)
            count, unreferenced, unlisted = self.catalog.compare_refs(checkpoint_id, listed)
            if unreferenced:
                raise IntegrityError(f"{label}: chunk {unreferenced.hex()[:16]} of the manifest has no catalog "
                                     "reference; the catalog was altered — do not use this checkpoint")
            if unlisted:
                raise IntegrityError(f"{label}: catalog references chunk {unlisted.hex()[:16]} the manifest does "
                                     "not list; the catalog was altered")
            self._check_refcounts(checkpoint_id, label)
            # Every pack holding our chunks must be a catalog row too: recover's sweep removes pack
            # files no row claims, so a deleted row would turn into a deleted live pack.
            known = {row[0] for row in self.catalog.query("SELECT name FROM packs")}
            for missing in sorted(reader.pack_names() - known):
                raise IntegrityError(f"{label}: pack {missing} holds chunks of this checkpoint but has no catalog "
                                     "row; the catalog was altered — restore it before any other command")
            pack: str | None = None
            index: dict[int, tuple[bytes, int]] = {}
            for name, cid, off, ln in self.catalog.rows(   # our chunks and the bases of our delta chunks
                    "SELECT c.pack, c.id, c.offset, c.length FROM chunks c WHERE c.id IN "
                    "(SELECT chunk FROM refs WHERE checkpoint=?1) OR c.id IN "
                    "(SELECT d.base FROM refs r JOIN deps d ON d.chunk = r.chunk WHERE r.checkpoint=?1) "
                    "ORDER BY c.pack", (checkpoint_id,)):
                if name != pack:   # one pack's index in memory at a time
                    pack = name
                    try:
                        index = {o: (i, n) for i, o, n in read_index(self.pack_dir, pack)}
                    except IntegrityError as exc:
                        raise IntegrityError(f"{label}: {exc}") from None
                if index.get(off) != (bytes(cid), ln):
                    raise IntegrityError(f"{label}: pack {pack} index has no entry for chunk {bytes(cid).hex()[:16]} "
                                         f"at offset {off}; the catalog or the pack was altered")
            reader.refs_checked()
            for record in reader.manifest.streams:
                if record.kind == "blob":
                    reader.read_blob(record.name)
                else:
                    for _ in reader.stream(record.name):
                        pass
            return {"id": checkpoint_id, "name": info["name"], "vm_name": info["vm_name"],
                    "streams": len(reader.manifest.streams), "chunks": count, "size": info["size"],
                    "packs": len(reader.pack_names()), "status": "ok"}

    def _check_refcounts(self, checkpoint_id: str, label: str) -> None:
        """refcount = checkpoints referencing the chunk + delta chunks depending on it, for this
        checkpoint's chunks and the bases of its delta chunks; only a delta has deps rows."""
        rows = self.catalog.query(
            "SELECT c.id, c.refcount, (SELECT count(*) FROM refs r2 WHERE r2.chunk = c.id) AS users, "
            "(SELECT count(*) FROM deps d2 WHERE d2.base = c.id) AS deltas FROM chunks c "
            "WHERE (c.id IN (SELECT chunk FROM refs WHERE checkpoint=?1) OR c.id IN "
            "(SELECT d.base FROM refs r JOIN deps d ON d.chunk = r.chunk WHERE r.checkpoint=?1)) "
            "AND c.refcount != users + deltas LIMIT 1", (checkpoint_id,))
        for cid, refcount, users, deltas in rows:
            raise IntegrityError(f"{label}: chunk {bytes(cid).hex()[:16]} refcount {refcount} but {users} "
                                 f"checkpoints and {deltas} delta chunks use it; the catalog was altered")
        rows = self.catalog.query(
            "SELECT r.chunk FROM refs r JOIN deps d ON d.chunk = r.chunk JOIN chunks c ON c.id = r.chunk "
            "WHERE r.checkpoint=? AND c.delta = 0 LIMIT 1", (checkpoint_id,))
        for (cid,) in rows:
            raise IntegrityError(f"{label}: full chunk {bytes(cid).hex()[:16]} has deps rows; the catalog was altered")

    # --- delete ------------------------------------------------------------------------
    def delete(self, checkpoint_id: str, missing_ok: bool = False) -> int:
        """Delete a checkpoint, free chunks nothing else uses, drop dead packs and compact sparse ones.
        Returns the bytes freed on disk."""
        lock = self._owner(exclusive=True)
        try:
            unlink = self._delete_rows(checkpoint_id, lock.token, missing_ok)
            if unlink is None:
                return 0
            crashpoint("delete.committed")
            freed = self._finish_unlinks(unlink)
            freed += self._compact(checkpoint_id, lock.token)
            return freed
        finally:
            lock.release()

    def _delete_rows(self, checkpoint_id: str, token: str, missing_ok: bool) -> tuple[int, list[str]] | None:
        try:
            with self.catalog.transaction() as db:
                if not db.execute("SELECT 1 FROM checkpoints WHERE id=?", (checkpoint_id,)).fetchone():
                    if missing_ok:
                        return None
                    raise CheckpointNotFound(f"checkpoint {checkpoint_id}: not found; see `xen-vtpm checkpoints`")
                dead = db.execute("SELECT c.id, c.pack, c.length FROM refs r JOIN chunks c ON c.id = r.chunk "
                                  "WHERE r.checkpoint=? AND c.refcount=1", (checkpoint_id,)).fetchall()
                db.execute("UPDATE chunks SET refcount = refcount - 1 WHERE refcount > 1 AND id IN "
                           "(SELECT chunk FROM refs WHERE checkpoint=?)", (checkpoint_id,))
                db.execute("DELETE FROM refs WHERE checkpoint=?", (checkpoint_id,))
                dead += self._release_bases(db, [bytes(r[0]) for r in dead], checkpoint_id)
                db.executemany("DELETE FROM chunks WHERE id=?", [(r[0],) for r in dead])
                freed_per_pack: dict[str, int] = {}
                for _, pack, length in dead:
                    freed_per_pack[pack] = freed_per_pack.get(pack, 0) + ENTRY.size + length
                db.executemany("UPDATE packs SET live_bytes = live_bytes - ? WHERE name=?",
                               [(v, k) for k, v in freed_per_pack.items()])
                db.execute("DELETE FROM checkpoints WHERE id=?", (checkpoint_id,))
                empty = [r[0] for r in db.execute(
                    "SELECT name FROM packs p WHERE NOT EXISTS (SELECT 1 FROM chunks c WHERE c.pack = p.name)")]
                db.executemany("DELETE FROM packs WHERE name=?", [(n,) for n in empty])
                files = [StoreContext.manifest_rel(checkpoint_id)] + [f"packs/{n}{SUFFIX}" for n in empty]
                cur = db.execute("INSERT INTO journal (op, checkpoint, state, lock, payload) "
                                 "VALUES ('delete', ?, 'committed', ?, ?)",
                                 (checkpoint_id, token, json.dumps({"unlink": files})))
                return int(cur.lastrowid or 0), files
        except StorageError as exc:
            if "FOREIGN KEY" in str(exc):
                raise IntegrityError(f"checkpoint {checkpoint_id}: chunk refcounts disagree with the references "
                                     "(catalog altered); nothing was deleted — run `xen-vtpm verify --all`") from None
            raise

    @staticmethod
    def _release_bases(db: Any, dead: list[bytes], checkpoint_id: str) -> list[tuple[Any, ...]]:
        """The freed delta chunks release their bases: drop their deps rows, lower each base's
        refcount by the deltas it loses and return the bases nothing uses any more (bases are full
        chunks, so one round frees everything)."""
        released: dict[bytes, int] = {}
        gone = set(dead)
        for i in range(0, len(dead), 256):
            part = dead[i:i + 256]
            marks = ",".join("?" * len(part))
            for (base,) in db.execute(f"SELECT base FROM deps WHERE chunk IN ({marks})", part).fetchall():
                released[bytes(base)] = released.get(bytes(base), 0) + 1
            db.execute(f"DELETE FROM deps WHERE chunk IN ({marks})", part)
        freed = []
        for base, n in released.items():
            row = db.execute("SELECT id, pack, length, refcount FROM chunks WHERE id=?", (base,)).fetchone()
            if row is None or row[3] < n or base in gone:
                raise IntegrityError(f"checkpoint {checkpoint_id}: base chunk {base.hex()[:16]} refcount disagrees "
                                     "with its delta chunks (catalog altered); nothing was deleted — run "
                                     "`xen-vtpm verify --all`")
            if row[3] == n:
                freed.append(tuple(row[:3]))
            else:
                db.execute("UPDATE chunks SET refcount = refcount - ? WHERE id=?", (n, base))
        return freed

    def _finish_unlinks(self, job: tuple[int, list[str]]) -> int:
        jid, files = job
        freed = 0
        for i, rel in enumerate(files):
            path = self.state_dir / rel
            try:
                size = path.stat().st_size
            except FileNotFoundError:
                size = 0
            if unlink_if_present(path):
                freed += size
            if i == 0:
                crashpoint("delete.unlinked-one")
        with self.catalog.transaction() as db:
            db.execute("DELETE FROM journal WHERE id=?", (jid,))
        return freed

    def _compact(self, checkpoint_id: str, token: str) -> int:
        """Rewrite packs whose live fraction fell below ``compact_below`` into fresh packs."""
        sparse = self.catalog.query("SELECT name, size FROM packs WHERE live_bytes < ? * size ORDER BY name",
                                    (self.compact_below,))
        if not sparse:
            return 0
        new_name = new_pack_name()
        created = [f"packs/{new_name}{SUFFIX}", f"packs/{new_name}{SUFFIX}.tmp"]
        jid = self.catalog.journal_add("compact", checkpoint_id, token, {"create": created})
        reader = PackReader(self.pack_dir)
        moved: list[tuple[str, int, bytes]] = []
        writer: PackWriter | None = None
        try:
            writer = PackWriter(self.pack_dir, new_name)
            for pack, _ in sparse:
                for cid, offset, length in self.catalog.query(
                        "SELECT id, offset, length FROM chunks WHERE pack=? ORDER BY offset", (pack,)):
                    cid = bytes(cid)
                    nonce, sealed = reader.read_entry(pack, offset, length, cid, f"compacting pack {pack}")
                    moved.append((new_name, writer.add(cid, nonce, sealed), cid))
            size = writer.finish()
        except BaseException:
            # Compaction is an optimisation: give up cleanly, the old packs stay valid.
            if writer is not None:
                writer.discard()
            self.undo_files(created)
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM journal WHERE id=?", (jid,))
            raise
        finally:
            reader.close()
        crashpoint("compact.pack-published")
        old_files = [f"packs/{p}{SUFFIX}" for p, _ in sparse]
        with self.catalog.transaction() as db:
            db.execute("INSERT INTO packs (name, size, entries, live_bytes) VALUES (?,?,?,?)",
                       (new_name, size, len(moved), writer.size - HEADER.size))
            db.executemany("UPDATE chunks SET pack=?, offset=? WHERE id=?", moved)
            db.executemany("DELETE FROM packs WHERE name=?", [(p,) for p, _ in sparse])
            self.catalog.journal_update(db, jid, {"unlink": old_files}, state="committed")
        crashpoint("compact.committed")
        return self._finish_unlinks((jid, old_files)) - size

    # --- recover -----------------------------------------------------------------------
    def recover(self) -> dict[str, Any]:
        """Finish or undo what crashed writes/deletes left, remove orphaned files, and check that
        every pack the catalog references exists.  Safe to run at any time, concurrently too."""
        listing = self._listing()   # before reading the catalog: see _sweep
        report: dict[str, Any] = {"undone": [], "finished": [], "orphans_removed": 0}
        for entry in self.catalog.journal_entries():
            if owner_alive(self.lock_dir, entry["lock"]):
                continue
            if entry["state"] == "committed":
                self.undo_files(entry["payload"].get("unlink", []))
                report["finished"].append(f"{entry['op']} {entry['checkpoint']}")
            else:
                self.undo_files(entry["payload"].get("create", []))
                report["undone"].append(f"{entry['op']} {entry['checkpoint']}")
            with self.catalog.transaction() as db:
                db.execute("DELETE FROM journal WHERE id=?", (entry["id"],))
            unlink_if_present(self.lock_dir / f"{entry['lock']}.lock")
        report["orphans_removed"] = self._sweep(listing)
        self._check_packs_present()
        return report

    def _listing(self) -> list[Path]:
        try:
            return [p for d in (self.pack_dir, self.manifest_dir, self.lock_dir) for p in d.iterdir()]
        except OSError as exc:
            raise storage_error(exc, self.state_dir, "listing the store") from None

    def _sweep(self, listing: list[Path]) -> int:
        """Remove files no committed row and no live journal row claims.

        ``listing`` was taken before this read snapshot; a live write journals a file before
        creating it and commit swaps journal row for catalog rows atomically, so every file in
        the listing that still belongs to someone is claimed in the snapshot."""
        with self.catalog.snapshot() as db:
            claimed = {f"packs/{r[0]}{SUFFIX}" for r in db.execute("SELECT name FROM packs")}
            # A pack a chunk row points at is never garbage, even if its packs row went missing.
            claimed |= {f"packs/{r[0]}{SUFFIX}" for r in db.execute("SELECT DISTINCT pack FROM chunks")}
            claimed |= {f"manifests/{r[0]}.manifest" for r in db.execute("SELECT id FROM checkpoints")}
            tokens = set()
            for lock, payload in db.execute("SELECT lock, payload FROM journal"):
                tokens.add(lock)
                data = _unjson(payload)
                claimed |= set(data.get("create", [])) | set(data.get("unlink", []))
        removed = 0
        for path in listing:
            rel = f"{path.parent.name}/{path.name}"
            if path.parent == self.lock_dir:
                token = path.name.removesuffix(".lock")
                if path.suffix != ".lock" or path.name == "store.lock" or token in tokens:
                    continue
                if owner_alive(self.lock_dir, token):
                    continue
            elif rel in claimed or not STORE_FILE_RE.fullmatch(rel):
                continue   # files the store did not name are not ours to delete
            removed += unlink_if_present(path)
        return removed

    def _check_packs_present(self) -> None:
        missing = [name for (name,) in self.catalog.query("SELECT name FROM packs")
                   if not pack_path(self.pack_dir, name).exists()]
        if missing:
            users = self.catalog.query(
                "SELECT DISTINCT r.checkpoint FROM refs r JOIN chunks c ON c.id = r.chunk WHERE c.pack IN "
                f"({','.join('?' * len(missing))})", tuple(missing))
            raise IntegrityError(f"pack {missing[0]} (and {len(missing) - 1} more) is missing but committed "
                                 f"checkpoints {', '.join(sorted(u[0] for u in users))} use it; restore the state "
                                 "dir from backup or delete those checkpoints")


def _unjson(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else {}
    except ValueError:
        return {}
