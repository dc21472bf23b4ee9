"""Sub-key derivation and the catalog head's freshness against the TPM counter (real swtpm)."""
from __future__ import annotations

import shutil
import sqlite3

import pytest
from tpm_fixture import fresh_cache, host_cfg, make_cfg, swtpm, swtpm_session  # noqa: F401

from xen_vtpm.errors import CounterAhead, IntegrityError, ReplayDetected
from xen_vtpm.host import catalogdb, provision, session
from xen_vtpm.host import head as catalog_head
from xen_vtpm.host import tpm as hosttpm
from xen_vtpm.host.head import Head, check_fresh
from xen_vtpm.host.keys import derive_keys


def test_subkeys_are_distinct_deterministic_and_hidden():
    keys = derive_keys(b"\x01" * 32)
    values = [keys.chunk_enc, keys.chunk_id, keys.manifest_mac, keys.head_mac, keys.audit_mac]
    assert all(len(v) == 32 for v in values) and len(set(values)) == 5
    assert derive_keys(b"\x01" * 32) == keys and derive_keys(b"\x02" * 32).chunk_enc != keys.chunk_enc
    assert keys.chunk_enc.hex() not in repr(keys)


def _head(counter: int) -> Head:
    return Head(counter, 1, b"d" * 32, 0, b"\0" * 32, 0.0)


def test_check_fresh_rules():
    assert check_fresh(_head(5), 5) == "fresh"
    assert check_fresh(_head(5), 6, pending=_head(6)) == "pending"
    assert check_fresh(_head(5), 5, pending=_head(6)) == "pending"
    with pytest.raises(ReplayDetected, match="counter 5 but the TPM counter is at 7"):
        check_fresh(_head(5), 7, pending=_head(6))  # a stale journal entry does not excuse a replay
    with pytest.raises(CounterAhead) as exc:
        check_fresh(_head(5), 3)
    assert exc.value.exit_code == 6
    with pytest.raises(IntegrityError, match="head missing"):
        check_fresh(None, 3)


def test_advance_bumps_counter_once_and_rewrites_head(host_cfg):
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    before = host.counter_read()
    increments = hosttpm.OPS["NV_Increment"]
    head = catalog_head.advance(host, catalog_digest=b"c" * 32)
    assert head.counter == before + 1 == host.counter_read()
    assert hosttpm.OPS["NV_Increment"] == increments + 1
    conn = catalogdb.connect(host_cfg.state_dir)
    assert catalog_head.read(conn, host.keys) == (head, None)
    conn.close()


def test_restoring_an_old_state_dir_is_detected_as_replay(host_cfg, tmp_path):
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    old = tmp_path / "old-state"
    shutil.copytree(host_cfg.state_dir, old)
    catalog_head.advance(host, catalog_digest=b"new" * 8)
    shutil.rmtree(host_cfg.state_dir)
    shutil.copytree(old, host_cfg.state_dir)  # the attacker puts the old copy back
    with pytest.raises(ReplayDetected) as exc:
        catalog_head.advance(host)
    assert "older copy of the state dir" in str(exc.value) and exc.value.exit_code == 6
    conn = catalogdb.connect(host_cfg.state_dir)
    assert catalog_head.state(host, conn)[0] == "replayed"
    conn.close()


def test_tpm_counter_behind_the_head_is_counter_ahead(swtpm, tmp_path):
    """The TPM's own state put back (reset / another TPM with the same seeds): head ahead of the counter."""
    cfg = make_cfg(tmp_path, swtpm.tcti)
    provision.init(cfg)
    session.close_all()
    swtpm.stop()
    tpm_backup = tmp_path / "tpm-backup"
    shutil.copytree(swtpm.state_dir, tpm_backup)
    swtpm.start()
    cfg = make_cfg(tmp_path, swtpm.tcti, state_dir=cfg.state_dir, counter_index=cfg.counter_index)
    catalog_head.advance(session.open_host(cfg))
    session.close_all()
    swtpm.stop()
    shutil.rmtree(swtpm.state_dir)
    shutil.copytree(tpm_backup, swtpm.state_dir)
    swtpm.start()
    cfg = make_cfg(tmp_path, swtpm.tcti, state_dir=cfg.state_dir, counter_index=cfg.counter_index)
    with pytest.raises(CounterAhead, match="counter was reset or this is a different TPM"):
        catalog_head.advance(session.open_host(cfg))


@pytest.mark.parametrize("incremented", [False, True], ids=["crash-before-increment", "crash-after-increment"])
def test_interrupted_advance_is_finished_by_settle(host_cfg, incremented):
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    conn = catalogdb.connect(host_cfg.state_dir)
    current, _ = catalog_head.read(conn, host.keys)
    intended = Head(current.counter + 1, current.seq + 1, b"x" * 32, current.audit_seq, current.audit_hash, 1.0)
    catalog_head.write(conn, host.keys, "pending", intended)  # step 1 of advance, then "crash"
    conn.commit()
    if incremented:
        host.counter_increment()
    settled = catalog_head.settle(host, conn)
    assert settled.counter == host.counter_read() == current.counter + 1
    assert settled.catalog_digest == b"x" * 32
    assert catalog_head.read(conn, host.keys) == (settled, None)
    conn.close()


def test_edited_head_fails_its_mac(host_cfg):
    provision.init(host_cfg)
    host = session.open_host(host_cfg)
    db = sqlite3.connect(host_cfg.state_dir / "catalog.sqlite")
    db.execute("UPDATE head SET counter = counter + 1")
    db.commit()
    db.close()
    conn = catalogdb.connect(host_cfg.state_dir)
    with pytest.raises(IntegrityError, match="MAC does not verify"):
        catalog_head.read(conn, host.keys)
    conn.close()
