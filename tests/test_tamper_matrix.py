"""Tamper matrix: flip, truncate, swap and replay every stored artifact of the state dir.

One simulated host holds four checkpoints: A and B of guest1 (B dedups against A), C of guest2 and D, the
save binding of guest2 (`xen-vtpm save`, so guest2 is gone and its save file F exists).  A pristine copy
of the state dir is taken after that, and an older copy after A only (for replays).  Each case damages
one artifact (a pack region, an entry/index/footer field, a manifest file, a catalog row of any table
the store, the head or the audit use, a sealed blob, the head row), then runs the commands an operator
would: `verify --all`, `rollback guest1 A` and, where the save binding is involved, `restore F`.

Every command must fail with the case's one exit code on exactly one stderr line: 5 for tampering
(anything the head still binds to the TPM counter but that no longer matches it or its MAC), 6 for a
replay (an older, consistent head put back: behind the counter), 8 where the TPM itself refuses a
sealed blob, 4 for a schema from the future.  Nothing running may change: the domain ids, the memory
of the paused guest1, and the slot fingerprints of both vTPM images.  Then the pristine state dir is
put back; before each case, the state is proven pristine: its files are byte for byte the pristine
copy, the host TPM's counter (read with tpm2-tools, not the tool) is where the pristine head says,
and the VMs and vTPMs are as observed at the start.  So a refused command that moved the counter
would fail the next case instead of turning every later case into a pass on exit 6.

The default suite runs the `CORE` cases, a representative subset, with every command (verify, then
rollback and, for the save binding, restore); the full cross product is marked `crash_full`
(`make crash`).

The damage a case does is chosen so that it lands in what the target checkpoint needs: a chunk "own"
to A (no other checkpoint references it; B's delta chunks may still use it as a base), the pack
holding it, A's manifest.  Pure bookkeeping that no read uses would not
be a tamper of a checkpoint; `packs.live_bytes` is such a column and is left out on purpose.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from e2e_helpers import GUEST, E2EHost, advance_guest_tpm, assert_one_line_error, e2e_host, provision_guest_tpm

from xen_vtpm.config import Config
from xen_vtpm.store import manifest as manifest_format
from xen_vtpm_sim import domains

GUEST2 = "guest2"
HEADER, ENTRY_HDR, INDEX_REC, FOOTER = 32, 48, 44, 56
TAMPERED, REPLAYED, TPM_REFUSED, TOO_NEW = 5, 6, 8, 4


@dataclass
class World:
    host: E2EHost
    ids: dict[str, str]                 # "A", "B", "C", "D" -> checkpoint id
    save_file: Path
    pristine: Path                      # the state dir after all four checkpoints
    old: Path                           # the state dir after A only
    baseline: dict = field(default_factory=dict)
    pristine_digest: str = ""           # of every file in `pristine`
    counter: int = -1                   # the host TPM counter the pristine head is bound to

    @property
    def state(self) -> Path:
        return self.host.state_dir


def _copy_state(src: Path, dst: Path) -> None:
    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst, symlinks=True)


def _observe(w: World) -> dict:
    """What no refused command may change, read from outside the tool: `xl list` (domain ids and
    states), guest1's memory file, the vTPM images' slot fingerprints."""
    h = w.host
    rows = [r.split() for r in h.xl("list").stdout.splitlines()[1:] if r.strip()]
    guest = domains.find(domains.snapshot(h.dir), GUEST)
    assert guest is not None, f"{GUEST}: gone"
    return {"domains": {r[0]: (int(r[1]), r[4]) for r in rows},
            "memory": hashlib.sha256(Path(guest["memfile"]).read_bytes()).hexdigest(),
            "slots1": h.slot_fingerprints(f"vtpm-{GUEST}"),
            "slots2": h.slot_fingerprints(f"vtpm-{GUEST2}") if h.vtpm_image(f"vtpm-{GUEST2}").exists() else None}


def _tree_digest(root: Path) -> str:
    h = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        h.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def _host_counter(w: World) -> int:
    """The host TPM's NV counter, read with tpm2-tools over the host TPM's TCTI (not through the tool)."""
    cfg = Config.load(Path(w.host.env["XEN_VTPM_CONFIG"]))
    out = subprocess.run(["tpm2_nvread", "-T", cfg.tcti, "-C", "o", "-s", "8", hex(cfg.counter_index)],
                         capture_output=True, timeout=30, check=True).stdout
    return int.from_bytes(out, "big")


def _seal_pristine(w: World) -> None:
    """Record what `_prove_pristine` compares with; the pristine head must be bound to the counter."""
    with contextlib.closing(sqlite3.connect(w.pristine / "catalog.sqlite")) as db:
        (head_counter,) = db.execute("SELECT counter FROM head WHERE kind='current'").fetchone()
    w.counter = _host_counter(w)
    assert w.counter == head_counter, f"the pristine head is at counter {head_counter}, the TPM at {w.counter}"
    w.pristine_digest = _tree_digest(w.pristine)
    w.baseline = _observe(w)


def _prove_pristine(w: World) -> None:
    assert _tree_digest(w.state) == w.pristine_digest, "the state dir is not the pristine copy"
    assert w.save_file.read_bytes() == (w.save_file.parent / "pristine.save").read_bytes(), "save file differs"
    assert _host_counter(w) == w.counter, (f"the host TPM counter moved from {w.counter} to {_host_counter(w)}: "
                                           "a refused command advanced it, every later case would see a replay")
    assert _observe(w) == w.baseline, "the running VMs or vTPMs differ from the start of the matrix"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    base = tmp_path_factory.mktemp("tm")
    with e2e_host(base) as h:
        provision_guest_tpm(h.tcti())
        ids = {"A": h.snapshot("a")["id"]}
        old = base / "old-state"
        _copy_state(h.state_dir, old)
        advance_guest_tpm(h.tcti(), b"b")
        ids["B"] = h.snapshot("b")["id"]
        h.tool("sim", "create", GUEST2, "--memory", "16")
        ids["C"] = h.snapshot("c", guest=GUEST2)["id"]
        save_file = base / "g2.save"
        ids["D"] = h.tool_json("save", GUEST2, str(save_file))["id"]
        shutil.copyfile(save_file, base / "pristine.save")
        pristine = base / "pristine-state"
        _copy_state(h.state_dir, pristine)
        h.xl("pause", GUEST)        # a stable memory image to compare
        w = World(h, ids, save_file, pristine, old)
        _seal_pristine(w)
        yield w


@pytest.fixture
def small_world(tmp_path):
    """guest1 with A and B only, for a case that (while its bug is open) really changes the host."""
    with e2e_host(tmp_path) as h:
        provision_guest_tpm(h.tcti())
        ids = {"A": h.snapshot("a")["id"]}
        advance_guest_tpm(h.tcti(), b"b")
        ids["B"] = h.snapshot("b")["id"]
        h.tool("rollback", GUEST, ids["A"], "--yes", "--no-safety-checkpoint")   # a finished op to re-open
        save_file = tmp_path / "none.save"
        save_file.write_bytes(b"")
        shutil.copyfile(save_file, tmp_path / "pristine.save")
        pristine = tmp_path / "pristine-state"
        _copy_state(h.state_dir, pristine)
        h.xl("pause", GUEST)
        w = World(h, ids, save_file, pristine, pristine)
        _seal_pristine(w)
        yield w


# --- locating artifacts ------------------------------------------------------------------

def _db(w: World) -> sqlite3.Connection:
    return sqlite3.connect(w.state / "catalog.sqlite", isolation_level=None)


def _sql(w: World, stmt: str, args: tuple = (), expect_rows: int | None = 1) -> None:
    with contextlib.closing(_db(w)) as db:
        n = db.execute(stmt, args).rowcount
    assert expect_rows is None or n == expect_rows, (stmt, n)


def _one(w: World, query: str, args: tuple = ()) -> tuple:
    with contextlib.closing(_db(w)) as db:
        row = db.execute(query, args).fetchone()
    assert row is not None, query
    return row


def _chunk_ids(w: World, key: str, stream: str = "memory") -> list[bytes]:
    data = (w.state / "manifests" / f"{w.ids[key]}.manifest").read_bytes()
    parsed = manifest_format.parse(data[:-manifest_format.MAC_SIZE], w.ids[key])
    return [cid for rec in parsed.streams if rec.name == stream for cid, _ in rec.chunks]


def _own_chunk(w: World, key: str, stream: str = "memory") -> tuple[bytes, str, int, int]:
    """(id, pack, entry offset, sealed length) of a chunk only checkpoint `key` references (a later
    checkpoint's delta chunks may use it as a base: refcount counts those too)."""
    for cid in _chunk_ids(w, key, stream):
        pack, off, n, refs = _one(w, "SELECT pack, offset, length, (SELECT count(*) FROM refs r WHERE r.chunk = c.id) "
                                  "FROM chunks c WHERE id=?", (cid,))
        if refs == 1:
            return cid, pack, off, n
    raise AssertionError(f"{key}: no chunk of {stream} is its own")


def _pack(w: World, key: str) -> Path:
    return w.state / "packs" / f"{_own_chunk(w, key)[1]}.pack"


def _manifest(w: World, key: str) -> Path:
    return w.state / "manifests" / f"{w.ids[key]}.manifest"


def _index_record(w: World, key: str) -> int:
    """File offset of the index record of A's own chunk."""
    cid, _, _, _ = _own_chunk(w, key)
    data = _pack(w, key).read_bytes()
    index_off, count = struct.unpack_from("<QI", data, len(data) - FOOTER)
    for i in range(count):
        at = index_off + i * INDEX_REC
        if data[at:at + 32] == cid:
            return at
    raise AssertionError("own chunk not in its pack's index")


# --- primitive damage --------------------------------------------------------------------

def _flip(path: Path, offset: int) -> None:
    with open(path, "r+b") as fh:
        size = fh.seek(0, 2)
        offset = offset % size
        fh.seek(offset)
        old = fh.read(1)
        fh.seek(offset)
        fh.write(bytes([old[0] ^ 0x01]))


def _truncate(path: Path, size: int) -> None:
    with open(path, "r+b") as fh:
        fh.truncate(max(0, size))


def _swap_files(a: Path, b: Path) -> None:
    da, db = a.read_bytes(), b.read_bytes()
    a.write_bytes(db)
    b.write_bytes(da)


def _swap_column(w: World, table: str, key_col: str, col: str, ka, kb) -> None:
    with contextlib.closing(_db(w)) as db:
        va = db.execute(f"SELECT {col} FROM {table} WHERE {key_col}=?", (ka,)).fetchone()[0]
        vb = db.execute(f"SELECT {col} FROM {table} WHERE {key_col}=?", (kb,)).fetchone()[0]
        assert va != vb, (table, col)
        db.execute("PRAGMA ignore_check_constraints=ON")
        # swap through a placeholder: some columns are UNIQUE together with others
        placeholder = {str: "\0swap", bytes: b"\0swap", int: -1}[type(va)]
        db.execute("BEGIN")
        db.execute(f"UPDATE {table} SET {col}=? WHERE {key_col}=?", (placeholder, ka))
        db.execute(f"UPDATE {table} SET {col}=? WHERE {key_col}=?", (va, kb))
        db.execute("COMMIT")


def _flip_blob(w: World, table: str, col: str, where: str, args: tuple, at: int) -> None:
    (blob,) = _one(w, f"SELECT {col} FROM {table} WHERE {where}", args)
    bad = bytearray(blob)
    bad[at % len(bad)] ^= 0x01
    _sql(w, f"UPDATE {table} SET {col}=? WHERE {where}", (bytes(bad), *args))


def _replay_rows(w: World, table: str) -> None:
    """Put back the whole table as it was in the older state dir (after A only)."""
    with contextlib.closing(_db(w)) as db:
        db.execute("ATTACH DATABASE ? AS old", (str(w.old / "catalog.sqlite"),))
        db.execute("PRAGMA foreign_keys=OFF")
        db.execute("BEGIN")
        db.execute(f"DELETE FROM main.{table}")
        db.execute(f"INSERT INTO main.{table} SELECT * FROM old.{table}")
        db.execute("COMMIT")


# --- the cases ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Case:
    name: str
    damage: Callable[[World], None]
    code: int = TAMPERED              # the one exit code every command of the case must end with
    save_binding: bool = False        # also run `restore F`
    target: str = "A"                 # the checkpoint `rollback guest1` is asked for
    verify_cmd: tuple[str, ...] = ("verify", "--all")
    rollback: bool = True             # False when only guest2's checkpoints are damaged: A is then intact


def _pack_cases() -> list[Case]:
    def entry(field_off: int) -> Callable[[World], None]:
        return lambda w: _flip(_pack(w, "A"), _own_chunk(w, "A")[2] + field_off)

    def index(field_off: int) -> Callable[[World], None]:
        return lambda w: _flip(_pack(w, "A"), _index_record(w, "A") + field_off)

    def footer(field_off: int) -> Callable[[World], None]:
        return lambda w: _flip(_pack(w, "A"), -FOOTER + field_off)

    cases = [
        Case("pack-flip-header-magic", lambda w: _flip(_pack(w, "A"), 0)),
        Case("pack-flip-header-version", lambda w: _flip(_pack(w, "A"), 8)),
        Case("pack-flip-header-reserved", lambda w: _flip(_pack(w, "A"), 12)),
        Case("pack-flip-header-packid", lambda w: _flip(_pack(w, "A"), 16)),
        Case("pack-flip-entry-chunkid", entry(5)),
        Case("pack-flip-entry-nonce", entry(32 + 3)),
        Case("pack-flip-entry-length", entry(44)),
        Case("pack-flip-entry-ciphertext", lambda w: _flip(_pack(w, "A"), _own_chunk(w, "A")[2] + ENTRY_HDR
                                                          + _own_chunk(w, "A")[3] // 2)),
        Case("pack-flip-entry-tag", lambda w: _flip(_pack(w, "A"), _own_chunk(w, "A")[2] + ENTRY_HDR
                                                   + _own_chunk(w, "A")[3] - 1)),
        Case("pack-flip-index-chunkid", index(7)),
        Case("pack-flip-index-offset", index(32)),
        Case("pack-flip-index-length", index(40)),
        Case("pack-flip-footer-indexoffset", footer(0)),
        Case("pack-flip-footer-count", footer(8)),
        Case("pack-flip-footer-reserved", footer(12)),
        Case("pack-flip-footer-digest", footer(16 + 9)),
        Case("pack-flip-footer-magic", footer(48)),
        Case("pack-truncate-empty", lambda w: _truncate(_pack(w, "A"), 0)),
        Case("pack-truncate-header-only", lambda w: _truncate(_pack(w, "A"), HEADER)),
        Case("pack-truncate-mid-entry", lambda w: _truncate(_pack(w, "A"), _own_chunk(w, "A")[2] + 60)),
        Case("pack-truncate-no-footer", lambda w: _truncate(_pack(w, "A"), _pack(w, "A").stat().st_size - FOOTER)),
        Case("pack-truncate-last-byte", lambda w: _truncate(_pack(w, "A"), _pack(w, "A").stat().st_size - 1)),
        Case("pack-swap-same-vm", lambda w: _swap_files(_pack(w, "A"), _pack(w, "B"))),
        Case("pack-swap-other-vm", lambda w: _swap_files(_pack(w, "A"), _pack(w, "C"))),
        Case("pack-delete", lambda w: _pack(w, "A").unlink()),
    ]
    return cases


def _manifest_cases() -> list[Case]:
    mac = manifest_format.MAC_SIZE
    return [
        Case("manifest-flip-magic", lambda w: _flip(_manifest(w, "A"), 0)),
        Case("manifest-flip-version", lambda w: _flip(_manifest(w, "A"), 8)),
        Case("manifest-flip-body", lambda w: _flip(_manifest(w, "A"), _manifest(w, "A").stat().st_size // 2)),
        Case("manifest-flip-mac", lambda w: _flip(_manifest(w, "A"), -1)),
        Case("manifest-truncate-half", lambda w: _truncate(_manifest(w, "A"), _manifest(w, "A").stat().st_size // 2)),
        Case("manifest-truncate-mac", lambda w: _truncate(_manifest(w, "A"), _manifest(w, "A").stat().st_size - mac)),
        Case("manifest-truncate-empty", lambda w: _truncate(_manifest(w, "A"), 0)),
        Case("manifest-swap-same-vm", lambda w: _swap_files(_manifest(w, "A"), _manifest(w, "B"))),
        Case("manifest-swap-other-vm", lambda w: _swap_files(_manifest(w, "A"), _manifest(w, "C"))),
        Case("manifest-delete", lambda w: _manifest(w, "A").unlink()),
        # the save binding: D's manifest carries the save file's digest
        Case("save-manifest-flip-body", lambda w: _flip(_manifest(w, "D"), _manifest(w, "D").stat().st_size // 2),
             save_binding=True, rollback=False),
        Case("save-manifest-swap-other-vm", lambda w: _swap_files(_manifest(w, "D"), _manifest(w, "A")),
             save_binding=True),
    ]


def _catalog_cases() -> list[Case]:
    ck = "checkpoints"

    def ck_set(col: str, expr: str) -> Callable[[World], None]:
        return lambda w: _sql(w, f"UPDATE checkpoints SET {col}={expr} WHERE id=?", (w.ids["A"],))

    def chunk_set(col: str, expr: str) -> Callable[[World], None]:
        return lambda w: _sql(w, f"UPDATE chunks SET {col}={expr} WHERE id=?", (_own_chunk(w, "A")[0],))

    def swap_chunk_offsets(w: World) -> None:
        own = [c for c in _chunk_ids(w, "A")
               if _one(w, "SELECT count(*) FROM refs WHERE chunk=?", (c,))[0] == 1][:2]
        _swap_column(w, "chunks", "id", "offset", own[0], own[1])

    def foreign_ref(w: World) -> None:
        _sql(w, "INSERT INTO refs(checkpoint, chunk) VALUES (?, ?)", (w.ids["A"], _own_chunk(w, "C")[0]))

    return [
        Case("row-checkpoints-name", ck_set("name", "name || '-x'")),
        Case("row-checkpoints-vm_uuid", ck_set("vm_uuid", "'00000000-0000-0000-0000-000000000000'")),
        Case("row-checkpoints-vm_name", ck_set("vm_name", "'other'")),
        Case("row-checkpoints-created_us", ck_set("created_us", "created_us + 1")),
        Case("row-checkpoints-size", ck_set("size", "size + 4096")),
        Case("row-checkpoints-stored_bytes", ck_set("stored_bytes", "stored_bytes + 1")),
        Case("row-checkpoints-manifest-flip", lambda w: _flip_blob(w, ck, "manifest", "id=?", (w.ids["A"],), 40)),
        Case("row-checkpoints-manifest-truncate",
             ck_set("manifest", "substr(manifest, 1, length(manifest) - 1)")),
        Case("row-checkpoints-swap-manifest-same-vm",
             lambda w: _swap_column(w, ck, "id", "manifest", w.ids["A"], w.ids["B"])),
        Case("row-checkpoints-swap-manifest-other-vm",
             lambda w: _swap_column(w, ck, "id", "manifest", w.ids["A"], w.ids["C"])),
        Case("row-checkpoints-swap-name-same-vm",
             lambda w: _swap_column(w, ck, "id", "name", w.ids["A"], w.ids["B"])),
        Case("row-checkpoints-swap-vm_uuid-other-vm",
             lambda w: _swap_column(w, ck, "id", "vm_uuid", w.ids["A"], w.ids["C"])),
        Case("row-chunks-pack", lambda w: _sql(w, "UPDATE chunks SET pack=? WHERE id=?",
                                              (_own_chunk(w, "B")[1], _own_chunk(w, "A")[0]))),
        Case("row-chunks-offset", chunk_set("offset", "offset + 1")),
        Case("row-chunks-length", chunk_set("length", "length + 1")),
        Case("row-chunks-plain_len", chunk_set("plain_len", "plain_len + 1")),
        Case("row-chunks-refcount", chunk_set("refcount", "refcount + 1")),
        Case("row-chunks-id", lambda w: _flip_blob(w, "chunks", "id", "id=?", (_own_chunk(w, "A")[0],), 3)),
        Case("row-chunks-swap-offset", swap_chunk_offsets),
        Case("row-chunks-delete", lambda w: _sql(w, "DELETE FROM chunks WHERE id=?", (_own_chunk(w, "A")[0],))),
        Case("row-refs-delete", lambda w: _sql(w, "DELETE FROM refs WHERE checkpoint=? AND chunk=?",
                                              (w.ids["A"], _own_chunk(w, "A")[0]))),
        Case("row-refs-foreign-chunk", foreign_ref),
        Case("row-packs-name", lambda w: _sql(w, "UPDATE packs SET name=name || 'x' WHERE name=?",
                                             (_own_chunk(w, "A")[1],))),
        Case("row-packs-delete", lambda w: _sql(w, "DELETE FROM packs WHERE name=?", (_own_chunk(w, "A")[1],))),
        # An unauthenticated but harmless field: a schema from the future can only make the tool refuse
        # (exit 4: "upgrade xen-vtpm"); it selects no data.
        Case("row-store_meta-schema", lambda w: _sql(w, "UPDATE store_meta SET value='99' "
                                                        "WHERE key='schema_version'"), code=TOO_NEW),
        # the save binding row (D) and its file
        Case("save-row-manifest-flip", lambda w: _flip_blob(w, ck, "manifest", "id=?", (w.ids["D"],), 40),
             save_binding=True, rollback=False),
        Case("save-row-swap-manifest-other-vm",
             lambda w: _swap_column(w, ck, "id", "manifest", w.ids["D"], w.ids["C"]),
             save_binding=True, rollback=False),
        Case("save-file-flip", lambda w: _flip(w.save_file, w.save_file.stat().st_size // 2), save_binding=True),
        Case("save-file-truncate", lambda w: _truncate(w.save_file, w.save_file.stat().st_size - 4096),
             save_binding=True),
    ]


def _head_and_audit_cases() -> list[Case]:
    def head_set(col: str, expr: str) -> Callable[[World], None]:
        return lambda w: _sql(w, f"UPDATE head SET {col}={expr} WHERE kind='current'")

    def audit_flip(w: World) -> None:
        (seq,) = _one(w, "SELECT max(rowid) FROM audit")
        cols = [r[1] for r in _db(w).execute("PRAGMA table_info(audit)")]
        text = next(c for c in cols if c in ("action", "vm", "result", "record", "data"))
        _sql(w, f"UPDATE audit SET {text}={text} || 'x' WHERE rowid=?", (seq,))

    audit_verify = ("audit", "--verify")
    return [
        Case("head-counter", head_set("counter", "counter - 1")),
        Case("head-seq", head_set("seq", "seq + 1")),
        Case("head-catalog_digest", lambda w: _flip_blob(w, "head", "catalog_digest", "kind='current'", (), 0)),
        Case("head-audit_hash", lambda w: _flip_blob(w, "head", "audit_hash", "kind='current'", (), 0)),
        Case("head-mac", lambda w: _flip_blob(w, "head", "mac", "kind='current'", (), 0)),
        Case("head-delete", lambda w: _sql(w, "DELETE FROM head")),
        # An older head row, MAC intact: consistent, but behind the TPM counter.
        Case("head-replay-row", lambda w: _replay_rows(w, "head"), code=REPLAYED, save_binding=True),
        Case("audit-edit-record", audit_flip, verify_cmd=audit_verify),
        Case("audit-delete-last", lambda w: _sql(w, "DELETE FROM audit WHERE rowid=(SELECT max(rowid) FROM audit)"),
             verify_cmd=audit_verify),
    ]


def _replay_cases() -> list[Case]:
    def whole(w: World) -> None:
        _copy_state(w.old, w.state)

    def catalog_file(w: World) -> None:
        for suffix in ("", "-wal", "-shm"):
            (w.state / f"catalog.sqlite{suffix}").unlink(missing_ok=True)
        shutil.copyfile(w.old / "catalog.sqlite", w.state / "catalog.sqlite")

    return [
        # A whole older catalog (its head with it) is behind the counter: a replay.  A table put back
        # under the current head no longer matches what that head binds: tampering.
        Case("replay-whole-state-dir", whole, code=REPLAYED, save_binding=True),
        Case("replay-catalog-file", catalog_file, code=REPLAYED, save_binding=True),
        Case("replay-chunks-table", lambda w: _replay_rows(w, "chunks")),
        Case("replay-refs-table", lambda w: _replay_rows(w, "refs"), target="B"),
        Case("replay-checkpoints-table-hides-newer", lambda w: _replay_rows(w, "checkpoints"),
             save_binding=True, target="B"),
        Case("hide-newest-checkpoint-row",
             lambda w: _sql(w, "DELETE FROM checkpoints WHERE id=?", (w.ids["B"],)), target="B"),
    ]


def _sealed_cases() -> list[Case]:
    """The sealed host key: a changed TPM private or public part (still valid hex) is refused by the TPM
    itself on load/unseal (its integrity HMAC under the storage key fails: exit 8); a blob that no longer
    parses as JSON is refused before the TPM is asked (IntegrityError: exit 5)."""
    def blob() -> Callable[[World], Path]:
        return lambda w: w.state / "sealed" / "hostkey.json"

    def edit_field(name: str) -> Callable[[World], None]:
        def run(w: World) -> None:
            path = blob()(w)
            d = json.loads(path.read_text())
            value = d[name]
            d[name] = value[:20] + ("0" if value[20] != "0" else "1") + value[21:]
            path.write_text(json.dumps(d))
        return run

    return [
        Case("sealed-hostkey-private", edit_field("private"), code=TPM_REFUSED, save_binding=True),
        Case("sealed-hostkey-public", edit_field("public"), code=TPM_REFUSED),
        Case("sealed-hostkey-truncate", lambda w: _truncate(blob()(w), blob()(w).stat().st_size // 2)),
        # The opening brace: the blob is no JSON any more.  (A flip in the middle of the file lands in a
        # hex string and gives 5 or 8 depending on the digit it hits; the two cases above cover those.)
        Case("sealed-hostkey-byte-flip", lambda w: _flip(blob()(w), 0)),
    ]


def _journal_cases() -> list[Case]:
    """The coordinator's journal shares the catalog; `recover` (run first by every mutating command) acts
    on its unfinished rows, so a forged or re-opened row must be refused, not acted on."""
    def forged_rollback(w: World) -> None:
        params = {"checkpoint": w.ids["B"], "guest": GUEST, "paused": False, "safety": None,
                  "vtpm": f"vtpm-{GUEST}"}
        (vm_uuid,) = _one(w, "SELECT vm_uuid FROM checkpoints WHERE id=?", (w.ids["B"],))
        with contextlib.closing(_db(w)) as db:
            cur = db.execute("INSERT INTO op_journal(kind, vm, started, params, mac) VALUES ('rollback', ?, ?, ?, ?)",
                             (vm_uuid, time.time(), json.dumps(params, sort_keys=True), os.urandom(32)))
            db.execute("INSERT INTO op_steps(op_id, seq, step, data, at, mac) "
                       "VALUES (?, 0, 'destroy-guest', '{}', ?, ?)", (cur.lastrowid, time.time(), os.urandom(32)))

    def reopen_rollback(clear_fin_mac: bool, keep_steps: int | None = None) -> Callable[[World], None]:
        def run(w: World) -> None:
            (op_id,) = _one(w, "SELECT max(op_id) FROM op_journal WHERE kind='rollback'")
            extra = ", fin_mac=NULL" if clear_fin_mac else ""
            _sql(w, f"UPDATE op_journal SET finished=NULL, outcome=NULL{extra} WHERE op_id=?", (op_id,))
            if keep_steps is not None:   # back to just after the first step: recover would redo the rest
                _sql(w, "DELETE FROM op_steps WHERE op_id=? AND seq>=?", (op_id, keep_steps), expect_rows=None)
        return run

    return [Case("journal-forged-rollback", forged_rollback, verify_cmd=("recover",), rollback=False),
            Case("journal-reopened-rollback", reopen_rollback(False), verify_cmd=("recover",), rollback=False),
            # Finished/outcome/fin_mac cleared with every step kept is exactly what a crash right after
            # the op's audit record leaves; recover must close it without running it again (exit 0,
            # nothing changed: _run_case still compares the VMs and vTPMs with the baseline).
            Case("journal-reopened-rollback-no-fin-mac", reopen_rollback(True), verify_cmd=("recover",),
                 rollback=False, code=0),
            Case("journal-reopened-rollback-truncated-steps", reopen_rollback(True, keep_steps=1),
                 verify_cmd=("recover",), rollback=False)]


ALL = (_pack_cases() + _manifest_cases() + _catalog_cases() + _head_and_audit_cases() + _replay_cases()
       + _sealed_cases())
ISOLATED = _journal_cases()      # each on a host of its own
BY_NAME = {c.name: c for c in ALL + ISOLATED}
assert len(BY_NAME) == len(ALL + ISOLATED)

# Known open bugs (TM-n entries of docs/reliability.md, "Tamper matrix"): the case must keep failing until fixed.
XFAIL = {
}

# Cheap and representative, one per artifact family (every command each): the default suite.
CORE = ["pack-flip-entry-ciphertext", "pack-flip-footer-digest", "pack-truncate-no-footer", "pack-swap-other-vm",
        "manifest-swap-same-vm", "manifest-truncate-mac", "row-checkpoints-swap-manifest-other-vm",
        "row-chunks-swap-offset", "head-mac", "head-replay-row", "replay-whole-state-dir", "sealed-hostkey-private",
        "save-file-flip"]


def _commands(w: World, case: Case) -> list[list[str]]:
    if case.name.startswith("save-file-"):
        return [["restore", str(w.save_file)]]   # the store is intact; only the file F is damaged
    cmds = [list(case.verify_cmd)]
    if case.verify_cmd == ("verify", "--all") and case.rollback:
        cmds.append(["rollback", GUEST, w.ids[case.target], "--yes", "--no-safety-checkpoint"])
    if case.save_binding:
        cmds.append(["restore", str(w.save_file)])
    return cmds


def _tool(w: World, argv: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xen_vtpm", *argv], env=w.host.env, capture_output=True,
                          text=True, timeout=180)


def _run_case(w: World, case: Case) -> None:
    _prove_pristine(w)
    try:
        case.damage(w)
        save_file = w.save_file.read_bytes()
        for argv in _commands(w, case):
            proc = _tool(w, argv)
            assert "Traceback" not in proc.stderr, proc.stderr
            assert proc.returncode == case.code, (f"{case.name}: `xen-vtpm {' '.join(argv)}` exited "
                                                  f"{proc.returncode}, expected {case.code}\n"
                                                  f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
            if proc.returncode:
                assert_one_line_error(proc)
            print(f"{case.name}: xen-vtpm {argv[0]} -> exit {proc.returncode}: {proc.stderr.strip()}")
            assert _observe(w) == w.baseline, f"{case.name}: {argv} changed the running VMs or vTPMs"
            assert w.save_file.read_bytes() == save_file, f"{case.name}: {argv} changed the save file"
    finally:
        _copy_state(w.pristine, w.state)
        shutil.copyfile(w.save_file.parent / "pristine.save", w.save_file)


def _params(names: list[str]) -> list:
    return [pytest.param(n, id=n, marks=[pytest.mark.xfail(strict=True, reason=XFAIL[n])] if n in XFAIL else [])
            for n in names]


@pytest.mark.parametrize("name", _params(CORE))
def test_tamper_core(world, name):
    _run_case(world, BY_NAME[name])


def test_a_moved_counter_is_caught(world):
    """Negative control for `_prove_pristine`: had a refused command advanced the host TPM counter, the
    next case must fail at its start (and not pass on exit 6 without testing anything)."""
    real = world.counter
    world.counter = real - 1            # as if the TPM had moved on by one since the pristine copy
    try:
        with pytest.raises(AssertionError, match="counter moved"):
            _prove_pristine(world)
    finally:
        world.counter = real
    _prove_pristine(world)


@pytest.mark.crash_full
@pytest.mark.parametrize("name", _params([c.name for c in ALL if c.name not in CORE]))
def test_tamper_full(world, name):
    _run_case(world, BY_NAME[name])


@pytest.mark.crash_full
def test_full_matrix_left_a_fresh_store(world):
    """After the whole matrix: no case moved the counter or left damage behind."""
    _prove_pristine(world)
    world.host.tool("verify", "--all")


@pytest.mark.crash_full
@pytest.mark.parametrize("name", _params([c.name for c in ISOLATED]))
def test_tamper_isolated(small_world, name):
    _run_case(small_world, BY_NAME[name])


def test_pristine_state_still_verifies(world):
    """The put-back after each case really restores a healthy, fresh store (no case moved the counter)."""
    _prove_pristine(world)
    world.host.tool("verify", "--all")
