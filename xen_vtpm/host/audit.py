"""Append-only, hash-chained audit log in the `audit` table of the catalog DB.

Each record's hash covers its fields (sequence number included) and the previous
record's hash, and carries an HMAC under the audit sub-key, so an edit, a removal
or a reordering breaks the chain at that record, and a rewritten chain cannot be
re-MAC'd without the sealed host key.  Removing records from the *end* is caught
by the catalog head, which carries the chain's last hash under the TPM counter
(``head.prove_log``: every append and every head advance checks it first, so a
damaged log is never extended or re-anchored).
"""
from __future__ import annotations

import datetime
import getpass
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import time
from typing import Any

from xen_vtpm.errors import IntegrityError

from .catalogdb import GENESIS
from .keys import SubKeys

_FIELDS = ("seq", "time", "uid", "user", "host", "action", "vm", "checkpoint", "result", "detail", "counter")
_COLUMNS = ", ".join(_FIELDS + ("prev_hash", "hash", "mac"))


def _hash(prev_hash: bytes, rec: dict[str, Any]) -> bytes:
    body = json.dumps([rec[f] for f in _FIELDS], separators=(",", ":")).encode()
    return hashlib.sha256(b"xen-vtpm audit v1\0" + prev_hash + body).digest()


def _mac(keys: SubKeys, digest: bytes) -> bytes:
    return hmac.new(keys.audit_mac, digest, hashlib.sha256).digest()


def _who() -> str:
    try:
        login = getpass.getuser()
    except (KeyError, OSError):
        login = "?"
    sudo = os.environ.get("SUDO_USER")
    return f"{login} (sudo by {sudo})" if sudo and sudo != login else login


def tip(conn: sqlite3.Connection) -> tuple[int, bytes]:
    """(seq, hash) of the last record; (0, GENESIS) for an empty log."""
    row = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
    return (0, GENESIS) if row is None else (int(row[0]), bytes(row[1]))


def append(conn: sqlite3.Connection, keys: SubKeys, *, counter: int, action: str, vm: str | None = None,
           checkpoint: str | None = None, result: str = "ok", detail: str = "") -> dict[str, Any]:
    """Append one record and commit.  ``counter`` is the head's counter when the record is
    written; the next head advance anchors the record."""
    if not conn.in_transaction:
        conn.execute("BEGIN IMMEDIATE")  # serialise appenders: read tip and insert atomically
    seq, prev = tip(conn)
    rec: dict[str, Any] = {
        "seq": seq + 1, "time": time.time(), "uid": os.getuid(), "user": _who(), "host": socket.gethostname(),
        "action": action, "vm": vm, "checkpoint": checkpoint, "result": result, "detail": detail,
        "counter": counter,
    }
    digest = _hash(prev, rec)
    conn.execute(f"INSERT INTO audit ({_COLUMNS}) VALUES ({', '.join('?' * (len(_FIELDS) + 3))})",
                 [rec[f] for f in _FIELDS] + [prev, digest, _mac(keys, digest)])
    conn.commit()
    return _public(rec, digest)


def _rows(conn: sqlite3.Connection, after: int = 0) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT {_COLUMNS} FROM audit WHERE seq > ? ORDER BY seq", (after,))
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row, strict=True)) for row in cur]


def _public(rec: dict[str, Any], digest: bytes) -> dict[str, Any]:
    out = {f: rec[f] for f in _FIELDS}
    out["time"] = datetime.datetime.fromtimestamp(rec["time"], datetime.UTC).isoformat(timespec="seconds")
    out["hash"] = bytes(digest).hex()
    return out


def records(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    """All records, oldest first (reading the log needs no key)."""
    return [_public(r, r["hash"]) for r in _rows(conn)]


def check_chain(conn: sqlite3.Connection, keys: SubKeys,
                since: tuple[int, bytes] | None = None) -> tuple[int, bytes, dict[int, bytes]]:
    """Walk the chain; IntegrityError naming the first bad record.  Returns (count, last hash, seq->hash).

    ``since`` is (seq, hash) of a record this process already proved by walking up to it: if every
    record up to it is still there and it still carries that hash, only the records after it are
    walked (seq->hash then starts there).  Otherwise the whole chain is walked, which names the
    damage.  An edit before ``since`` made meanwhile is not seen here, but cannot be hidden either:
    every anchor commits to the hashes as first computed, so the next full walk reports it."""
    if since is not None and since[0] > 0:
        seq, digest = since
        row = conn.execute("SELECT hash, (SELECT COUNT(*) FROM audit WHERE seq <= ?) FROM audit WHERE seq = ?",
                           (seq, seq)).fetchone()
        if row is not None and bytes(row[0]) == digest and row[1] == seq:
            return _walk(conn, keys, seq, digest)
    return _walk(conn, keys, 0, GENESIS)


def _walk(conn: sqlite3.Connection, keys: SubKeys, start: int, prev: bytes) -> tuple[int, bytes, dict[int, bytes]]:
    count, hashes = start, ({start: prev} if start else {})
    for expected, row in enumerate(_rows(conn, start), start=start + 1):
        seq = row["seq"]
        where = f"audit record {expected}"
        if seq != expected:
            raise IntegrityError(f"{where}: hash chain broken (record removed; the log jumps to record {seq}); "
                                 "restore the state dir from a backup")
        if bytes(row["prev_hash"]) != prev:
            raise IntegrityError(f"{where}: hash chain broken (it or an earlier record was edited, removed or "
                                 "reordered); restore the state dir from a backup")
        digest = _hash(prev, row)
        if digest != bytes(row["hash"]):
            raise IntegrityError(f"{where}: hash chain broken (its contents were edited or reordered); "
                                 "restore the state dir from a backup")
        if not hmac.compare_digest(_mac(keys, digest), bytes(row["mac"])):
            raise IntegrityError(f"{where}: MAC does not verify (chain rewritten without the host key); "
                                 "restore the state dir from a backup")
        prev = hashes[seq] = digest
        count = seq
    return count, prev, hashes
