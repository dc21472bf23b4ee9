"""Append-only, hash-chained audit log in the `audit` table of the catalog DB.

Each record's hash covers its fields (sequence number included) and the previous
record's hash, and carries an HMAC under the audit sub-key, so an edit, a removal
or a reordering breaks the chain at that record, and a rewritten chain cannot be
re-MAC'd without the sealed host key.  Removing records from the *end* is caught
by the catalog head, which carries the chain's last hash under the TPM counter
(records appended after the last counter bump are reported as not yet anchored).
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

from . import catalog_head
from .config import Config
from .errors import IntegrityError, PreconditionFailed
from .keys import SubKeys

SCHEMA = """
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
    return (0, catalog_head.GENESIS) if row is None else (int(row[0]), bytes(row[1]))


def append(host: Any, action: str, *, vm: str | None = None, checkpoint: str | None = None,
           result: str = "ok", detail: str = "", conn: sqlite3.Connection | None = None) -> dict[str, Any]:
    """Append one record (``host`` = ``provision.open_host(cfg)``) and commit.

    ``counter`` in the record is the head's counter when the record was written; call
    ``catalog_head.advance`` afterwards for a state change, which anchors the record.
    """
    own = conn is None
    conn = conn or catalog_head.connect(host.state_dir)
    try:
        if not conn.in_transaction:
            conn.execute("BEGIN IMMEDIATE")  # serialise appenders: read tip and insert atomically
        seq, prev = tip(conn)
        current, _ = catalog_head.read(conn, host.keys)
        rec: dict[str, Any] = {
            "seq": seq + 1, "time": time.time(), "uid": os.getuid(), "user": _who(), "host": socket.gethostname(),
            "action": action, "vm": vm, "checkpoint": checkpoint, "result": result, "detail": detail,
            "counter": current.counter if current else host.counter_read(),
        }
        digest = _hash(prev, rec)
        conn.execute(f"INSERT INTO audit ({_COLUMNS}) VALUES ({', '.join('?' * (len(_FIELDS) + 3))})",
                     [rec[f] for f in _FIELDS] + [prev, digest, _mac(host.keys, digest)])
        conn.commit()
        return _public(rec, digest)
    finally:
        if own:
            conn.close()


def _rows(conn: sqlite3.Connection) -> list[dict[str, Any]]:
    cur = conn.execute(f"SELECT {_COLUMNS} FROM audit ORDER BY seq")
    names = [d[0] for d in cur.description]
    return [dict(zip(names, row)) for row in cur]


def _public(rec: dict[str, Any], digest: bytes) -> dict[str, Any]:
    out = {f: rec[f] for f in _FIELDS}
    out["time"] = datetime.datetime.fromtimestamp(rec["time"], datetime.timezone.utc).isoformat(timespec="seconds")
    out["hash"] = bytes(digest).hex()
    return out


def _open(cfg: Config) -> sqlite3.Connection:
    if not (cfg.state_dir / catalog_head.DB_NAME).exists():
        raise PreconditionFailed(f"{cfg.state_dir}: no catalog (host not provisioned); run `xen-vtpm init`")
    return catalog_head.connect(cfg.state_dir)


def records(cfg: Config) -> list[dict[str, Any]]:
    """All records, oldest first (no TPM access: reading the log needs no key)."""
    conn = _open(cfg)
    try:
        return [_public(r, r["hash"]) for r in _rows(conn)]
    finally:
        conn.close()


def check_chain(conn: sqlite3.Connection, keys: SubKeys) -> tuple[int, bytes, dict[int, bytes]]:
    """Walk the chain; IntegrityError naming the first bad record.  Returns (count, last hash, seq->hash)."""
    prev, hashes = catalog_head.GENESIS, {}
    for expected, row in enumerate(_rows(conn), start=1):
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
    return len(hashes), prev, hashes


def verify_with(host: Any, conn: sqlite3.Connection) -> dict[str, Any]:
    count, last, hashes = check_chain(conn, host.keys)
    current, pending = catalog_head.read(conn, host.keys)
    counter = host.counter_read()
    head_state = catalog_head.check_fresh(current, counter, pending)  # raises on replay / reset
    assert current is not None
    if current.audit_seq > count:
        raise IntegrityError(f"audit record {count + 1}: hash chain broken (records {count + 1}..{current.audit_seq} "
                             "were removed from the end); restore the state dir from a backup")
    if current.audit_seq and hashes[current.audit_seq] != current.audit_hash:
        raise IntegrityError(f"audit record {current.audit_seq}: does not match the hash the catalog head "
                             "holds (log rewritten); restore the state dir from a backup")
    return {"status": "ok", "records": count, "anchored_through": current.audit_seq,
            "unanchored": count - current.audit_seq, "last_hash": last.hex(), "counter": counter,
            "catalog_head": head_state}


def verify(cfg: Config) -> dict[str, Any]:
    """Check every record, the chain, its MACs and its binding to the TPM counter."""
    from .provision import open_host  # provision imports this module
    conn = _open(cfg)
    try:
        return verify_with(open_host(cfg), conn)
    finally:
        conn.close()


def render(rows: list[dict[str, Any]]) -> str:
    """Text table; a long result (a refusal names the failed check) is cut here, `--json` has it whole."""
    from .cli import render_table
    if not rows:
        return "(no audit records)"
    cols = ("seq", "time", "user", "action", "vm", "checkpoint", "counter", "result", "detail")
    shown = [dict(r, result=_cut(r.get("result")), detail=_cut(r.get("detail"))) for r in rows]
    return render_table(shown, cols)


def _cut(text: Any, limit: int = 60) -> Any:
    return text if not isinstance(text, str) or len(text) <= limit else text[:limit - 1] + "…"
