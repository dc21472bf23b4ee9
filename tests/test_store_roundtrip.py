"""Checkpoint store: round trips, dedup, listing, delete + GC, abort."""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest
from test_store_helpers import (
    KEYS,
    METADATA,
    guest_memory,
    open_repo,
    randbytes,
    read_all,
    store_files,
    write_checkpoint,
)

from xen_vtpm import __version__
from xen_vtpm.errors import CheckpointNotFound, UsageError
from xen_vtpm.store.catalog import SCHEMA_VERSION
from xen_vtpm.store.manifest import MAX_METADATA
from xen_vtpm.store.packs import read_index


@pytest.fixture
def repo(tmp_path):
    r = open_repo(tmp_path / "state", pack_target=1 << 20)
    yield r
    r.close()


@pytest.mark.parametrize("size", [0, 1, 4095, (1 << 20) + 7, 5 << 20])
def test_round_trip_byte_for_byte(repo, size):
    data = guest_memory(size, seed=size) if size >= 1 << 20 else randbytes(size, seed=size)
    image = randbytes(2 << 20, seed=99)
    cid = write_checkpoint(repo, data, image=image)
    assert read_all(repo, cid) == data
    with repo.open_checkpoint(cid) as r:
        assert r.read_blob("vtpm-image") == image
        m = r.manifest
    assert m.stream("memory").length == size
    assert m.stream("vtpm-image").sha256 == hashlib.sha256(image).digest()
    assert (m.vm_uuid, m.vm_name, m.metadata) == ("vm-1", "guest1", METADATA)
    assert repo.verify(cid)["status"] == "ok"


def test_large_stream_spans_several_well_formed_packs(repo, tmp_path):
    data = guest_memory(5 << 20, seed=3)
    cid = write_checkpoint(repo, data)
    packs = [p.name.removesuffix(".pack") for p in (tmp_path / "state" / "packs").iterdir()]
    assert len(packs) >= 4
    entries = sum(len(read_index(tmp_path / "state" / "packs", p)) for p in packs)
    assert entries == len(repo.catalog.query("SELECT id FROM chunks"))
    assert repo.verify(cid)["packs"] == len(packs)


def test_stream_from_a_fifo_read_once_with_progress(repo, tmp_path):
    data = guest_memory(3 << 20, seed=5)
    fifo = tmp_path / "mem.fifo"
    os.mkfifo(fifo)

    def feed():
        with open(fifo, "wb") as out:
            for i in range(0, len(data), 100_000):
                out.write(data[i:i + 100_000])

    t = threading.Thread(target=feed)
    t.start()
    seen = []
    w = repo.begin_checkpoint("vm-1", "guest1", name="fifo")
    with open(fifo, "rb") as src:
        w.add_stream("memory", src, progress=seen.append)
    w.commit()
    t.join()
    assert sum(seen) == len(data)
    assert read_all(repo, w.checkpoint_id) == data


def _change(base: bytearray, run_pages: int, seed: int) -> bytearray:
    """Rewrite 5% of the image in page-aligned runs of ``run_pages`` pages."""
    out = bytearray(base)
    rnd = random.Random(seed)
    pages = len(out) // 4096
    runs = pages // 20 // run_pages
    starts = rnd.sample(range(0, pages - run_pages, run_pages), runs)
    for p in starts:
        out[p * 4096:(p + run_pages) * 4096] = rnd.randbytes(run_pages * 4096)
    return out


def test_dedup_second_checkpoint_after_5_percent_change(repo, capsys):
    size = 64 << 20
    base = bytearray(guest_memory(size, seed=11))
    first = write_checkpoint(repo, bytes(base), name="one")
    # A guest's working set dirties memory in runs (heap, page cache); 16 pages = 64 KiB per run.
    clustered = _change(base, 16, seed=12)
    second = write_checkpoint(repo, bytes(clustered), name="two")
    # Worst case for content-defined chunks: single pages scattered uniformly; delta chunks against
    # the parent ("two") keep it small too.
    scattered_data = bytes(_change(base, 1, seed=13))
    scattered = write_checkpoint(repo, scattered_data, name="three")
    rows = {r["id"]: r for r in repo.list_checkpoints()}
    ratio = rows[second]["stored_bytes"] / size
    with capsys.disabled():
        print(f"\n[store] dedup, 64 MiB stream, 5% rewritten: 64 KiB runs -> {ratio:.1%} new bytes; "
              f"single scattered pages -> {rows[scattered]['stored_bytes'] / size:.1%}; "
              f"1st checkpoint {rows[first]['stored_bytes'] / size:.1%}")
    assert ratio <= 0.10
    assert rows[scattered]["stored_bytes"] / size <= 0.10
    assert read_all(repo, second) == bytes(clustered)
    assert read_all(repo, scattered) == scattered_data


def test_metadata_is_the_callers_opaque_blob_and_the_store_stamps_time_and_version(repo):
    with repo.begin_checkpoint("vm-1", "guest1", name="m") as w:
        w.add_blob("vtpm-image", b"img")
        with pytest.raises(UsageError, match="must be bytes"):
            w.set_metadata({"vtpm_uuid": "0d3c"})
        with pytest.raises(UsageError, match="more than the 1048576"):
            w.set_metadata(bytes(MAX_METADATA + 1))
        w.set_metadata(b"first")
        w.set_metadata(bytes(MAX_METADATA))      # replaces; the bound itself is accepted
        before = time.time_ns() // 1000
        m = w.commit()
        after = time.time_ns() // 1000
        with pytest.raises(UsageError, match="already committed"):
            w.set_metadata(b"late")
    assert m.metadata == bytes(MAX_METADATA) and m.tool_version == __version__
    assert before <= m.created_us <= after
    with repo.open_checkpoint(w.checkpoint_id) as r:
        assert r.manifest == m
    empty = repo.begin_checkpoint("vm-1", "guest1", name="none")
    empty.add_blob("vtpm-image", b"img")
    with repo.open_checkpoint(empty.commit().checkpoint_id) as r:
        assert r.manifest.metadata == b""


def test_listing_resolve_and_names(repo):
    a = write_checkpoint(repo, b"a" * 10000, name="daily")
    b = write_checkpoint(repo, b"b" * 10000, name="daily", vm_uuid="vm-2")
    rows = repo.list_checkpoints()
    assert [r["id"] for r in rows] == [a, b]
    assert set(rows[0]) == {"id", "name", "vm_uuid", "vm_name", "time", "size", "stored_bytes"}
    assert rows[0]["size"] == 10000 + len(b"vtpm-image" * 100)
    assert [r["id"] for r in repo.list_checkpoints("vm-2")] == [b]
    assert repo.resolve(a)["id"] == a
    assert repo.resolve("daily", vm_uuid="vm-2")["id"] == b
    with pytest.raises(UsageError):
        repo.resolve("daily")          # ambiguous across VMs
    with pytest.raises(UsageError):
        repo.begin_checkpoint("vm-1", "guest1", name="daily")
    with pytest.raises(CheckpointNotFound):
        repo.resolve("nope")
    assert repo.is_committed(a) and not repo.is_committed("nope")


def test_delete_frees_space_and_others_still_verify(repo, tmp_path):
    shared = guest_memory(4 << 20, seed=21)
    a = write_checkpoint(repo, shared + randbytes(3 << 20, seed=22), name="a")
    b = write_checkpoint(repo, shared + randbytes(1 << 20, seed=23), name="b")
    c = write_checkpoint(repo, randbytes(2 << 20, seed=24), name="c")
    before = sum(p.stat().st_size for p in (tmp_path / "state" / "packs").iterdir())
    freed = repo.delete(a)
    after = sum(p.stat().st_size for p in (tmp_path / "state" / "packs").iterdir())
    assert freed > 0 and before - after >= (3 << 20) * 0.9
    with pytest.raises(CheckpointNotFound):
        repo.verify(a)
    assert repo.verify(b)["status"] == "ok" and repo.verify(c)["status"] == "ok"
    assert read_all(repo, b) == shared + randbytes(1 << 20, seed=23)
    # Chunk refcounts still equal the references (+ dependent deltas), and no pack is dead weight.
    assert repo.catalog.query("SELECT count(*) FROM chunks c WHERE refcount != "
                              "(SELECT count(*) FROM refs r WHERE r.chunk = c.id) "
                              "+ (SELECT count(*) FROM deps d WHERE d.base = c.id)") == [(0,)]
    assert repo.catalog.query("SELECT count(*) FROM packs WHERE live_bytes < 0.5 * size") == [(0,)]
    repo.delete(b)
    repo.delete(c)
    assert store_files(tmp_path / "state") == set()
    assert repo.catalog.query("SELECT count(*) FROM chunks") == [(0,)]
    assert repo.delete(c, missing_ok=True) == 0
    with pytest.raises(CheckpointNotFound):
        repo.delete(c)


def test_abort_frees_what_it_wrote(repo, tmp_path):
    keep = write_checkpoint(repo, randbytes(1 << 20, seed=31), name="keep")
    files = store_files(tmp_path / "state")
    w = repo.begin_checkpoint("vm-1", "guest1", name="gone")
    w.add_stream("memory", [randbytes(3 << 20, seed=32)])
    assert store_files(tmp_path / "state") != files
    w.abort()
    assert store_files(tmp_path / "state") == files
    assert repo.catalog.journal_entries() == []
    assert [r["id"] for r in repo.list_checkpoints()] == [keep]
    with pytest.raises(ValueError), repo.begin_checkpoint("vm-1", "guest1", name="boom") as w2:
        w2.add_stream("memory", [randbytes(2 << 20, seed=33)])
        raise ValueError("coordinator failed mid-snapshot")
    assert store_files(tmp_path / "state") == files
    assert repo.verify(keep)["status"] == "ok"


def test_reopen_and_catalog_shared_with_other_tables(tmp_path):
    state = tmp_path / "state"
    repo = open_repo(state)
    cid = write_checkpoint(repo, randbytes(100_000))
    repo.catalog.db.execute("CREATE TABLE IF NOT EXISTS audit (seq INTEGER PRIMARY KEY, body TEXT)")
    repo.close()
    again = open_repo(state)
    assert again.catalog.query("PRAGMA journal_mode") == [("wal",)]
    assert again.catalog.query("SELECT value FROM store_meta WHERE key='schema_version'") == [(str(SCHEMA_VERSION),)]
    assert again.verify(cid)["status"] == "ok"
    digest = again.catalog_digest()
    again.delete(cid)
    assert again.catalog_digest() != digest
    again.close()


def test_chunk_ids_are_keyed():
    import hashlib

    from test_store_helpers import OTHER_KEYS

    from xen_vtpm.store.chunks import ChunkCipher
    data = b"page" * 1024
    a, b = ChunkCipher(KEYS).chunk_id(data), ChunkCipher(OTHER_KEYS).chunk_id(data)
    assert a != b and hashlib.sha256(data).digest() not in (a, b)


def test_concurrent_writers_of_the_same_data(repo):
    data = guest_memory(2 << 20, seed=51)
    w1 = repo.begin_checkpoint("vm-1", "guest1", name="one")
    w2 = repo.begin_checkpoint("vm-2", "guest2", name="two")
    w1.add_stream("memory", [data])
    w2.add_stream("memory", [data])     # neither sees the other's chunks before commit
    w1.commit()
    w2.commit()                         # its copies lose the race: dead bytes, not double references
    rows = {r["name"]: r for r in repo.list_checkpoints()}
    assert rows["one"]["stored_bytes"] > len(data) and rows["two"]["stored_bytes"] == 0
    for cid in (w1.checkpoint_id, w2.checkpoint_id):
        assert read_all(repo, cid) == data and repo.verify(cid)["status"] == "ok"
    repo.delete(w1.checkpoint_id)
    assert read_all(repo, w2.checkpoint_id) == data
    repo.delete(w2.checkpoint_id)
    assert repo.catalog.query("SELECT count(*) FROM packs") == [(0,)]
