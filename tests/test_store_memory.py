"""Memory of writing and verifying a checkpoint does not grow with the number of chunks.

The only per-chunk state a write or a verify keeps in Python is the manifest's packed chunk list
(36 bytes per chunk, plus its encoding at commit); everything else a guest's size multiplies lives
in SQLite's temporary tables or is read one pack / one batch at a time.  Tiny chunks make a few MiB
behave like a large guest: 4× the chunks must not cost more than the manifest's share.
"""
from __future__ import annotations

import tracemalloc

from test_store_helpers import open_repo, randbytes, write_checkpoint

SIZES = (64, 256, 1024)          # ~300-byte chunks: 16 MiB ≈ 57,000 chunks, a 1 GiB guest's worth
PACK = 1 << 20                   # ~3,500 entries per pack, as a 64 MiB pack of 16 KiB chunks holds
MANIFEST_SHARE = 3 * 36          # bytes per chunk: the chunk list, its encoding and the catalog copy
SLACK = 2 << 20                  # interpreter noise (caches, freelists)


def _peak(fn) -> int:
    tracemalloc.start()
    try:
        fn()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _count(repo, checkpoint_id: str) -> int:
    return repo.catalog.query("SELECT count(*) FROM refs WHERE checkpoint=?", (checkpoint_id,))[0][0]


def test_write_and_verify_memory_does_not_grow_per_chunk(tmp_path):
    repo = open_repo(tmp_path / "state", chunk_sizes=SIZES, pack_target=PACK)
    small, large = randbytes(4 << 20, seed=1), randbytes(16 << 20, seed=2)
    ids: dict[str, str] = {}
    write_small = _peak(lambda: ids.__setitem__("small", write_checkpoint(repo, small, name="small", block=1 << 20)))
    write_large = _peak(lambda: ids.__setitem__("large", write_checkpoint(repo, large, name="large", block=1 << 20)))
    extra_chunks = _count(repo, ids["large"]) - _count(repo, ids["small"])
    assert extra_chunks > 30_000, extra_chunks
    # Before the temporary tables a write kept ~600 bytes of Python objects per new chunk.
    assert write_large - write_small < extra_chunks * MANIFEST_SHARE + SLACK, (write_small, write_large)

    verify_small = _peak(lambda: repo.verify(ids["small"]))
    verify_large = _peak(lambda: repo.verify(ids["large"]))
    # Before, verify held every chunk's place and id at once: ~2 KiB per chunk.
    assert verify_large - verify_small < extra_chunks * MANIFEST_SHARE + SLACK, (verify_small, verify_large)
    repo.close()
