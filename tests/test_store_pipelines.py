"""The store's C pipelines (cext/ingest.c, cext/restore.c) through the store that drives them: what they
write opens with the Python reader and equals the reference chunker's chunks; what they check and
write out is the checkpoint, byte for byte, or an error naming the chunk; every failure stops their
threads; and this file's tests, with the delta tests, again over a build with AddressSanitizer and UBSan."""
from __future__ import annotations

import hashlib
import hmac
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from test_hashing import _LOADER, SANITIZE, _run_python, _sanitized_build
from test_store_helpers import KEYS, guest_memory, open_repo, randbytes, read_all, rewrite_pages, write_checkpoint

from xen_vtpm.errors import IntegrityError, StorageError
from xen_vtpm.hashing import PyChunker
from xen_vtpm.store import Sink
from xen_vtpm.store.packs import ENTRY, read_index

ROOT = Path(__file__).resolve().parent.parent
SIZES = (4 << 10, 16 << 10, 64 << 10)      # small chunks: many per test image


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


@pytest.fixture
def repo(tmp_path):
    r = open_repo(tmp_path / "state", pack_target=256 << 10, chunk_sizes=SIZES)
    yield r
    r.close()


def _entries(state: Path) -> dict[bytes, tuple[str, int, int]]:
    out = {}
    for pack in (state / "packs").iterdir():
        name = pack.name.removesuffix(".pack")
        for cid, off, n in read_index(state / "packs", name):
            out[cid] = (name, off, n)
    return out


# --------------------------------------------------------------------------- ingest

@pytest.mark.parametrize("block", [1, 4093, 1 << 20])
def test_ingest_writes_the_reference_chunks_sealed_under_their_ids(repo, tmp_path, block):
    """However the input is split, the chunks are the reference chunker's, each id the keyed digest of
    its bytes, each entry opening (Python AES-GCM) to exactly those bytes."""
    data = guest_memory(3 << 20, seed=4)[:(3 << 20) - 777]
    if block == 1:
        data = data[:200_000]                      # byte by byte through the ring: keep it short
    w = repo.begin_checkpoint("vm-1", "g", name=f"b{block}")
    w.add_stream("memory", (data[i:i + block] for i in range(0, len(data), block)))
    manifest = w.commit()
    chunker = PyChunker(*SIZES)
    pieces = chunker.feed(data) + chunker.finish()
    ids = [hmac.digest(KEYS.chunk_id, hashlib.sha256(c.data).digest(), "sha256") for c in pieces]
    assert list(manifest.stream("memory").chunks) == [(i, c.length) for i, c in zip(ids, pieces, strict=True)]
    entries = _entries(tmp_path / "state")
    for cid, piece in zip(ids, pieces, strict=True):
        pack, off, n = entries[cid]
        raw = (tmp_path / "state" / "packs" / f"{pack}.pack").read_bytes()[off:off + ENTRY.size + n]
        stored_id, nonce, sealed_len = ENTRY.unpack_from(raw)
        assert (stored_id, sealed_len) == (cid, len(piece.data) + 16)
        assert repo.cipher.decrypt(cid, nonce, raw[ENTRY.size:], "test") == piece.data
    assert read_all(repo, w.checkpoint_id) == data and w.stats["hash"] > 0 and w.stats["seal"] > 0


def test_ingest_fills_each_pack_to_its_target_and_no_further(repo, tmp_path):
    data = randbytes(3 << 20, seed=5)
    cid = write_checkpoint(repo, data)
    bodies = []
    for pack in (tmp_path / "state" / "packs").iterdir():
        index = read_index(tmp_path / "state" / "packs", pack.name.removesuffix(".pack"))
        body, last = index[-1][1] + ENTRY.size + index[-1][2], ENTRY.size + index[-1][2]
        assert body - last < repo.pack_target        # it closed at the chunk that took it past ...
        bodies.append(body)
    assert len(bodies) >= 10 and sum(b < repo.pack_target for b in bodies) == 1   # ... but the last one
    assert read_all(repo, cid) == data


def test_ingest_stores_a_repeated_chunk_once_and_a_known_one_not_at_all(repo):
    zeros = bytes(8 * SIZES[2])                    # max-size chunks of zeros, all one id
    first = write_checkpoint(repo, randbytes(1 << 20, seed=6) + zeros)
    stored = repo.catalog.query("SELECT count(*) FROM chunks")[0][0]
    again = write_checkpoint(repo, randbytes(1 << 20, seed=6) + zeros, name="again")
    assert repo.catalog.query("SELECT count(*) FROM chunks")[0][0] == stored
    assert read_all(repo, again) == read_all(repo, first)


class _GrowingMemfd:
    """A memory file the pipeline maps and reads in place, handed over ``step`` bytes at a time as a
    spool that `xl save` writes in small pieces is: every piece is one commit of the pipeline."""

    def __init__(self, data: bytes, step: int) -> None:
        self._fd = os.memfd_create("test-growing")
        os.write(self._fd, data)
        self._size, self._step = len(data), step

    def fileno(self) -> int:
        return self._fd

    def wait_beyond(self, size: int) -> tuple[int, bool]:
        grown = min(self._size, size + self._step)
        return grown, grown == self._size

    def close(self) -> None:
        os.close(self._fd)


def test_a_mapped_source_cut_ahead_of_a_slow_writer_keeps_every_taken_chunk(repo, tmp_path, monkeypatch):
    """Nothing but the job ring bounds how far the pipeline cuts a mapped source ahead of the deciding
    thread.  While that thread is slow (a catalog query, a full disk's wait), small commits must not cut
    into the slots of chunks it has taken and not sealed yet: each entry holds the chunk its index names."""
    monkeypatch.setattr("xen_vtpm.store.ingest.RING_BYTES", 1 << 20)      # the least ring, and so job
    monkeypatch.setattr("xen_vtpm.store.ingest.BATCH_BYTES", 256 << 10)   # slots, these batches allow
    data = randbytes(12 << 20, seed=11)
    source = _GrowingMemfd(data, 48 << 10)
    w = repo.begin_checkpoint("vm-1", "g", name="mapped")
    try:
        w.add_stream("memory", source, progress=lambda n: time.sleep(0.01))
        w.commit()
    finally:
        source.close()
    _entries(tmp_path / "state")      # read_index checks every entry header against its pack's index
    assert read_all(repo, w.checkpoint_id) == data


def test_an_error_of_the_source_stops_the_pipeline_and_aborts_the_write(repo, tmp_path):
    threads = _threads()

    def source():
        yield randbytes(2 << 20, seed=7)
        raise ValueError("the source broke")

    w = repo.begin_checkpoint("vm-1", "g", name="broken")
    with pytest.raises(ValueError, match="the source broke"), w:
        w.add_stream("memory", source())
    assert _threads() == threads
    assert not list((tmp_path / "state" / "packs").iterdir()) and repo.catalog.journal_entries() == []


def test_a_failed_pack_write_is_a_storage_error_and_stops_every_thread(tmp_path):
    """The entries are written by the pipeline's writer thread: its failure (a pack the file-size limit
    cuts short) reaches the writer as a one-line storage error."""
    code = f"""
import resource, signal, sys
sys.path[:0] = [{str(ROOT / 'tests')!r}, {str(ROOT)!r}]
from test_store_helpers import open_repo, randbytes, write_checkpoint
from xen_vtpm.errors import StorageError
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
repo = open_repo({str(tmp_path / 'state')!r}, pack_target=64 << 20)
try:
    write_checkpoint(repo, randbytes(4 << 20, seed=8))
except StorageError as exc:
    import os
    print(type(exc).__name__, len(os.listdir("/proc/self/task")), exc)
"""
    out = _run_python(code)
    kind, threads, message = out.stdout.split(" ", 2)
    assert kind == "DiskFull" and "pack" in message and "\n" not in message.strip(), out.stderr
    assert threads == "1"


# --------------------------------------------------------------------------- restore

def _check_into(repo, cid: str, sink: Sink | None) -> None:
    with repo.open_checkpoint(cid) as reader:
        reader.refs_checked()
        reader.check_into("memory", sink)


def _generations(repo) -> tuple[list[str], list[bytes]]:
    one = guest_memory(4 << 20, seed=9)
    two = rewrite_pages(one, 0.05, seed=10)
    return [write_checkpoint(repo, one, name="one"), write_checkpoint(repo, two, name="two")], [one, two]


def test_check_into_memory_writes_each_generation_exactly(repo):
    ids, images = _generations(repo)
    assert repo.catalog.query("SELECT count(*) FROM chunks WHERE delta = 1")[0][0] > 10
    for cid, image in zip(ids, images, strict=True):
        fd = os.memfd_create("image")
        try:
            _check_into(repo, cid, Sink(fd))
            assert os.fstat(fd).st_size == len(image) and os.pread(fd, len(image) + 1, 0) == image
        finally:
            os.close(fd)


def test_check_into_an_encrypted_spool_writes_the_image_under_ctr(repo, tmp_path):
    ids, images = _generations(repo)
    key, iv = os.urandom(32), os.urandom(16)
    with open(tmp_path / "spool", "w+b") as fh:
        _check_into(repo, ids[1], Sink(fh.fileno(), (key, iv)))
        stored = fh.read()
    assert stored != images[1][:len(stored)]
    assert Cipher(algorithms.AES(key), modes.CTR(iv)).decryptor().update(stored) == images[1]


def _flip(state: Path, cid: bytes, at: int) -> None:
    pack, off, _ = _entries(state)[cid]
    path = state / "packs" / f"{pack}.pack"
    raw = bytearray(path.read_bytes())
    raw[off + at] ^= 1
    path.write_bytes(raw)


@pytest.mark.parametrize("where, message", [(ENTRY.size + 5, "fails authentication"),
                                            (3, "holds chunk")])
def test_check_into_names_the_chunk_it_refuses(repo, tmp_path, where, message):
    ids, _ = _generations(repo)
    with repo.open_checkpoint(ids[1]) as reader:
        chunks = list(reader.manifest.stream("memory").chunks)
    victim = 7
    _flip(tmp_path / "state", chunks[victim][0], where)
    with pytest.raises(IntegrityError) as err:
        _check_into(repo, ids[1], None)
    assert f"stream memory chunk {victim}:" in str(err.value) and message in str(err.value)


def test_check_into_a_sink_it_cannot_write_is_a_storage_error(repo, tmp_path):
    ids, _ = _generations(repo)
    (tmp_path / "ro").write_bytes(b"")
    fd = os.open(tmp_path / "ro", os.O_RDONLY)
    try:
        with pytest.raises(StorageError, match="writing the checked image"):
            _check_into(repo, ids[0], Sink(fd))
    finally:
        os.close(fd)


def test_check_into_refuses_a_truncated_pack(repo, tmp_path):
    ids, _ = _generations(repo)
    packs = tmp_path / "state" / "packs"
    victim = max(packs.iterdir(), key=lambda p: p.stat().st_size)
    os.truncate(victim, victim.stat().st_size // 2)
    with pytest.raises(IntegrityError, match="truncated|fails authentication|holds chunk"):
        _check_into(repo, ids[0], None)


# --------------------------------------------------------------------------- the C header and sanitizers

def test_store_header_is_self_contained_and_include_guarded(tmp_path):
    src = tmp_path / "use.c"
    src.write_text('#include "store.h"\n#include "store.h"\nint main(void) { return XV_STAGE_COUNT - 6; }\n')
    for compiler in (["gcc", "-std=c99", "-pedantic"], ["g++", "-x", "c++"]):
        out = subprocess.run([*compiler, "-Wall", "-Wextra", "-Werror", "-fsyntax-only", f"-I{ROOT / 'cext'}",
                              str(src)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


def test_the_pipelines_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """This file's tests and the delta tests over the extension built with ASan and UBSan: any
    out-of-bounds access, use after free or undefined behaviour in the pipelines aborts the run."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(libasan) and SANITIZE
    so = _sanitized_build(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_LOADER)
    env = {**os.environ, "XV_SANITIZED_EXTENSION": so, "LD_PRELOAD": libasan,
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
           "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    loaded = _run_python("import xen_vtpm._hashing as m; print(m.__file__)", env=env)
    assert loaded.stdout.split() == [so], loaded.stderr
    # this file and the delta tests: generations of deltas made, and read, by the C code
    proc = subprocess.run([sys.executable, "-m", "pytest", __file__, str(ROOT / "tests" / "test_store_delta.py"),
                           "-q", "-x", "-p", "no:cacheprovider",
                           "-k", "not sanitizers and not header"], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=600)
    report = proc.stdout[-4000:] + proc.stderr[-4000:]
    assert proc.returncode == 0 and " passed" in proc.stdout, report
    assert "Sanitizer" not in proc.stderr and "runtime error" not in proc.stderr, report
