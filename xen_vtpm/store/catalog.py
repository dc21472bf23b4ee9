"""The store's tables in the shared SQLite catalog (schema: docs/formats.md, "Checkpoint store" §3).

The file is shared with the host-TPM code (tables ``audit`` and ``head``), so this module
touches only its own tables and keeps its schema version in ``store_meta`` rather than
PRAGMA user_version.  WAL mode lets readers run beside a writer; every change happens in an
explicit ``BEGIN IMMEDIATE`` transaction; ``synchronous=FULL`` makes a commit durable before
the coordinator bumps the TPM counter.
"""
from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from ..errors import IntegrityError, PreconditionFailed
from .fsio import storage_error

SCHEMA_VERSION = 3   # 2: delta chunks (chunks.delta, deps); 3: holds

_SCHEMA = """
CREATE TABLE IF NOT EXISTS store_meta (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS packs (
    name        TEXT PRIMARY KEY,
    size        INTEGER NOT NULL,
    entries     INTEGER NOT NULL,
    live_bytes  INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS chunks (
    id        BLOB PRIMARY KEY,
    pack      TEXT NOT NULL REFERENCES packs(name),
    offset    INTEGER NOT NULL,
    length    INTEGER NOT NULL,
    plain_len INTEGER NOT NULL,
    refcount  INTEGER NOT NULL CHECK (refcount > 0),
    delta     INTEGER NOT NULL DEFAULT 0
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS chunks_by_pack ON chunks(pack);
CREATE TABLE IF NOT EXISTS deps (
    chunk BLOB NOT NULL REFERENCES chunks(id),
    base  BLOB NOT NULL REFERENCES chunks(id),
    PRIMARY KEY (chunk, base)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS deps_by_base ON deps(base);
CREATE TABLE IF NOT EXISTS checkpoints (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    vm_uuid      TEXT NOT NULL,
    vm_name      TEXT NOT NULL,
    created_us   INTEGER NOT NULL,
    size         INTEGER NOT NULL,
    stored_bytes INTEGER NOT NULL,
    manifest     BLOB NOT NULL
);
CREATE UNIQUE INDEX IF NOT EXISTS checkpoints_by_name ON checkpoints(vm_uuid, name);
CREATE TABLE IF NOT EXISTS refs (
    checkpoint TEXT NOT NULL REFERENCES checkpoints(id) ON DELETE CASCADE,
    chunk      BLOB NOT NULL REFERENCES chunks(id),
    PRIMARY KEY (checkpoint, chunk)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS refs_by_chunk ON refs(chunk);
CREATE TABLE IF NOT EXISTS holds (
    checkpoint TEXT PRIMARY KEY REFERENCES checkpoints(id) ON DELETE CASCADE
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS journal (
    id         INTEGER PRIMARY KEY,
    op         TEXT NOT NULL,
    checkpoint TEXT NOT NULL,
    state      TEXT NOT NULL,
    lock       TEXT NOT NULL,
    payload    TEXT NOT NULL
);
"""


class Catalog:
    """One connection to the catalog; use ``transaction()`` for every change."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self.db = sqlite3.connect(path, isolation_level=None, timeout=30.0, check_same_thread=False)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA foreign_keys=ON")
            self.db.execute("PRAGMA synchronous=FULL")
            with self.transaction():
                for stmt in filter(str.strip, _SCHEMA.split(";")):
                    self.db.execute(stmt)
                row = self.db.execute("SELECT value FROM store_meta WHERE key='schema_version'").fetchone()
                if row is None:
                    self.db.execute("INSERT INTO store_meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
                elif row[0] in ("1", "2"):   # the schema script above created what they lack, empty
                    if row[0] == "1":        # version 1 had no delta chunks: every chunk is full
                        self.db.execute("ALTER TABLE chunks ADD COLUMN delta INTEGER NOT NULL DEFAULT 0")
                    self.db.execute("UPDATE store_meta SET value=? WHERE key='schema_version'", (str(SCHEMA_VERSION),))
                elif row[0] != str(SCHEMA_VERSION):
                    raise PreconditionFailed(f"{path}: store schema version {row[0]} is not the supported "
                                             f"{SCHEMA_VERSION}; use the xen-vtpm release that wrote it")
        except sqlite3.Error as exc:
            raise storage_error(exc, path, "opening the catalog") from None

    def close(self) -> None:
        self.db.close()

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        try:
            self.db.execute("BEGIN IMMEDIATE")
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, "starting a catalog transaction") from None
        try:
            yield self.db
            self.db.execute("COMMIT")
        except BaseException as exc:
            if self.db.in_transaction:
                self.db.execute("ROLLBACK")
            if isinstance(exc, sqlite3.Error):
                raise storage_error(exc, self.path, "updating the catalog") from None
            raise

    @contextlib.contextmanager
    def snapshot(self) -> Iterator[sqlite3.Connection]:
        """A consistent read view (one read transaction)."""
        try:
            self.db.execute("BEGIN")
            yield self.db
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, "reading the catalog") from None
        finally:
            if self.db.in_transaction:
                self.db.execute("COMMIT")

    def query(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return list(self.rows(sql, args))

    def rows(self, sql: str, args: tuple[Any, ...] = ()) -> Iterator[tuple[Any, ...]]:
        """Like ``query``, a few hundred rows at a time (for results that grow with a guest's size)."""
        try:
            cur = self.db.execute(sql, args)
            while batch := cur.fetchmany(512):
                yield from batch
        except sqlite3.OperationalError as exc:
            if "decode" in str(exc):   # a text column holding bytes no writer of ours produced
                raise IntegrityError(f"{self.path}: catalog holds a malformed value ({exc}); the catalog was "
                                     "altered — run `xen-vtpm verify --all`") from None
            raise storage_error(exc, self.path, "reading the catalog") from None
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, "reading the catalog") from None

    def compare_refs(self, checkpoint_id: str, ids: Iterable[bytes]) -> tuple[int, bytes | None, bytes | None]:
        """Compare the chunks a manifest lists (``ids``, repeats allowed) with a checkpoint's references:
        (distinct ids, the smallest id not referenced, the smallest reference not in ``ids``).

        The ids pass through a temporary table (the temp database, never the catalog file), so
        memory does not grow with the guest's size."""
        try:
            self.db.execute("CREATE TEMP TABLE IF NOT EXISTS listed (id BLOB PRIMARY KEY) WITHOUT ROWID")
            self.db.execute("SAVEPOINT compare_refs")
            try:
                self.db.executemany("INSERT OR IGNORE INTO temp.listed VALUES (?)", ((i,) for i in ids))
                count = self.db.execute("SELECT count(*) FROM temp.listed").fetchone()[0]
                unreferenced = self.db.execute(
                    "SELECT min(id) FROM temp.listed WHERE id NOT IN (SELECT chunk FROM refs WHERE checkpoint=?)",
                    (checkpoint_id,)).fetchone()[0]
                unlisted = self.db.execute(
                    "SELECT min(chunk) FROM refs WHERE checkpoint=? AND chunk NOT IN (SELECT id FROM temp.listed)",
                    (checkpoint_id,)).fetchone()[0]
            finally:
                self.db.execute("ROLLBACK TO compare_refs")
                self.db.execute("RELEASE compare_refs")
        except sqlite3.Error as exc:
            raise storage_error(exc, self.path, "comparing a manifest with the catalog") from None
        return count, unreferenced and bytes(unreferenced), unlisted and bytes(unlisted)

    # --- journal -----------------------------------------------------------------
    def journal_add(self, op: str, checkpoint: str, lock: str, payload: dict[str, Any],
                    state: str = "open") -> int:
        with self.transaction() as db:
            cur = db.execute("INSERT INTO journal (op, checkpoint, state, lock, payload) VALUES (?,?,?,?,?)",
                             (op, checkpoint, state, lock, json.dumps(payload)))
            return int(cur.lastrowid or 0)

    def journal_update(self, db: sqlite3.Connection, jid: int, payload: dict[str, Any],
                       state: str | None = None) -> None:
        """Inside a caller's transaction, so the update lands atomically with the change it describes."""
        if state is None:
            db.execute("UPDATE journal SET payload=? WHERE id=?", (json.dumps(payload), jid))
        else:
            db.execute("UPDATE journal SET payload=?, state=? WHERE id=?", (json.dumps(payload), state, jid))

    def journal_entries(self) -> list[dict[str, Any]]:
        rows = self.query("SELECT id, op, checkpoint, state, lock, payload FROM journal ORDER BY id")
        return [dict(id=r[0], op=r[1], checkpoint=r[2], state=r[3], lock=r[4], payload=json.loads(r[5]))
                for r in rows]
