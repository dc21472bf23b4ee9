"""The chunks one checkpoint write adds, the ids it uses and its deltas' bases, until its commit.

Their number grows with the guest (about 57,000 per GiB), so they are not Python objects but rows of
temporary tables on the catalog's connection: SQLite keeps them in its temp database (a bounded
page cache, spilling to an unnamed temp file), which disappears with the connection, crash included.
"""
from __future__ import annotations

import itertools
import secrets
import sqlite3
from collections.abc import Iterable, Iterator
from typing import Any

from .catalog import Catalog
from .fsio import storage_error

_TEMP_CACHE_KIB = 8192   # the temp database's page cache: what these tables may cost in RAM
_ROWS_PER_INSERT = 256   # well under SQLite's 32766 bound parameters per statement
_IDS_PER_LOOKUP = 1000


class PendingChunks:
    """New chunks (placed in a pack), their bases if deltas, and the ids the manifest uses."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._db: sqlite3.Connection = catalog.db
        tag = secrets.token_hex(6)
        self._new, self._used, self._deps = f"temp.new_{tag}", f"temp.used_{tag}", f"temp.deps_{tag}"
        self._run(f"PRAGMA temp.cache_size=-{_TEMP_CACHE_KIB}")
        # Each batch is one temp transaction; a journal in memory (one batch's undo) makes its commit
        # cheap: 1.9 instead of 6.3 µs per row measured here.
        self._run("PRAGMA temp.journal_mode=MEMORY")
        self._run(f"CREATE TEMP TABLE new_{tag} (id BLOB PRIMARY KEY, pack INTEGER, offset INTEGER, "
                  "plain INTEGER, sealed INTEGER, delta INTEGER) WITHOUT ROWID")
        self._run(f"CREATE TEMP TABLE used_{tag} (id BLOB PRIMARY KEY) WITHOUT ROWID")
        self._run(f"CREATE TEMP TABLE deps_{tag} (chunk BLOB, base BLOB, PRIMARY KEY (chunk, base)) WITHOUT ROWID")

    def _run(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        try:
            return self._db.execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise storage_error(exc, self._catalog.path, "keeping the new chunks of a write") from None

    def _insert(self, head: str, rows: Iterable[tuple[Any, ...]]) -> None:
        """``head`` ("INSERT INTO t (a, b) VALUES") for every row, a few hundred rows per statement: one
        SQLite step per statement, so the GIL (released around each step) changes hands rarely; per
        row, the threads chunking and sealing beside this one would keep taking it."""
        it = iter(rows)
        try:
            self._db.execute("SAVEPOINT pending")   # one temp transaction per call, nested in any caller's
            try:
                while part := list(itertools.islice(it, _ROWS_PER_INSERT)):
                    marks = "(" + ",".join("?" * len(part[0])) + ")"
                    self._db.execute(f"{head} {','.join([marks] * len(part))}",
                                     [value for row in part for value in row])
            except BaseException:
                self._db.execute("ROLLBACK TO pending")
                raise
            finally:
                self._db.execute("RELEASE pending")
        except sqlite3.Error as exc:
            raise storage_error(exc, self._catalog.path, "keeping the new chunks of a write") from None

    def unknown(self, ids: list[bytes]) -> set[bytes]:
        """Those of ``ids`` the catalog does not hold (the writer's id set already left out what this
        write has taken, so the write's own new chunks need no lookup here)."""
        known: set[bytes] = set()
        for i in range(0, len(ids), _IDS_PER_LOOKUP):
            part = ids[i:i + _IDS_PER_LOOKUP]
            known.update(bytes(r[0]) for r in self._run(
                f"SELECT id FROM chunks WHERE id IN ({','.join('?' * len(part))})", tuple(part)))
        return set(ids) - known

    def place(self, placed: list[tuple[bytes, int, int, int, int, list[bytes] | None]]) -> None:
        """(id, pack index, entry offset, plaintext length, sealed length, base ids of a delta or None)
        of chunks now sealed into a pack."""
        self._insert(f"INSERT INTO {self._new} (id, pack, offset, plain, sealed, delta) VALUES",
                     ((cid, pack, offset, plain, sealed, int(bases is not None))
                      for cid, pack, offset, plain, sealed, bases in placed))
        deps = [(cid, base) for cid, _, _, _, _, bases in placed if bases for base in bases]
        if deps:
            self._insert(f"INSERT INTO {self._deps} (chunk, base) VALUES", deps)

    def use(self, ids: Iterable[bytes]) -> None:
        """The manifest's chunk ids (repeats fold)."""
        self._insert(f"INSERT OR IGNORE INTO {self._used} (id) VALUES", ((cid,) for cid in ids))

    # --- at commit, inside the catalog transaction ---------------------------------------------
    def raced(self, db: sqlite3.Connection) -> list[tuple[bytes, int, int]]:
        """(id, pack index, sealed length) of new chunks another checkpoint committed first; their
        bases are forgotten (the committed copy carries its own)."""
        rows = [(bytes(r[0]), r[1], r[2]) for r in db.execute(
            f"SELECT n.id, n.pack, n.sealed FROM {self._new} n JOIN chunks c ON c.id = n.id")]
        if rows:
            db.execute(f"DELETE FROM {self._deps} WHERE chunk IN (SELECT id FROM main.chunks)")
        return rows

    def placed(self, db: sqlite3.Connection) -> Iterator[tuple[bytes, int, int, int, int, int]]:
        """Every new chunk in id order (B-tree inserts in key order touch each page once):
        (id, pack index, entry offset, plaintext length, sealed length, delta flag)."""
        cur = db.execute(f"SELECT id, pack, offset, plain, sealed, delta FROM {self._new} ORDER BY id")
        while rows := cur.fetchmany(512):
            for cid, pack, offset, plain, sealed, delta in rows:
                yield bytes(cid), pack, offset, plain, sealed, delta

    def insert_refs(self, db: sqlite3.Connection, checkpoint_id: str) -> None:
        db.execute(f"INSERT INTO refs (checkpoint, chunk) SELECT ?, id FROM {self._used}", (checkpoint_id,))

    def insert_deps(self, db: sqlite3.Connection) -> None:
        """The bases of the new delta chunks (after raced() and after their chunk rows)."""
        db.execute(f"INSERT INTO deps (chunk, base) SELECT chunk, base FROM {self._deps} ORDER BY chunk, base")

    def recount(self, db: sqlite3.Connection, checkpoint_id: str) -> None:
        """refcount = references + delta chunks depending on it, for every chunk this checkpoint uses
        and every base of its new deltas."""
        db.execute("UPDATE chunks SET refcount = (SELECT count(*) FROM refs r WHERE r.chunk = chunks.id) "
                   "+ (SELECT count(*) FROM deps d WHERE d.base = chunks.id) "
                   f"WHERE id IN (SELECT chunk FROM refs WHERE checkpoint=?) OR id IN (SELECT base FROM {self._deps})",
                   (checkpoint_id,))

    def drop(self) -> None:
        for table in (self._new, self._used, self._deps):
            try:
                self._db.execute(f"DROP TABLE IF EXISTS {table}")
            except sqlite3.Error:
                pass   # the connection is closing or broken: its temp database goes with it
