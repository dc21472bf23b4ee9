"""Holds (the marks `xen-vtpm keep` sets) in the checkpoint store: bound by the catalog digest, dropped
with their checkpoint, and a catalog without any keeps the digest its head already binds."""
from __future__ import annotations

import hashlib
import json
import sqlite3

import pytest
from test_store_helpers import open_repo, randbytes, write_checkpoint

from xen_vtpm.errors import CheckpointNotFound
from xen_vtpm.store.catalog import SCHEMA_VERSION


@pytest.fixture
def repo(tmp_path):
    r = open_repo(tmp_path / "state")
    yield r
    r.close()


def _digest_without_holds(repo) -> bytes:
    """The catalog digest as schema 2 defined it (docs/formats.md): checkpoint rows only."""
    h = hashlib.sha256(b"xen-vtpm store v2\0")
    for row in repo.catalog.query("SELECT id, name, vm_uuid, vm_name, created_us, size, stored_bytes, manifest "
                                  "FROM checkpoints ORDER BY id"):
        h.update(json.dumps([*row[:7], bytes(row[7])[-32:].hex()]).encode() + b"\n")
    return h.digest()


def test_a_hold_changes_the_digest_and_releasing_it_restores_it(repo):
    a = write_checkpoint(repo, randbytes(200_000, seed=1), name="a")
    b = write_checkpoint(repo, randbytes(200_000, seed=2), name="b")
    plain = repo.catalog_digest()
    assert plain == _digest_without_holds(repo), "without holds the digest must be the one heads already bind"
    repo.set_hold(a, True)
    held_a = repo.catalog_digest()
    assert repo.holds() == {a} and held_a != plain
    repo.set_hold(a, True)                      # idempotent: recover repeats it
    assert repo.catalog_digest() == held_a
    repo.set_hold(b, True)
    assert repo.catalog_digest() not in (plain, held_a)
    repo.set_hold(b, False)
    assert repo.catalog_digest() == held_a      # the digest depends on the set, not on the history
    repo.set_hold(a, False)
    repo.set_hold(a, False)
    assert repo.holds() == set() and repo.catalog_digest() == plain


def test_a_hold_row_added_or_removed_behind_the_store_changes_the_digest(repo, tmp_path):
    a = write_checkpoint(repo, randbytes(100_000), name="a")
    repo.set_hold(a, True)
    bound = repo.catalog_digest()
    db = sqlite3.connect(tmp_path / "state" / "catalog.sqlite")
    with db:
        db.execute("DELETE FROM holds")
    assert repo.catalog_digest() != bound
    with db:
        db.execute("INSERT INTO holds VALUES (?)", (a,))
    assert repo.catalog_digest() == bound
    db.close()


def test_hold_of_an_unknown_checkpoint_is_refused(repo):
    with pytest.raises(CheckpointNotFound, match="checkpoint nope: not found"):
        repo.set_hold("nope", True)
    assert repo.holds() == set()


def test_deleting_a_checkpoint_drops_its_hold(repo):
    a = write_checkpoint(repo, randbytes(100_000, seed=3), name="a")
    b = write_checkpoint(repo, randbytes(100_000, seed=4), name="b")
    repo.set_hold(a, True)
    repo.set_hold(b, True)
    repo.delete(a)
    assert repo.holds() == {b}
    assert repo.verify(b)["status"] == "ok"


def test_catalog_of_schema_2_is_upgraded_with_its_digest_unchanged(tmp_path):
    state = tmp_path / "state"
    repo = open_repo(state)
    cid = write_checkpoint(repo, randbytes(100_000), name="a")
    before = repo.catalog_digest()
    repo.close()
    db = sqlite3.connect(state / "catalog.sqlite")
    with db:
        db.execute("DROP TABLE holds")
        db.execute("UPDATE store_meta SET value='2' WHERE key='schema_version'")
    db.close()
    with open_repo(state) as again:
        assert again.catalog.query("SELECT value FROM store_meta WHERE key='schema_version'") == \
            [(str(SCHEMA_VERSION),)]
        assert again.catalog_digest() == before
        again.set_hold(cid, True)
        assert again.holds() == {cid}
