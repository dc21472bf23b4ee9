"""Issue 18 item 1: a damaged audit log or catalog is never re-anchored by the next command.

The attacker edits `catalog.sqlite` (no host key, no TPM): removes audit records from the end, from
the middle, all of them, or rewrites one.  Every command that could advance the TPM-bound head, or
append to the log, must then refuse with exit 5 and change nothing — no head row, counter value,
audit record, catalog row, journal row, sealed file, domain or vTPM image moves — and `audit --verify`
must still report the damage afterwards.  Without the proof, the next snapshot re-anchored the cut
log and the removal was gone for good.

Also here: a catalog row renamed *while* a snapshot runs (between its freshness check and its
commit) is refused, not bound; and legitimate unanchored records (a refusal logged by an earlier
command) do not stop the next advance, which anchors them.
"""
from __future__ import annotations

import contextlib
import hashlib
import shlex
import sqlite3
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from crash_helpers import faulty_argv
from e2e_helpers import GUEST, E2EHost, assert_one_line_error, e2e_host
from tpm_fixture import fresh_cache, host_cfg, swtpm_session  # noqa: F401

from xen_vtpm.config import Config
from xen_vtpm.errors import IntegrityError
from xen_vtpm.host import catalogdb, head, provision, session

OTHER = "g2"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[tuple[E2EHost, Path]]:
    """guest1 with checkpoints a and b and a rollback to a (the issue's sequence); g2 saved to a file."""
    base = tmp_path_factory.mktemp("audit-sec")
    with e2e_host(base) as h:
        h.snapshot("a")
        h.snapshot("b")
        h.tool("rollback", GUEST, "a", "--yes", "--no-safety-checkpoint")
        h.tool("sim", "create", OTHER, "--memory", "16")
        saved = base / "g2.save"
        h.tool("save", OTHER, str(saved))
        h.tool("audit", "--verify")
        yield h, saved


# --- what must not change --------------------------------------------------------------------

def _rows(h: E2EHost, sql: str) -> list[tuple]:
    with contextlib.closing(sqlite3.connect(h.catalog)) as db:
        return db.execute(sql).fetchall()


def _files(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def host_counter(h: E2EHost) -> str:
    """The TPM counter, read with tpm2-tools (no xen-vtpm process holds the host TPM meanwhile)."""
    cfg = Config.load(h.env["XEN_VTPM_CONFIG"])
    return subprocess.run(["tpm2_nvread", "-T", cfg.tcti, "-C", "o", "-s", "8", hex(cfg.counter_index)],
                          capture_output=True, check=True, timeout=30).stdout.hex()


def observed(h: E2EHost, tooldir: Path) -> dict[str, object]:
    """Everything a refused command could have changed."""
    domains = [tuple(row.split()[:2]) for row in h.xl("list").stdout.splitlines()[1:]]
    return {
        "head": _rows(h, "SELECT * FROM head ORDER BY kind"),
        "audit": _rows(h, "SELECT * FROM audit ORDER BY seq"),
        "checkpoints": _rows(h, "SELECT * FROM checkpoints ORDER BY id"),
        "journal": _rows(h, "SELECT op_id, finished, outcome FROM op_journal ORDER BY op_id"),
        "steps": _rows(h, "SELECT COUNT(*) FROM op_steps"),
        "counter": host_counter(h),
        "sealed": _files(h.state_dir / "sealed"),
        "domains": domains,
        "vtpm image": h.slot_fingerprints(),
        "tool dir": sorted(p.name for p in tooldir.iterdir()),
    }


def run(h: E2EHost, *argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xen_vtpm", *argv], env=h.env, capture_output=True, text=True,
                          timeout=120)


# --- the damage ----------------------------------------------------------------------------------

def _execute(h: E2EHost, sql: str) -> None:
    with contextlib.closing(sqlite3.connect(h.catalog)) as db:
        assert db.execute(sql).rowcount >= 1, sql
        db.commit()


TAMPERS: dict[str, str] = {
    "end": "DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)",
    "middle": "DELETE FROM audit WHERE seq = 2",
    "everything": "DELETE FROM audit",
    "rewrite": "UPDATE audit SET result = 'denied' WHERE seq = (SELECT MAX(seq) FROM audit)",
}


@contextlib.contextmanager
def damaged(h: E2EHost, sql: str) -> Iterator[None]:
    """The log damaged by `sql`; afterwards put back byte for byte (and proved intact again)."""
    saved = _rows(h, "SELECT * FROM audit ORDER BY seq")
    _execute(h, sql)
    try:
        yield
    finally:
        with contextlib.closing(sqlite3.connect(h.catalog)) as db:
            db.execute("DELETE FROM audit")
            db.executemany(f"INSERT INTO audit VALUES ({', '.join('?' * len(saved[0]))})", saved)
            db.commit()
        h.tool("audit", "--verify")


def commands(saved: Path, tooldir: Path) -> dict[str, list[str]]:
    auth = tooldir / "auth.secret"
    return {
        "snapshot": ["snapshot", GUEST, "--name", "c"],
        "rollback": ["rollback", GUEST, "a", "--yes", "--no-safety-checkpoint"],
        "delete": ["delete", "b"],
        "save": ["save", GUEST, str(tooldir / "g1.save")],
        "restore": ["restore", str(saved)],
        "recover": ["recover"],
        "verify": ["verify", "--all"],
        "init": ["init", "--rollback-auth-file", str(auth)],
    }


@pytest.mark.parametrize("tamper", list(TAMPERS))
def test_damaged_log_refused_by_every_command(host, tamper, tmp_path):
    """Each mutating command in turn on the same damage; every one must refuse and change nothing."""
    h, saved = host
    tooldir = tmp_path / "files"
    tooldir.mkdir()
    (tooldir / "auth.secret").write_text("a rollback secret\n")
    problems = []
    with damaged(h, TAMPERS[tamper]):
        reported = h.fails(5, "audit", "--verify")
        before = observed(h, tooldir)
        for command, argv in commands(saved, tooldir).items():
            proc = run(h, *argv)
            if proc.returncode != 5:
                problems.append(f"{command}: exit {proc.returncode} {proc.stderr.strip()!r}")
                continue
            line = assert_one_line_error(proc)
            if "audit record" not in line or "restore the state dir" not in line:
                problems.append(f"{command}: refused for another reason: {line}")
            after = observed(h, tooldir)
            problems += [f"{command}: changed {what}" for what in before if after[what] != before[what]]
        assert h.fails(5, "audit", "--verify") == reported, "the damage is no longer reported as it was"
    assert not problems, f"after '{tamper}':\n" + "\n".join(problems)


def test_the_issue_sequence_keeps_the_removal_visible(host):
    """The issue's repro: the rollback record deleted, then an ordinary snapshot."""
    h, _ = host
    with damaged(h, TAMPERS["end"]):
        assert "were removed from the end" in h.fails(5, "audit", "--verify")
        h.fails(5, "snapshot", GUEST, "--name", "c")
        assert "were removed from the end" in h.fails(5, "audit", "--verify")
    assert "c" not in {row[0] for row in _rows(h, "SELECT name FROM checkpoints")}


# a and b swap names (three steps: (vm_uuid, name) is unique at every row update)
SWAP_NAMES = ("UPDATE checkpoints SET name = '~' WHERE name = 'a'; "
              "UPDATE checkpoints SET name = 'a' WHERE name = 'b'; "
              "UPDATE checkpoints SET name = 'b' WHERE name = '~';")


def _swap_names(h: E2EHost) -> None:
    with contextlib.closing(sqlite3.connect(h.catalog)) as db:
        db.executescript(SWAP_NAMES)


def test_catalog_renamed_during_a_snapshot_is_not_bound(host, tmp_path):
    """Rows a and b swap names while a snapshot of guest1 runs: binding that catalog would make
    `rollback guest1 a` land on b.  The snapshot must refuse before its commit."""
    h, _ = host
    tooldir = tmp_path / "files"
    tooldir.mkdir()
    swap = [sys.executable, "-c", "import sqlite3, sys; sqlite3.connect(sys.argv[1]).executescript(sys.argv[2])",
            str(h.catalog), SWAP_NAMES]
    head_before = _rows(h, "SELECT * FROM head ORDER BY kind")
    log = tmp_path / "hook.log"
    proc = subprocess.run([*faulty_argv(faults=[("snapshot:commit", shlex.join(swap))], log=log),
                           "snapshot", GUEST, "--name", "during"], env=h.env, capture_output=True, text=True,
                          timeout=120)
    try:
        assert "reached snapshot:commit fault-exit 0" in log.read_text(), "the swap did not run"
        assert proc.returncode == 5, f"exit {proc.returncode}: {proc.stderr}"
        assert "catalog" in assert_one_line_error(proc)
        assert _rows(h, "SELECT * FROM head ORDER BY kind") == head_before, "the head moved"
        # The swap is still refused by the next command, and a rollback by name cannot follow it.
        h.fails(5, "rollback", GUEST, "a", "--yes", "--no-safety-checkpoint")
    finally:
        _swap_names(h)                       # swap back
    h.tool("recover")
    assert "during" not in {row[0] for row in _rows(h, "SELECT name FROM checkpoints")}
    h.tool("audit", "--verify")


# --- the host layer: every advance and append proves the log ------------------------------------

def _cut_last(cfg) -> None:
    with contextlib.closing(sqlite3.connect(cfg.state_dir / "catalog.sqlite")) as db:
        db.execute("DELETE FROM audit WHERE seq = (SELECT MAX(seq) FROM audit)")
        db.commit()


def _state(cfg, host) -> tuple:
    with contextlib.closing(catalogdb.connect(cfg.state_dir)) as conn:
        return (head.read(conn, host.keys), conn.execute("SELECT seq, hash FROM audit").fetchall(),
                host.counter_read())


@pytest.mark.parametrize("call", ["advance", "append"])
def test_advance_and_append_refuse_a_cut_log(host_cfg, call):
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    host.audit("snapshot", vm="guest1", checkpoint="cp1")
    head.advance(host)                              # anchors records 1..2
    _cut_last(host_cfg)
    before = _state(host_cfg, host)
    with pytest.raises(IntegrityError, match=r"audit record 2: hash chain broken \(records 2..2 were removed"):
        if call == "advance":
            head.advance(host)
        else:
            host.audit("rollback", vm="guest1", checkpoint="cp1")
    assert _state(host_cfg, host) == before


def test_unanchored_records_do_not_block_the_next_advance(host_cfg):
    """Records appended since the last advance (a refusal, an undone attempt) are the legitimate
    tail: the next advance proves the anchored prefix and anchors them."""
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    host.audit("rollback", vm="guest1", result="refused: wrong checkpoint")
    host.audit("snapshot", vm="guest1", result="failed; undone")
    new = head.advance(host)
    assert new.audit_seq == 3
    assert session.audit_verify(host_cfg)["unanchored"] == 0


def test_recover_head_promotes_a_pending_row_over_an_unanchored_record(host_cfg):
    """A crash between the pending head row and the counter increment, with the operation's audit
    record appended just before: settle promotes, and the log still proves."""
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    host.audit("snapshot", vm="guest1", checkpoint="cp1", detail="op 1")
    with contextlib.closing(catalogdb.connect(host_cfg.state_dir)) as conn:
        current, _ = head.read(conn, host.keys)
        seq, digest = conn.execute("SELECT seq, hash FROM audit ORDER BY seq DESC LIMIT 1").fetchone()
        pending = head.Head(current.counter + 1, current.seq + 1, b"p" * 64, seq, bytes(digest), 1.0)
        head.write(conn, host.keys, "pending", pending)
        conn.commit()
    promoted = host.recover_head()
    assert promoted.audit_seq == seq and session.audit_verify(host_cfg)["unanchored"] == 0
    _cut_last(host_cfg)
    with pytest.raises(IntegrityError, match="were removed from the end"):
        head.advance(host)


def test_an_edit_behind_the_proven_tip_is_not_laundered(host_cfg):
    """Later proofs in one process walk only what is new.  A record edited meanwhile *before* the tip
    already proved is not seen by the advance, but the anchor commits to the hashes as first computed:
    the next full walk (any new command's first proof, `audit --verify`) still reports it."""
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    for i in range(3):
        host.audit("snapshot", vm="guest1", checkpoint=f"cp{i}")          # proves, then extends the tip
    with contextlib.closing(sqlite3.connect(host_cfg.state_dir / "catalog.sqlite")) as db:
        db.execute("UPDATE audit SET detail = 'forged' WHERE seq = 2")
        db.commit()
    head.advance(host)
    session.close_all()                                                   # a new command: a full walk
    with pytest.raises(IntegrityError, match=r"audit record 2: hash chain broken \(its contents were edited"):
        session.audit_verify(host_cfg)
    with pytest.raises(IntegrityError, match="audit record 2"):
        head.advance(session.open_host(host_cfg))
