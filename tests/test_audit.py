"""The hash-chained audit log: every edit, removal or reordering is caught at that record."""
from __future__ import annotations

import dataclasses
import shutil
import sqlite3
import subprocess
import sys

import pytest
from tpm_fixture import fresh_cache, host_cfg, swtpm_session  # noqa: F401

from xen_vtpm.cli import render
from xen_vtpm.errors import IntegrityError
from xen_vtpm.host import audit, provision, session
from xen_vtpm.host import head as catalog_head


@pytest.fixture
def logged(host_cfg):
    """A provisioned host with records 1 (init) .. 6, all anchored by a counter bump."""
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    for i in range(2, 7):
        host.audit("snapshot", vm=f"guest{i}", checkpoint=f"cp{i}", detail=f"step {i}")
    catalog_head.advance(host)
    return host_cfg


def _sql(cfg, statement, *args):
    db = sqlite3.connect(cfg.state_dir / "catalog.sqlite")
    db.execute(statement, args)
    db.commit()
    db.close()


def _verify_error(cfg) -> str:
    session.close_all()
    with pytest.raises(IntegrityError) as exc:
        session.audit_verify(cfg)
    assert exc.value.exit_code == 5 and "\n" not in str(exc.value)
    return str(exc.value)


def test_intact_log_verifies_and_renders(logged):
    result = session.audit_verify(logged)
    assert result["status"] == "ok" and result["records"] == 6 and result["unanchored"] == 0
    rows = session.audit_records(logged)
    assert [r["seq"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert rows[0]["action"] == "init" and rows[3]["vm"] == "guest4" and rows[3]["user"]
    text = render.audit(rows)
    assert "SNAPSHOT" not in text and "snapshot" in text and "cp4" in text


@pytest.mark.parametrize("record", [1, 3, 6])
def test_editing_any_record_breaks_verify_at_that_record(logged, record):
    _sql(logged, "UPDATE audit SET detail = 'harmless' WHERE seq = ?", record)
    assert _verify_error(logged).startswith(f"audit record {record}: hash chain broken")


def test_edit_with_recomputed_hash_still_fails_the_mac(logged):
    rows = {r["seq"]: r for r in session.audit_records(logged)}
    row = dict(rows[3], detail="forged", time=0.0)
    db = sqlite3.connect(logged.state_dir / "catalog.sqlite")
    prev = db.execute("SELECT prev_hash FROM audit WHERE seq = 3").fetchone()[0]
    digest = audit._hash(bytes(prev), row)
    db.execute("UPDATE audit SET detail = 'forged', time = 0.0, hash = ? WHERE seq = 3", (digest,))
    db.execute("UPDATE audit SET prev_hash = ? WHERE seq = 4", (digest,))
    db.commit()
    db.close()
    assert _verify_error(logged).startswith("audit record 3: MAC does not verify")


def test_deleting_a_record_breaks_verify_there(logged):
    _sql(logged, "DELETE FROM audit WHERE seq = 4")
    assert _verify_error(logged).startswith("audit record 4: hash chain broken")


def test_reordering_records_breaks_verify_at_the_first_moved(logged):
    _sql(logged, "UPDATE audit SET seq = -seq WHERE seq IN (2, 5)")  # swap rows 2 and 5 via temporary keys
    _sql(logged, "UPDATE audit SET seq = CASE seq WHEN -2 THEN 5 ELSE 2 END WHERE seq < 0")
    assert _verify_error(logged).startswith("audit record 2: hash chain broken")


def test_truncating_the_end_is_caught_by_the_counter_anchored_head(logged):
    _sql(logged, "DELETE FROM audit WHERE seq >= 5")
    assert _verify_error(logged).startswith("audit record 5: hash chain broken (records 5..6 were removed")


def test_records_after_the_last_counter_bump_are_reported_unanchored(logged):
    host = session.open_host(logged)
    host.audit("rollback", vm="guest2", result="denied", detail="wrong secret")
    result = session.audit_verify(logged)
    assert result["records"] == 7 and result["unanchored"] == 1


def test_cli_audit_verify_exit_codes(logged):
    cmd = [sys.executable, "-m", "xen_vtpm", "--config", str(logged.path), "audit", "--verify"]
    session.close_all()  # the swtpm serves one client at a time
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0 and "records" in ok.stdout
    listing = subprocess.run(cmd[:-1], capture_output=True, text=True, timeout=60)
    assert listing.returncode == 0 and "guest6" in listing.stdout
    _sql(logged, "UPDATE audit SET vm = 'other' WHERE seq = 2")
    bad = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 5
    assert bad.stderr.startswith("xen-vtpm: audit record 2: hash chain broken") and bad.stderr.count("\n") == 1
    assert "Traceback" not in bad.stderr


def test_splicing_a_valid_record_from_a_forked_copy_breaks_the_chain(logged, tmp_path):
    fork_dir = tmp_path / "fork"
    shutil.copytree(logged.state_dir, fork_dir)
    host = session.open_host(logged)
    host.audit("delete", vm="guest2", checkpoint="cp2")
    host.audit("snapshot", vm="guest3")
    fork = session.open_host(dataclasses.replace(logged, state_dir=fork_dir))
    fork.audit("rollback", vm="guest2", checkpoint="cp2")  # same seq 7, valid MAC, other history
    src = sqlite3.connect(fork_dir / "catalog.sqlite")
    row = src.execute("SELECT * FROM audit WHERE seq = 7").fetchone()
    src.close()
    _sql(logged, "DELETE FROM audit WHERE seq = 7")
    _sql(logged, f"INSERT INTO audit VALUES ({', '.join('?' * len(row))})", *row)
    assert _verify_error(logged).startswith("audit record 8: hash chain broken")
