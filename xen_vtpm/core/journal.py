"""Write-ahead journal of the coordinator's sequences.

Before each side effect (pause a domain, ask the manager to copy an entry,
replace a vTPM image, ...) the coordinator records the step it is *about to*
take.  After a crash, `xen-vtpm recover` reads the last recorded step of every
unfinished operation and finishes or undoes it.  Steps are therefore written
and fsync'd (SQLite synchronous=FULL) before the action, and every recovery
action is idempotent: a step recorded but never executed is safe to redo or
undo.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import hmac
import json
import os
import sqlite3
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xen_vtpm import faults
from xen_vtpm.durable import storage_error
from xen_vtpm.errors import IntegrityError, StorageError

SCHEMA = """
CREATE TABLE IF NOT EXISTS op_journal (
    op_id    INTEGER PRIMARY KEY AUTOINCREMENT,
    kind     TEXT NOT NULL,
    vm       TEXT NOT NULL,
    started  REAL NOT NULL,
    finished REAL,
    outcome  TEXT,
    params   TEXT NOT NULL,
    mac      BLOB NOT NULL,
    fin_mac  BLOB
);
CREATE TABLE IF NOT EXISTS op_steps (
    op_id INTEGER NOT NULL REFERENCES op_journal(op_id),
    seq   INTEGER NOT NULL,
    step  TEXT NOT NULL,
    data  TEXT NOT NULL,
    at    REAL NOT NULL,
    mac   BLOB NOT NULL,
    PRIMARY KEY (op_id, seq)
);
"""


@dataclass(frozen=True)
class OpParams:
    """What an operation needs to be finished or undone by ``recover`` (journaled with it, MAC'd)."""
    guest: str                                 # the guest's name when the operation began
    checkpoint: str | None = None              # the checkpoint written, restored or deleted
    name: str | None = None                    # its name (snapshot, save)
    vtpm: str | None = None                    # VtpmRef.backend: the vTPM stub domain's name, swtpm-<guest>
    vtpm_kind: str = "stubdom"                 # VtpmRef.backend_kind: which backend undoes or finishes it
    guest_was_paused: bool = False             # snapshot/save: leave a paused guest paused on undo
    safety: str | None = None                  # rollback: the safety checkpoint taken first
    paused: bool = False                       # rollback/restore: leave the restored guest paused
    path: str | None = None                    # save/restore: the save file
    moved: bool = False                        # restore: the vTPM moved on and is put back
    manager_checkpoint: str | None = None      # delete: the manager entry to discard
    # migrate / migrate-in (core/migration.py)
    host: str | None = None                    # the other host (source: HOST as given; destination: its trusted name)
    ssh: str | None = None                     # source: the -s command that reaches the destination
    transfer: str | None = None                # the transfer id the destination chose
    peer: str | None = None                    # the other host's signing key (hex), pinned for this move
    vtpm_uuid: str | None = None               # the vTPM's UUID at its manager
    checkpoints: tuple[str, ...] = ()          # --with-checkpoints: the checkpoints that move
    removes: tuple[str, ...] = ()              # prune: the checkpoints it deletes
    manager_checkpoints: tuple[str, ...] = ()  # prune: their manager entries; migrate-in: the moved ones'

    def to_json(self) -> str:
        return json.dumps({k: v for k, v in dataclasses.asdict(self).items() if v not in (None, False, ())},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> OpParams:
        # JSON has no tuples: the lists are the tuple fields.
        values: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()}
        return cls(**values)


@dataclass
class Operation:
    op_id: int
    kind: str
    vm: str
    params: OpParams
    steps: list[tuple[str, dict[str, Any]]] = field(default_factory=list)
    # The last step journaled before a crash: steps before it completed, it may not have.
    resume_point: str | None = None

    @property
    def last_step(self) -> str | None:
        return self.steps[-1][0] if self.steps else None

    def reached(self, step: str) -> bool:
        return any(name == step for name, _ in self.steps)

    def data(self, step: str) -> dict[str, Any]:
        return next((data for name, data in reversed(self.steps) if name == step), {})


class Journal:
    """`mac_key` authenticates every row: recover acts on the journal (it can destroy a guest
    and roll it forward to a checkpoint), so a row an attacker wrote must never be obeyed."""

    def __init__(self, db_path: Path, mac_key: bytes) -> None:
        self.db_path = Path(db_path)
        self.mac_key = mac_key
        try:
            self.db_path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.db = sqlite3.connect(self.db_path, timeout=30, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=FULL")
            self.db.executescript(SCHEMA)
            os.chmod(self.db_path, 0o600)
        except (sqlite3.Error, OSError) as exc:
            raise StorageError(f"{self.db_path}: cannot open the journal ({exc}); "
                               "check the state dir is writable and not full") from None

    def close(self) -> None:
        self.db.close()

    def _write(self, sql: str, args: tuple[Any, ...]) -> sqlite3.Cursor:
        try:
            return self.db.execute(sql, args)
        except sqlite3.Error as exc:
            raise storage_error(exc, self.db_path, "journal write") from None

    def _mac(self, *fields: Any) -> bytes:
        return hmac.new(self.mac_key, json.dumps(fields).encode(), hashlib.sha256).digest()

    def begin(self, kind: str, vm: str, params: OpParams) -> Operation:
        text = params.to_json()
        self._write("BEGIN IMMEDIATE", ())  # the id is part of the MAC: insert and MAC in one transaction
        try:
            op_id = int(self._write("INSERT INTO op_journal(kind, vm, started, params, mac) VALUES (?,?,?,?,?)",
                                    (kind, vm, time.time(), text, b"")).lastrowid or 0)
            self._write("UPDATE op_journal SET mac=? WHERE op_id=?", (self._mac("op", op_id, kind, vm, text), op_id))
            self._write("COMMIT", ())
        except BaseException:
            # SQLite itself rolls a transaction back on some errors (a full disk among them); a
            # ROLLBACK then fails and would replace the real error with "no transaction is active".
            if self.db.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.db.execute("ROLLBACK")
            raise
        faults.reached(f"{kind}:begin")
        return Operation(op_id, kind, vm, params)

    def step(self, op: Operation, step: str, **data: Any) -> None:
        seq, text = len(op.steps), json.dumps(data, sort_keys=True)
        self._write("INSERT INTO op_steps(op_id, seq, step, data, at, mac) VALUES (?,?,?,?,?,?)",
                    (op.op_id, seq, step, text, time.time(), self._mac("step", op.op_id, seq, step, text)))
        op.steps.append((step, data))
        faults.reached(f"{op.kind}:{step}")

    def passed(self, op: Operation, step: str, point: str) -> None:
        """Mark a point between two writes of `step` (``steps.INNER_POINTS``): inert but for a test's hook."""
        faults.reached(f"{op.kind}:{step}:{point}")

    def finish(self, op: Operation, outcome: str) -> None:
        self._write("UPDATE op_journal SET finished=?, outcome=?, fin_mac=? WHERE op_id=?",
                    (time.time(), outcome, self._mac("finished", op.op_id, outcome), op.op_id))

    def unfinished(self) -> list[Operation]:
        """Unfinished operations, every row authenticated (IntegrityError names a forged one)."""
        try:
            return self._unfinished()
        except sqlite3.Error as exc:
            raise StorageError(f"{self.db_path}: journal read failed ({exc}); check the state dir, "
                               "then run `xen-vtpm recover`") from None

    def _unfinished(self) -> list[Operation]:
        ops = []
        for op_id, kind, vm, params, mac, fin_mac in self.db.execute(
                "SELECT op_id, kind, vm, params, mac, fin_mac FROM op_journal WHERE finished IS NULL ORDER BY op_id"):
            self._check(mac, f"operation {op_id}", "op", op_id, kind, vm, params)
            if fin_mac is not None:  # finished once: someone cleared `finished` to have it re-run
                raise IntegrityError(f"{self.db_path}: journal operation {op_id} was finished but is marked "
                                     "unfinished (edited); recover will not act on it — inspect the catalog")
            try:
                op = Operation(op_id, kind, vm, OpParams.from_json(params))
            except (ValueError, TypeError) as exc:
                raise IntegrityError(f"{self.db_path}: journal operation {op_id} has parameters this version "
                                     f"cannot read ({exc}); finish it with the version that began it") from None
            for seq, step, data, mac in self.db.execute(
                    "SELECT seq, step, data, mac FROM op_steps WHERE op_id=? ORDER BY seq", (op_id,)):
                self._check(mac, f"operation {op_id} step {seq}", "step", op_id, seq, step, data)
                if seq != len(op.steps):
                    raise IntegrityError(f"{self.db_path}: journal operation {op_id} misses step {len(op.steps)} "
                                         "(rows removed); recover will not act on it — inspect the catalog")
                op.steps.append((step, json.loads(data)))
            op.resume_point = op.last_step
            ops.append(op)
        return ops

    def find_transfer(self, kind: str, transfer: str) -> tuple[Operation, str | None] | None:
        """The operation of ``kind`` for a move's transfer id, and its outcome (None: unfinished);
        every row it reads authenticated, since the answer decides what the other host does."""
        for op_id, vm, params, mac, outcome, fin_mac in self.db.execute(
                "SELECT op_id, vm, params, mac, outcome, fin_mac FROM op_journal WHERE kind=? ORDER BY op_id",
                (kind,)):
            self._check(mac, f"operation {op_id}", "op", op_id, kind, vm, params)
            op = Operation(op_id, kind, vm, OpParams.from_json(params))
            if op.params.transfer != transfer:
                continue
            if fin_mac is not None:
                self._check(fin_mac, f"operation {op_id} outcome", "finished", op_id, outcome)
                return op, outcome
            return op, None
        return None

    def _check(self, mac: bytes, what: str, *fields: Any) -> None:
        if not hmac.compare_digest(bytes(mac or b""), self._mac(*fields)):
            raise IntegrityError(f"{self.db_path}: journal {what} fails its MAC (forged or edited); recover "
                                 "will not act on it — inspect the catalog, restore it from a backup")
