"""Tampering with any stored byte makes verify and read fail with IntegrityError naming what failed."""
from __future__ import annotations

import os
import random
import shutil
import sqlite3

import pytest
from test_store_helpers import OTHER_KEYS, guest_memory, open_repo, randbytes, read_all, write_checkpoint

from xen_vtpm.errors import IntegrityError
from xen_vtpm.store import Repository
from xen_vtpm.store.packs import ENTRY, HEADER

DATA = guest_memory(3 << 20, seed=41)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """One store with two checkpoints, copied fresh for every test."""
    state = tmp_path_factory.mktemp("pristine") / "state"
    repo = open_repo(state, pack_target=1 << 20)
    ids = (write_checkpoint(repo, DATA, name="victim"), write_checkpoint(repo, randbytes(1 << 20, 42), name="other"))
    repo.close()
    return state, ids


@pytest.fixture
def store(pristine, tmp_path):
    src, ids = pristine
    state = tmp_path / "state"
    shutil.copytree(src, state)
    repo = open_repo(state, pack_target=1 << 20)
    yield repo, state, ids[0], ids[1]
    repo.close()


def _rows(repo, ckpt):
    return repo.catalog.query("SELECT c.id, c.pack, c.offset, c.length FROM refs r JOIN chunks c ON c.id = r.chunk "
                              "WHERE r.checkpoint=? ORDER BY c.pack, c.offset", (ckpt,))


def _both_fail(repo, ckpt, pattern):
    with pytest.raises(IntegrityError, match=pattern) as err:
        repo.verify(ckpt)
    msg = str(err.value)
    assert "\n" not in msg and f"checkpoint {ckpt}" in msg
    with pytest.raises(IntegrityError):
        read_all(repo, ckpt)
    return msg


def _pack_of(state, repo, ckpt):
    cid, pack, offset, length = _rows(repo, ckpt)[0]
    return state / "packs" / f"{pack}.pack", offset, length


def test_untouched_store_verifies(store):
    repo, _, victim, other = store
    assert repo.verify(victim)["status"] == "ok" and repo.verify(other)["status"] == "ok"


def test_flipped_ciphertext_byte_in_a_pack(store):
    repo, state, victim, _ = store
    path, offset, length = _pack_of(state, repo, victim)
    with open(path, "r+b") as f:
        f.seek(offset + ENTRY.size + length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    assert "GCM" in _both_fail(repo, victim, "fails authentication")


@pytest.mark.parametrize("field_off, what", [(0, "entry at offset .* holds chunk"), (32, "fails authentication"),
                                             (44, "entry at offset .* has sealed length")])
def test_altered_entry_header(store, field_off, what):
    repo, state, victim, _ = store
    path, offset, _ = _pack_of(state, repo, victim)
    with open(path, "r+b") as f:
        f.seek(offset + field_off)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x80]))
    _both_fail(repo, victim, what)


def test_altered_pack_header_and_index_caught_by_verify(store):
    repo, state, victim, _ = store
    path, _, _ = _pack_of(state, repo, victim)
    with open(path, "r+b") as f:
        f.seek(HEADER.size - 1)        # last byte of the pack id in the header
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 1]))
    with pytest.raises(IntegrityError, match="renamed or swapped"):
        repo.verify(victim)


def test_truncated_pack(store):
    repo, state, victim, _ = store
    (pack, last_off), = repo.catalog.query("SELECT pack, max(offset) FROM chunks WHERE id=" + OWN_CHUNK, (victim,))
    path = state / "packs" / f"{pack}.pack"
    os.truncate(path, last_off + 10)
    _both_fail(repo, victim, "truncated")


def test_missing_pack(store):
    repo, state, victim, _ = store
    path, _, _ = _pack_of(state, repo, victim)
    path.unlink()
    _both_fail(repo, victim, "missing")
    with pytest.raises(IntegrityError, match="missing but committed checkpoints .*" + victim):
        repo.recover()


def test_swapped_chunks_relabelled_consistently(store):
    """An attacker swaps two entries' ids in the pack and their catalog rows: the GCM associated data
    (the id) no longer matches the ciphertext."""
    repo, state, victim, _ = store
    (a, pa, oa, la), (b, pb, ob, lb) = _rows(repo, victim)[:2]
    pa_path, pb_path = state / "packs" / f"{pa}.pack", state / "packs" / f"{pb}.pack"
    for path, off, new in ((pa_path, oa, bytes(b)), (pb_path, ob, bytes(a))):
        with open(path, "r+b") as f:
            f.seek(off)
            f.write(new)
    db = sqlite3.connect(state / "catalog.sqlite")
    with db:
        db.execute("UPDATE chunks SET pack=?, offset=?, length=? WHERE id=?", (pb, ob, lb, a))
        db.execute("UPDATE chunks SET pack=?, offset=?, length=? WHERE id=?", (pa, oa, la, b))
    db.close()
    _both_fail(repo, victim, "fails authentication|index")
    with pytest.raises(IntegrityError, match="fails authentication"):
        read_all(repo, victim)


def test_flipped_manifest_file_byte(store):
    repo, state, victim, other = store
    path = state / "manifests" / f"{victim}.manifest"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 1
    path.write_bytes(bytes(data))
    _both_fail(repo, victim, "differs from manifest file")
    assert repo.verify(other)["status"] == "ok"


def test_missing_manifest_file(store):
    repo, state, victim, _ = store
    (state / "manifests" / f"{victim}.manifest").unlink()
    _both_fail(repo, victim, "manifest file .* is missing")


def _sql(state, sql, args=()):
    db = sqlite3.connect(state / "catalog.sqlite")
    with db:
        db.execute(sql, args)
    db.close()


# A memory chunk only the victim uses (the vTPM image blob is shared with the other checkpoint).
OWN_CHUNK = ("(SELECT r.chunk FROM refs r JOIN chunks c ON c.id = r.chunk WHERE r.checkpoint=?1 AND c.refcount=1 "
             "ORDER BY c.offset LIMIT 1)")


@pytest.mark.parametrize("sql, what", [
    ("UPDATE checkpoints SET vm_name='evil' WHERE id=?", "catalog vm_name"),
    ("UPDATE checkpoints SET name='renamed' WHERE id=?", "catalog name"),
    ("UPDATE checkpoints SET size=size+1 WHERE id=?", "catalog size"),
    ("UPDATE checkpoints SET manifest=substr(manifest,1,length(manifest)-1)||x'00' WHERE id=?", "MAC mismatch"),
    ("UPDATE chunks SET offset=offset+1 WHERE id=" + OWN_CHUNK, "index has no entry"),
    ("UPDATE chunks SET length=length-1 WHERE id=" + OWN_CHUNK, "index has no entry"),
    ("UPDATE chunks SET refcount=refcount+1 WHERE id=" + OWN_CHUNK, "refcount"),
    ("DELETE FROM refs WHERE checkpoint=?1 AND chunk=" + OWN_CHUNK, "no catalog reference"),
    ("UPDATE checkpoints SET vm_uuid=CAST(x'ff00' AS TEXT) WHERE id=?", "malformed value"),
])
def test_altered_catalog_rows(store, sql, what):
    repo, state, victim, other = store
    _sql(state, sql, (victim,))
    with pytest.raises(IntegrityError, match=what) as err:
        repo.verify(victim)
    assert "\n" not in str(err.value)
    if "refcount" not in what:
        with pytest.raises(IntegrityError):
            read_all(repo, victim)
    assert repo.verify(other)["status"] == "ok"


def test_manifest_of_one_checkpoint_put_under_another(store):
    repo, state, victim, other = store
    blob = repo.catalog.query("SELECT manifest FROM checkpoints WHERE id=?", (other,))[0][0]
    _sql(state, "UPDATE checkpoints SET manifest=? WHERE id=?", (blob, victim))
    (state / "manifests" / f"{victim}.manifest").write_bytes(bytes(blob))
    _both_fail(repo, victim, "catalog id")


def test_other_hosts_key_cannot_read(store):
    _, state, victim, _ = store
    with Repository(state, OTHER_KEYS) as foreign:
        with pytest.raises(IntegrityError, match="MAC mismatch"):
            foreign.verify(victim)


def test_random_pack_byte_flips_never_go_unnoticed(store):
    repo, state, victim, _ = store
    rnd = random.Random(7)
    rows = _rows(repo, victim)
    for _ in range(5):
        _, pack, off, length = rnd.choice(rows)
        path = state / "packs" / f"{pack}.pack"
        with open(path, "r+b") as f:
            pos = off + rnd.randrange(ENTRY.size + length)
            f.seek(pos)
            b = f.read(1)
            f.seek(pos)
            f.write(bytes([b[0] ^ (1 << rnd.randrange(8))]))
        with pytest.raises(IntegrityError):
            repo.verify(victim)
        with open(path, "r+b") as f:   # undo, so each round tests a single flip
            f.seek(pos)
            f.write(b)
    assert repo.verify(victim)["status"] == "ok"
