"""The host's tables in ``catalog.sqlite``: the catalog head and the audit log.

The checkpoint store keeps its own tables in the same file, so one SQLite transaction can
change the catalog and stage the head that binds it.  This module only opens the file and
owns the two tables' schemas; ``head`` and ``audit`` hold what the rows mean.
"""
from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

from xen_vtpm.durable import storage_error
from xen_vtpm.errors import StorageError

DB_NAME = "catalog.sqlite"
GENESIS = bytes(32)          # the "previous hash" of the first audit record and the empty catalog's digest

HEAD_SCHEMA = """
CREATE TABLE IF NOT EXISTS head (
    kind TEXT PRIMARY KEY CHECK (kind IN ('current', 'pending')),
    counter INTEGER NOT NULL,
    seq INTEGER NOT NULL,
    catalog_digest BLOB NOT NULL,
    audit_seq INTEGER NOT NULL,
    audit_hash BLOB NOT NULL,
    time REAL NOT NULL,
    mac BLOB NOT NULL
)"""

AUDIT_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    host TEXT NOT NULL,
    action TEXT NOT NULL,
    vm TEXT,
    checkpoint TEXT,
    result TEXT NOT NULL,
    detail TEXT NOT NULL,
    counter INTEGER NOT NULL,
    prev_hash BLOB NOT NULL,
    hash BLOB NOT NULL,
    mac BLOB NOT NULL
)"""


def connect(state_dir: Path) -> sqlite3.Connection:
    """Open the shared catalog DB and make sure the head and audit tables exist."""
    path = Path(state_dir) / DB_NAME
    try:
        conn = sqlite3.connect(path, timeout=30)
        # The head row written after an NV increment must survive a power cut.  In WAL mode a commit
        # is durable once FULL has fsync'd the WAL; in the default rollback-journal mode the commit is
        # the journal's unlink, which FULL leaves without a directory fsync (docs/formats.md §4).
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute(HEAD_SCHEMA)
        conn.execute(AUDIT_SCHEMA)
        conn.commit()
    except sqlite3.Error as exc:
        raise StorageError(f"{path}: cannot open the catalog ({exc}); "
                           "check the state dir permissions and free space") from None
    return conn


@contextlib.contextmanager
def guarded(state_dir: Path, action: str) -> Iterator[None]:
    """Any SQLite failure on the catalog (a full disk above all, at whatever point it strikes)
    leaves as the one-line StorageError (DiskFull) for ``action``, never as a traceback."""
    try:
        yield
    except sqlite3.Error as exc:
        raise storage_error(exc, Path(state_dir) / DB_NAME, action) from None


@contextlib.contextmanager
def opened(state_dir: Path, action: str) -> Iterator[sqlite3.Connection]:
    """A guarded connection for one step of the host's work, closed at the end."""
    with guarded(state_dir, action):
        conn = connect(state_dir)
        try:
            yield conn
        finally:
            conn.close()
