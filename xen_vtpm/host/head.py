"""The catalog head: a MAC'd record binding the catalog and the audit chain to the TPM counter.

Freshness rule (Memoir/Ariadne style, one NV counter for the whole host): every
state change increments the counter and rewrites the head with the new value.
A head *behind* the counter means an older state dir or catalog was put back
(replay); a head *ahead* of it means the counter was reset or this is another TPM.

Crash safety of ``advance`` (increment and head write cannot be atomic):
1. the *intended* head is journalled as the ``pending`` row, in the same SQLite
   transaction as the caller's catalog change, and committed;
2. the counter is incremented;
3. the pending row becomes the ``current`` row (one transaction).
A crash before 2 leaves counter == current.counter with a pending row: the change
is committed, so ``settle`` rolls forward (increments, promotes).  A crash
between 2 and 3 leaves counter == pending.counter: ``settle`` promotes.  Nothing
else is accepted, so a copied-back state dir is still refused unless its
pending row names exactly the counter's current value — and such a copy can
only have been taken during the very last change, whose outcome it already holds.
"""
from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import sqlite3
import time
from typing import Any

from xen_vtpm.errors import CounterAhead, IntegrityError, ReplayDetected

from . import audit
from .catalogdb import GENESIS, guarded, opened
from .keys import SubKeys


@dataclasses.dataclass(frozen=True)
class Head:
    counter: int                  # TPM NV counter value this state belongs to
    seq: int                      # number of state changes since init
    catalog_digest: bytes         # caller-defined digest of the catalog contents
    audit_seq: int                # last audit record covered
    audit_hash: bytes             # its chain hash
    time: float

    def _mac(self, keys: SubKeys, kind: str) -> bytes:
        body = json.dumps([kind, self.counter, self.seq, self.catalog_digest.hex(), self.audit_seq,
                           self.audit_hash.hex(), repr(self.time)]).encode()
        return hmac.new(keys.head_mac, b"xen-vtpm head v1\0" + body, hashlib.sha256).digest()

    def as_dict(self) -> dict[str, Any]:
        return {"counter": self.counter, "seq": self.seq, "catalog_digest": self.catalog_digest.hex(),
                "audit_seq": self.audit_seq, "audit_hash": self.audit_hash.hex(), "time": self.time}


def read(conn: sqlite3.Connection, keys: SubKeys) -> tuple[Head | None, Head | None]:
    """(current, pending); IntegrityError if a row's MAC does not verify."""
    rows = {r[0]: r for r in conn.execute(
        "SELECT kind, counter, seq, catalog_digest, audit_seq, audit_hash, time, mac FROM head")}
    out: list[Head | None] = []
    for kind in ("current", "pending"):
        row = rows.get(kind)
        if row is None:
            out.append(None)
            continue
        head = Head(int(row[1]), int(row[2]), bytes(row[3]), int(row[4]), bytes(row[5]), float(row[6]))
        if not hmac.compare_digest(head._mac(keys, kind), bytes(row[7])):
            raise IntegrityError(f"catalog head ({kind}): MAC does not verify (edited, or made with another host "
                                 "key); restore the state dir from a backup")
        out.append(head)
    return out[0], out[1]


def write(conn: sqlite3.Connection, keys: SubKeys, kind: str, head: Head) -> None:
    """Stage a head row in the caller's transaction (the caller commits)."""
    conn.execute("INSERT OR REPLACE INTO head VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                 (kind, head.counter, head.seq, head.catalog_digest, head.audit_seq, head.audit_hash, head.time,
                  head._mac(keys, kind)))


def check_fresh(head: Head | None, counter_value: int, pending: Head | None = None) -> str:
    """'fresh', or 'pending' when a journalled change awaits ``settle``; raises on replay or reset."""
    if head is None:
        raise IntegrityError("catalog head missing although the host is provisioned (deleted?); "
                             "restore the state dir from a backup")
    if head.counter == counter_value:
        return "pending" if pending is not None else "fresh"
    if pending is not None and pending.counter == counter_value:
        return "pending"
    if head.counter < counter_value:
        raise ReplayDetected(f"catalog head is at counter {head.counter} but the TPM counter is at {counter_value}: "
                             "an older copy of the state dir or catalog was put back; restore the newest one")
    raise CounterAhead(f"catalog head is at counter {head.counter} but the TPM counter is only at {counter_value}: "
                       "the counter was reset or this is a different TPM; check the host TPM and counter_index")


def initial(conn: sqlite3.Connection, keys: SubKeys, counter_value: int) -> Head:
    """The head written by `xen-vtpm init` (no increment: defining the counter already moved it)."""
    audit_seq, audit_hash = audit.tip(conn)
    head = Head(counter_value, 0, GENESIS, audit_seq, audit_hash, time.time())
    write(conn, keys, "current", head)
    conn.commit()
    return head


def settle(host: Any, conn: sqlite3.Connection) -> Head:
    """Check freshness and finish a change a crash interrupted; return the current head."""
    current, pending = read(conn, host.keys)
    counter = host.counter_read()
    if check_fresh(current, counter, pending) == "fresh":
        return current  # type: ignore[return-value]  # check_fresh raised if None
    assert pending is not None
    if counter == current.counter:  # type: ignore[union-attr]
        counter = host.counter_increment()
    promoted = dataclasses.replace(pending, counter=counter)
    write(conn, host.keys, "current", promoted)
    conn.execute("DELETE FROM head WHERE kind = 'pending'")
    conn.commit()
    return promoted


def advance(host: Any, catalog_digest: bytes | None = None, conn: sqlite3.Connection | None = None) -> Head:
    """Record one state change: journal, increment the counter, write the new head.

    Pass ``conn`` with the catalog change still uncommitted to make the change and the
    journal entry one transaction.  ``host`` is ``provision.open_host(cfg)``.
    """
    if conn is None:
        with opened(host.state_dir, "advancing the catalog head") as own:
            return advance(host, catalog_digest, own)
    with guarded(host.state_dir, "advancing the catalog head"):
        # settle() commits only to finish an interrupted change; normally the caller's staged
        # change and the pending row below reach the disk in one commit.
        current = settle(host, conn)
        # Never anchor a log the head does not vouch for: a cut or rewritten log would be re-bound.
        audit_seq, audit_hash = host.prove_log(conn, current)
        intended = Head(current.counter + 1, current.seq + 1,
                        current.catalog_digest if catalog_digest is None else catalog_digest,
                        audit_seq, audit_hash, time.time())
        write(conn, host.keys, "pending", intended)
        conn.commit()
        value = host.counter_increment()
        done = dataclasses.replace(intended, counter=value)
        write(conn, host.keys, "current", done)
        conn.execute("DELETE FROM head WHERE kind = 'pending'")
        conn.commit()
        return done


def state(host: Any, conn: sqlite3.Connection) -> tuple[str, str]:
    """For `status`: (state, detail) without raising; state is fresh/pending/replayed/ahead/none/corrupt."""
    try:
        current, pending = read(conn, host.keys)
        if current is None:
            return "none", "no catalog head"
        counter = host.counter_read()
        result = check_fresh(current, counter, pending)
        return result, f"head at counter {current.counter}, seq {current.seq}"
    except ReplayDetected as exc:
        return "replayed", str(exc)
    except CounterAhead as exc:
        return "ahead", str(exc)
    except IntegrityError as exc:
        return "corrupt", str(exc)


def prove_log(conn: sqlite3.Connection, keys: SubKeys, *anchors: Head | None,
              since: tuple[int, bytes] | None = None) -> tuple[int, bytes]:
    """The audit log is intact and still holds every record the given head rows anchor; returns its tip.

    Records after the newest anchor are the ones appended since the last advance (the next one
    anchors them): the chain and their MACs protect them, the head cannot yet.  ``since``: a tip
    this process proved before (``audit.check_chain``); any doubt then means a whole walk."""
    try:
        return _prove_log(conn, keys, anchors, since)
    except IntegrityError:
        if since is None:
            raise
        return _prove_log(conn, keys, anchors, None)      # the whole walk names the damage


def _prove_log(conn: sqlite3.Connection, keys: SubKeys, anchors: tuple[Head | None, ...],
               since: tuple[int, bytes] | None) -> tuple[int, bytes]:
    count, last, hashes = audit.check_chain(conn, keys, since)
    for anchor in anchors:
        if anchor is None:
            continue
        if anchor.audit_seq > count:
            raise IntegrityError(f"audit record {count + 1}: hash chain broken (records {count + 1}.."
                                 f"{anchor.audit_seq} were removed from the end); restore the state dir from a backup")
        if anchor.audit_seq and _hash_of(conn, hashes, anchor.audit_seq) != anchor.audit_hash:
            raise IntegrityError(f"audit record {anchor.audit_seq}: does not match the hash the catalog head "
                                 "holds (log rewritten); restore the state dir from a backup")
    return count, last


def _hash_of(conn: sqlite3.Connection, walked: dict[int, bytes], seq: int) -> bytes | None:
    """A record's hash: as just recomputed, or (before a tip proved earlier) as stored."""
    if seq in walked:
        return walked[seq]
    row = conn.execute("SELECT hash FROM audit WHERE seq = ?", (seq,)).fetchone()
    return None if row is None else bytes(row[0])


def verify_audit(host: Any, conn: sqlite3.Connection) -> dict[str, Any]:
    """The audit chain is intact and ends where the TPM-bound head says it does."""
    current, pending = read(conn, host.keys)
    counter = host.counter_read()
    head_state = check_fresh(current, counter, pending)  # raises on replay / reset
    assert current is not None
    count, last = prove_log(conn, host.keys, current, pending)
    return {"status": "ok", "records": count, "anchored_through": current.audit_seq,
            "unanchored": count - current.audit_seq, "last_hash": last.hex(), "counter": counter,
            "catalog_head": head_state}
