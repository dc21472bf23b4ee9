"""Snapshot streaming: the encrypted spool between `xl save` and the store, and the format-2 ids/root.

The real `xl` (simulated host) runs in tests/test_e2e_*.py; here a stand-in with the same `save`
signature writes a known byte stream into the fifo, so the spool's guarantees can be checked
directly: `start_save` returns before ingestion ends, no plaintext and no file name is left on
disk, and every path (success, xl failure, cancel) frees the spool.
"""
from __future__ import annotations

import hashlib
import hmac
import io
import os
import threading
import time

import pytest
from test_store_helpers import KEYS, guest_memory, open_repo, read_all

from xen_vtpm.config import Config
from xen_vtpm.errors import IntegrityError, XlError
from xen_vtpm.hashing import PyChunker
from xen_vtpm.store.manifest import ROOT_LABEL
from xen_vtpm.store.packs import ENTRY
from xen_vtpm.xen import streams as xlstreams
from xen_vtpm.xen.streams import SaveIngest, XlStreams, _DiskSpool

DATA = guest_memory(3 << 20, seed=77)
MARK = b"PLAINTEXT-MARKER" * 256          # 4 KiB that must never reach the disk in the clear


class StandInXl:
    """`xl save DOMAIN FILE`: writes ``data`` into FILE (a fifo here), then fails if told to."""

    def __init__(self, data: bytes, fail_after: int | None = None) -> None:
        self.data, self.fail_after = data, fail_after
        self.files: list[str] = []

    def save(self, guest: str, file: str, cfg: object = None, checkpoint: bool = False,
             leave_paused: bool = False) -> None:
        self.files.append(file)
        with open(file, "wb") as out:
            out.write(self.data[:self.fail_after])
        if self.fail_after is not None:
            raise XlError(f"{guest}: xl save failed (stand-in)")


class GatedWriter:
    """A real checkpoint writer whose ingestion starts only when ``go`` is set."""

    def __init__(self, writer: object) -> None:
        self.w, self.go, self.started = writer, threading.Event(), threading.Event()

    def add_stream(self, name: str, source: object, progress: object = None) -> object:
        self.started.set()
        self.go.wait()
        return self.w.add_stream(name, source, progress=progress)


@pytest.fixture
def env(tmp_path):
    state = tmp_path / "state"
    repo = open_repo(state, pack_target=1 << 20)
    yield state, repo
    repo.close()


def _streams(state, data: bytes, fail_after: int | None = None, ram_mib: int = -1) -> XlStreams:
    return XlStreams(Config(state_dir=state, spool_ram_mib=ram_mib), StandInXl(data, fail_after), None)


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def test_save_returns_while_the_store_has_not_read_a_byte(env):
    state, repo = env
    fds = _open_fds()
    w = repo.begin_checkpoint("vm-1", "guest1", name="spooled")
    gated = GatedWriter(w)
    ingest = _streams(state, DATA).start_save("guest1", gated, leave_paused=True)
    # `xl save` is done and the ingestion has not consumed anything: the pause does not wait for it.
    assert isinstance(ingest, SaveIngest) and not gated.go.is_set()
    assert sorted(os.listdir(state / "tmp")) == []           # no fifo, and the spool has no name
    gated.go.set()
    assert ingest.wait() == {"bytes": len(DATA)}
    assert ingest.wait() == {"bytes": len(DATA)}              # idempotent
    w.commit()
    assert read_all(repo, w.checkpoint_id) == DATA
    assert _open_fds() <= fds                                 # the spool's descriptor is closed


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a priority back needs CAP_SYS_NICE")
def test_ingestion_yields_the_cpu_until_the_guest_runs(env):
    state, repo = env
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base >= 19:
        pytest.skip("the test process already runs at the lowest priority")
    w = repo.begin_checkpoint("vm-1", "guest1", name="nice")
    seen = {}

    class Recording(GatedWriter):
        def add_stream(self, name, source, progress=None):
            seen["paused"] = os.getpriority(os.PRIO_PROCESS, 0)
            self.started.set()
            self.go.wait()
            seen["running"] = os.getpriority(os.PRIO_PROCESS, 0)
            return self.w.add_stream(name, source, progress=progress)

    gated = Recording(w)
    ingest = _streams(state, DATA).start_save("guest1", gated, leave_paused=True)
    gated.started.wait()
    xlstreams._restore_priority()      # what ingest.wait() does first, once the guest runs
    gated.go.set()
    assert ingest.wait() == {"bytes": len(DATA)}
    w.abort()
    assert seen == {"paused": 19, "running": base}


def test_spool_is_encrypted_and_nameless(tmp_path):
    spool = _DiskSpool(tmp_path)
    try:
        data = MARK * 600 + os.urandom(5000)                  # several blocks, an odd tail
        assert spool.fill(io.BytesIO(data)) == len(data)
        assert list(tmp_path.iterdir()) == []
        target = os.readlink(f"/proc/self/fd/{spool._fd}")
        assert target.startswith(f"{tmp_path}/") and target.endswith("(deleted)")
        assert os.fstat(spool._fd).st_mode & 0o777 == 0o600
        on_disk = os.pread(spool._fd, len(data) + 1, 0)
        assert len(on_disk) == len(data) and MARK[:64] not in on_disk
        assert os.fstat(spool._fd).st_blocks > 0
        assert b"".join(bytes(b) for b in spool.blocks()) == data
        assert os.fstat(spool._fd).st_blocks * 512 <= 4096       # consumed: punched out (but a partial page)
    finally:
        spool.close()


def test_xl_failure_frees_everything_and_raises_xl_error(env):
    state, repo = env
    fds = _open_fds()
    w = repo.begin_checkpoint("vm-1", "guest1", name="broken")
    with pytest.raises(XlError, match="stand-in"):
        _streams(state, DATA, fail_after=len(DATA) // 2).start_save("guest1", w, leave_paused=True)
    w.abort()
    assert os.listdir(state / "tmp") == [] and _open_fds() <= fds
    assert repo.list_checkpoints() == [] and os.listdir(state / "packs") == []


def test_cancel_stops_ingestion_and_frees_the_spool(env):
    state, repo = env
    fds = _open_fds()
    w = repo.begin_checkpoint("vm-1", "guest1", name="cancelled")
    gated = GatedWriter(w)
    ingest = _streams(state, DATA).start_save("guest1", gated, leave_paused=True)
    gated.started.wait()
    gated.go.set()
    ingest.cancel()                     # what the coordinator does when the vTPM capture fails
    ingest.cancel()
    with pytest.raises(XlError, match="cancelled"):
        ingest.wait()
    w.abort()
    assert os.listdir(state / "tmp") == [] and _open_fds() <= fds
    assert os.listdir(state / "packs") == []


def test_a_broken_stream_never_commits_as_complete(tmp_path):
    spool = _DiskSpool(tmp_path)

    class Broken(io.RawIOBase):
        def readinto(self, buf):
            raise OSError("fifo read failed")

    with pytest.raises(OSError):
        spool.fill(Broken())
    with pytest.raises(XlError, match="broke off"):
        list(spool.blocks())
    spool.close()


def test_named_leftover_spools_are_swept(env):
    state, _ = env
    (state / "tmp").mkdir()
    leftover = state / "tmp" / "0123456789abcdef.spool"
    leftover.write_bytes(b"ciphertext under a key that died with its process")
    (state / "tmp" / "keep.txt").write_text("not ours")
    streams = _streams(state, b"")
    assert streams.sweep_spools() == 1
    assert sorted(p.name for p in (state / "tmp").iterdir()) == ["keep.txt"]


def test_format_2_ids_and_stream_root_byte_for_byte(env):
    """docs/formats.md, "Checkpoint store" §0 and §2, recomputed with the pure-Python chunker."""
    state, repo = env
    data = guest_memory(2 << 20, seed=8) + bytes(3 * repo.chunk_sizes[2])   # zeros: max-size chunks repeat
    w = repo.begin_checkpoint("vm-1", "guest1", name="exact")
    w.add_stream("memory", [data])
    manifest = w.commit()
    min_size, avg_size, max_size = repo.chunk_sizes
    chunker = PyChunker(min_size, avg_size, max_size)
    pieces = chunker.feed(data) + chunker.finish()
    rec = manifest.stream("memory")
    root = hashlib.sha256(ROOT_LABEL)
    expect = []
    for c in pieces:
        digest = hashlib.sha256(c.data).digest()
        expect.append((hmac.digest(KEYS.chunk_id, digest, "sha256"), c.length))
        root.update(digest + c.length.to_bytes(4, "little"))
    assert list(rec.chunks) == expect
    assert len(rec.chunks.raw) == 36 * len(expect)            # compact: no Python object per chunk
    assert rec.tree_root == root.digest()
    # A repeated chunk inside one write is stored once.
    distinct = {cid for cid, _ in expect}
    assert repo.catalog.query("SELECT count(*) FROM chunks") == [(len(distinct),)] and len(distinct) < len(expect)


def test_restore_pass_without_full_check_still_rejects_altered_ciphertext(env):
    state, repo = env
    w = repo.begin_checkpoint("vm-1", "guest1", name="t")
    w.add_stream("memory", [DATA])
    w.commit()
    pack, offset, length = repo.catalog.query("SELECT pack, offset, length FROM chunks ORDER BY pack, offset")[3]
    with open(state / "packs" / f"{pack}.pack", "r+b") as f:
        f.seek(offset + ENTRY.size + length // 2)
        b = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([b[0] ^ 0x40]))
    with repo.open_checkpoint(w.checkpoint_id) as r, pytest.raises(IntegrityError, match="fails authentication"):
        for _ in r.stream("memory", full_check=False):
            pass


def test_restore_pass_yields_the_same_bytes(env):
    _, repo = env
    w = repo.begin_checkpoint("vm-1", "guest1", name="same")
    w.add_stream("memory", [DATA])
    w.commit()
    with repo.open_checkpoint(w.checkpoint_id) as r:
        seen = []
        assert b"".join(r.stream("memory", progress=seen.append, full_check=False)) == DATA
        assert sum(seen) == len(DATA)


# --------------------------------------------------------------------------- the spool in RAM

def test_an_image_that_fits_the_budget_is_spooled_in_memory(env):
    state, repo = env
    fds = _open_fds()
    streams = _streams(state, DATA, ram_mib=64)
    w = repo.begin_checkpoint("vm-1", "guest1", name="in-ram")
    gated = GatedWriter(w)
    ingest = streams.start_save("guest1", gated, leave_paused=True, expected_bytes=len(DATA))
    # `xl save` wrote into our unnamed memory file, reopened through /proc; nothing has a name on disk.
    assert streams.xl.files == [f"/proc/{os.getpid()}/fd/{streams.xl.files[0].rsplit('/', 1)[1]}"]
    assert os.readlink(streams.xl.files[0]).startswith("/memfd:xen-vtpm-spool")
    assert not gated.go.is_set() and not (state / "tmp").exists()
    gated.go.set()
    assert ingest.wait() == {"bytes": len(DATA)}
    w.commit()
    assert read_all(repo, w.checkpoint_id) == DATA
    assert _open_fds() <= fds


@pytest.mark.parametrize("ram_mib, expected", [(0, len(DATA)), (8, 64 << 20), (64, 0)])
def test_an_image_over_the_budget_or_of_unknown_size_goes_to_the_encrypted_disk_spool(env, ram_mib, expected):
    state, repo = env
    streams = _streams(state, DATA, ram_mib=ram_mib)
    w = repo.begin_checkpoint("vm-1", "guest1", name="on-disk")
    assert streams.start_save("guest1", w, leave_paused=True, expected_bytes=expected).wait() == {"bytes": len(DATA)}
    w.commit()
    assert streams.xl.files[0].startswith(f"{state}/tmp/") and streams.xl.files[0].endswith(".fifo")
    assert read_all(repo, w.checkpoint_id) == DATA


def test_xl_failure_with_the_memory_spool_frees_it(env):
    state, repo = env
    fds = _open_fds()
    w = repo.begin_checkpoint("vm-1", "guest1", name="broken-ram")
    with pytest.raises(XlError, match="stand-in"):
        _streams(state, DATA, fail_after=len(DATA) // 2, ram_mib=64).start_save(
            "guest1", w, leave_paused=True, expected_bytes=len(DATA))
    w.abort()
    assert _open_fds() <= fds and repo.list_checkpoints() == [] and os.listdir(state / "packs") == []


@pytest.mark.parametrize("ram_mib", [64, 0], ids=["memory-spool", "disk-spool"])
def test_the_snapshot_progress_bar_has_a_total(env, ram_mib):
    """A bar that only counts bytes says nothing about the time left: it gets the image's size (RAM
    spool: exact, once `xl save` is done) or the guest's memory size (disk spool: known before)."""
    state, repo = env
    bars = []

    class Bar:
        def __init__(self, label, total):
            self.label, self.total, self.done = label, total, 0
            bars.append(self)

        def update(self, n):
            self.done += n

        def close(self):
            pass

    streams = XlStreams(Config(state_dir=state, spool_ram_mib=ram_mib), StandInXl(DATA), Bar)
    w = repo.begin_checkpoint("vm-1", "guest1", name="bar")
    guest_memory_size = len(DATA) + (1 << 20)      # the image is not exactly the guest's memory
    assert streams.start_save("guest1", w, leave_paused=True,
                              expected_bytes=guest_memory_size).wait() == {"bytes": len(DATA)}
    w.commit()
    [bar] = bars
    assert bar.total == (len(DATA) if ram_mib else guest_memory_size) and bar.done == len(DATA)


def test_ingestion_reads_the_memory_spool_while_xl_save_still_writes(env):
    """The store does not wait for the whole image: it reads what `xl save` has written so far."""
    state, repo = env
    data = guest_memory(24 << 20, seed=79)
    read_before_end = {}

    class SlowXl(StandInXl):
        def save(self, guest, file, cfg=None, checkpoint=False, leave_paused=False):
            with open(file, "wb") as out:
                for i in range(0, len(data), 1 << 20):
                    out.write(data[i:i + (1 << 20)])
                    out.flush()
                    time.sleep(0.02)
                spool_fd = int(file.rsplit("/", 1)[1])
                deadline = time.monotonic() + 10
                # All written, xl not returned yet: the reader must have consumed (punched out) some of it.
                while os.fstat(spool_fd).st_blocks * 512 >= len(data) and time.monotonic() < deadline:
                    time.sleep(0.01)
                read_before_end["yes"] = os.fstat(spool_fd).st_blocks * 512 < len(data)

    streams = XlStreams(Config(state_dir=state, spool_ram_mib=-1), SlowXl(data), None)
    w = repo.begin_checkpoint("vm-1", "guest1", name="overlap")
    assert streams.start_save("guest1", w, leave_paused=True, expected_bytes=len(data)).wait() == {"bytes": len(data)}
    w.commit()
    assert read_before_end == {"yes": True} and read_all(repo, w.checkpoint_id) == data


def test_the_memory_spool_cannot_shrink_under_the_store_that_maps_it():
    spool = xlstreams._MemorySpool()
    try:
        os.write(spool.fileno(), b"x" * 8192)
        with pytest.raises(PermissionError):
            os.ftruncate(spool.fileno(), 4096)   # a mapped page past the end would be a SIGBUS
        os.ftruncate(spool.fileno(), 16384)      # growing is what xl save does
    finally:
        spool.close()
