"""Delta chunks against the parent checkpoint: small second checkpoints after scattered page writes,
exact reads across generations and deletes, refcounts that count dependent deltas, tamper detection."""
from __future__ import annotations

import shutil
import sqlite3

import pytest
from test_store_helpers import guest_memory, open_repo, read_all, rewrite_pages, store_files, write_checkpoint

from xen_vtpm.errors import IntegrityError
from xen_vtpm.store.catalog import SCHEMA_VERSION
from xen_vtpm.store.packs import ENTRY

SIZE = 24 << 20
PACK = 4 << 20
# 16 KiB chunks (the default is 64): with them g2 also has full chunks of its own (where most of a
# chunk's pages were rewritten), which the "delta-flag-set-on-own-full-chunk" tamper case needs.
CHUNKS = (4 << 10, 16 << 10, 64 << 10)

INVARIANT = ("SELECT count(*) FROM chunks c WHERE refcount != (SELECT count(*) FROM refs r WHERE r.chunk = c.id) "
             "+ (SELECT count(*) FROM deps d WHERE d.base = c.id)")


def write(repo, data: bytes, name: str):
    w = repo.begin_checkpoint("vm-1", "guest1", name=name)
    with w:
        w.add_stream("memory", (data[i:i + (1 << 20)] for i in range(0, len(data), 1 << 20)))
        w.add_blob("vtpm-image", b"vtpm-image" * 100)
        w.commit()
    return w


GEN1 = guest_memory(SIZE, seed=11)
GEN2 = rewrite_pages(GEN1, 0.05, seed=12)
GEN3 = rewrite_pages(GEN2, 0.05, seed=13)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    state = tmp_path_factory.mktemp("delta") / "state"
    repo = open_repo(state, pack_target=PACK, chunk_sizes=CHUNKS)
    writers = [write(repo, data, name) for data, name in ((GEN1, "g1"), (GEN2, "g2"), (GEN3, "g3"))]
    repo.close()
    return state, [(w.checkpoint_id, w.stored_bytes, w.delta_chunks) for w in writers]


@pytest.fixture
def store(pristine, tmp_path):
    src, info = pristine
    state = tmp_path / "state"
    shutil.copytree(src, state)
    repo = open_repo(state, pack_target=PACK, chunk_sizes=CHUNKS)
    yield repo, state, [i[0] for i in info]
    repo.close()


def test_generations_are_small_and_read_back_exactly(pristine, store):
    _, info = pristine
    repo, _, (g1, g2, g3) = store
    (_, first, d1), (_, second, d2), (_, third, d3) = info
    assert first > SIZE and d1 == 0
    assert second <= 0.10 * SIZE and d2 > 0, (second / SIZE, d2)
    assert third <= 0.10 * SIZE and d3 > 0, (third / SIZE, d3)
    assert repo.catalog.query("SELECT stored_bytes FROM checkpoints WHERE id=?", (g2,)) == [(second,)]
    for cid, data in ((g1, GEN1), (g2, GEN2), (g3, GEN3)):
        assert read_all(repo, cid) == data
        assert repo.verify(cid)["status"] == "ok"
        with repo.open_checkpoint(cid) as r:
            assert b"".join(r.stream("memory", full_check=False)) == data
    # Depth 1: every base is a full chunk, though g3's deltas were cut against g2's deltas.
    assert repo.catalog.query("SELECT count(*) FROM deps d JOIN chunks c ON c.id = d.base WHERE c.delta != 0") == [(0,)]
    assert repo.catalog.query("SELECT count(*) FROM deps d JOIN chunks c ON c.id = d.chunk WHERE c.delta = 0") == [(0,)]
    g3_deps = repo.catalog.query("SELECT count(*) FROM refs r JOIN deps d ON d.chunk = r.chunk "
                                 "JOIN refs r1 ON r1.chunk = d.base AND r1.checkpoint=? WHERE r.checkpoint=?", (g1, g3))
    assert g3_deps[0][0] > 0   # some of g3's bases are g1 chunks that g2's deltas had used
    assert repo.catalog.query(INVARIANT) == [(0,)]


def test_blobs_and_other_vms_get_no_deltas(store):
    repo, _, _ = store
    w = repo.begin_checkpoint("vm-2", "guest2", name="other")
    with w:
        w.add_stream("memory", [GEN2])
        w.commit()
    assert w.delta_chunks == 0   # no parent: another VM's checkpoints are not parents
    assert read_all(repo, w.checkpoint_id) == GEN2


def test_deleting_the_parent_keeps_the_child(store):
    repo, state, (g1, g2, g3) = store
    repo.delete(g1)
    assert read_all(repo, g2) == GEN2 and read_all(repo, g3) == GEN3
    assert repo.verify(g2)["status"] == "ok" and repo.verify(g3)["status"] == "ok"
    assert repo.catalog.query(INVARIANT) == [(0,)]
    # g1's chunks that deltas still use stay, counted by their deps rows alone.
    kept = repo.catalog.query("SELECT count(*) FROM chunks c "
                              "WHERE NOT EXISTS (SELECT 1 FROM refs r WHERE r.chunk = c.id)")
    assert kept[0][0] > 0
    assert repo.catalog.query("SELECT count(*) FROM chunks c "
                              "WHERE NOT EXISTS (SELECT 1 FROM refs r WHERE r.chunk = c.id) "
                              "AND NOT EXISTS (SELECT 1 FROM deps d WHERE d.base = c.id)") == [(0,)]
    repo.delete(g2)
    assert read_all(repo, g3) == GEN3 and repo.verify(g3)["status"] == "ok"
    assert repo.catalog.query(INVARIANT) == [(0,)]
    repo.delete(g3)
    for table in ("chunks", "deps", "refs", "packs", "checkpoints"):
        assert repo.catalog.query(f"SELECT count(*) FROM {table}") == [(0,)], table
    assert store_files(state) == set()


def test_deleting_the_child_frees_its_deltas_only(store):
    repo, state, (g1, g2, g3) = store
    repo.delete(g3)
    repo.delete(g2)
    assert repo.catalog.query("SELECT count(*) FROM deps") == [(0,)]
    assert repo.catalog.query("SELECT count(*) FROM chunks WHERE delta != 0") == [(0,)]
    assert repo.catalog.query(INVARIANT) == [(0,)]
    assert read_all(repo, g1) == GEN1 and repo.verify(g1)["status"] == "ok"
    packs = {f"packs/{n}.pack" for (n,) in repo.catalog.query("SELECT name FROM packs")}
    assert store_files(state) == packs | {f"manifests/{g1}.manifest"}


def test_delete_refuses_an_inconsistent_base_refcount(store):
    repo, state, (g1, g2, g3) = store
    _sql(state, "UPDATE chunks SET refcount = 1 WHERE id = (SELECT base FROM deps d JOIN refs r ON r.chunk = d.chunk "
                "AND r.checkpoint=? JOIN chunks c ON c.id = d.base WHERE c.refcount > 1 LIMIT 1)", (g3,))
    before = _dump(state)
    with pytest.raises(IntegrityError, match="refcount"):
        repo.delete(g3)
    assert _dump(state) == before


# --- tampering ----------------------------------------------------------------------------------
def _sql(state, sql, args=(), foreign_keys=False):
    db = sqlite3.connect(state / "catalog.sqlite")
    db.execute(f"PRAGMA foreign_keys={'ON' if foreign_keys else 'OFF'}")
    with db:
        db.execute(sql, args)
    db.close()


def _dump(state) -> tuple:
    db = sqlite3.connect(state / "catalog.sqlite")
    rows = tuple(db.iterdump())
    db.close()
    files = tuple(sorted((p, (state / p).read_bytes()) for p in store_files(state)))
    return rows, files


def _delta_of(repo, ckpt):
    """A delta chunk of ``ckpt`` and one of its bases that ``ckpt`` does not reference itself."""
    return repo.catalog.query(
        "SELECT d.chunk, d.base FROM refs r JOIN deps d ON d.chunk = r.chunk WHERE r.checkpoint=?1 "
        "AND d.base NOT IN (SELECT chunk FROM refs WHERE checkpoint=?1) ORDER BY d.chunk, d.base LIMIT 1", (ckpt,))[0]


def _flip_entry(repo, state, cid):
    pack, offset, length = repo.catalog.query("SELECT pack, offset, length FROM chunks WHERE id=?", (cid,))[0]
    path = state / "packs" / f"{pack}.pack"
    data = bytearray(path.read_bytes())
    data[offset + ENTRY.size + length // 2] ^= 0x01
    path.write_bytes(bytes(data))


TAMPER = {
    "delta-entry-byte": lambda repo, state, chunk, base: _flip_entry(repo, state, chunk),
    "base-entry-byte": lambda repo, state, chunk, base: _flip_entry(repo, state, base),
    "delta-flag-cleared":
        lambda repo, state, chunk, base: _sql(state, "UPDATE chunks SET delta=0 WHERE id=?", (chunk,)),
    "delta-flag-set-on-full": lambda repo, state, chunk, base: _sql(state, "UPDATE chunks SET delta=1 WHERE id=?",
                                                                    (base,)),
    "delta-flag-cleared-deps-deleted": lambda repo, state, chunk, base: (
        _sql(state, "UPDATE chunks SET delta=0 WHERE id=?", (chunk,)), _sql(state, "DELETE FROM deps WHERE chunk=?",
                                                                             (chunk,))),
    "delta-flag-set-on-own-full-chunk": lambda repo, state, chunk, base: _sql(
        state, "UPDATE chunks SET delta=1 WHERE id = (SELECT r.chunk FROM refs r JOIN chunks c ON c.id = r.chunk "
               "JOIN checkpoints k ON k.id = r.checkpoint AND k.name = 'g2' WHERE c.delta = 0 AND c.refcount = 1 "
               "ORDER BY r.chunk LIMIT 1)"),
    "deps-row-deleted": lambda repo, state, chunk, base: _sql(state, "DELETE FROM deps WHERE chunk=? AND base=?",
                                                              (chunk, base)),
    "base-row-deleted": lambda repo, state, chunk, base: _sql(state, "DELETE FROM chunks WHERE id=?", (base,)),
    "base-refcount-edited": lambda repo, state, chunk, base: _sql(
        state, "UPDATE chunks SET refcount=refcount+1 WHERE id=?", (base,)),
    "deps-row-on-full-chunk": lambda repo, state, chunk, base: _sql(
        state, "INSERT INTO deps (chunk, base) SELECT r.chunk, ? FROM refs r JOIN chunks c ON c.id = r.chunk "
               "WHERE c.delta = 0 AND r.chunk != ? LIMIT 1", (base, base)),
}


@pytest.mark.parametrize("case", sorted(TAMPER))
def test_tampered_delta_store_fails_verify(store, case):
    repo, state, (g1, g2, g3) = store
    chunk, base = _delta_of(repo, g2)
    TAMPER[case](repo, state, bytes(chunk), bytes(base))
    before = _dump(state)
    with pytest.raises(IntegrityError) as err:
        repo.verify(g2)
    assert "\n" not in str(err.value) and f"checkpoint {g2}" in str(err.value)
    assert _dump(state) == before   # verify changed nothing


def test_catalog_of_schema_1_is_upgraded(tmp_path):
    state = tmp_path / "state"
    repo = open_repo(state, chunk_sizes=CHUNKS)
    cid = write_checkpoint(repo, GEN1[:2 << 20])
    repo.close()
    db = sqlite3.connect(state / "catalog.sqlite")
    with db:
        db.execute("DROP TABLE deps")
        db.execute("ALTER TABLE chunks DROP COLUMN delta")
        db.execute("UPDATE store_meta SET value='1' WHERE key='schema_version'")
    db.close()
    with open_repo(state, chunk_sizes=CHUNKS) as repo:
        assert repo.catalog.query("SELECT value FROM store_meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
        assert read_all(repo, cid) == GEN1[:2 << 20] and repo.verify(cid)["status"] == "ok"
        w = write(repo, rewrite_pages(GEN1[:2 << 20], 0.05, seed=3), "next")
        assert w.delta_chunks > 0 and repo.verify(w.checkpoint_id)["status"] == "ok"
