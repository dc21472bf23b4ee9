"""State hashing: the C engine against the pure-Python reference, the documented format, boundary
stability, bad input, and no leaked threads or mappings."""
from __future__ import annotations

import gc
import hashlib
import mmap
import os
import random
import threading

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from xen_vtpm import hashing as H
from xen_vtpm.errors import HashSourceError, StorageError

SMALL = (64, 256, 1024)          # chunk sizes that give many chunks on small inputs


def _rand(n: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(n)


def _low_entropy(n: int, seed: int) -> bytes:
    """Long zero runs with a few short patterns, like a mostly idle guest's memory."""
    rng = random.Random(seed)
    out = bytearray(n)
    for _ in range(max(1, n // 5000)):
        at = rng.randrange(max(1, n))
        out[at:at + 40] = bytes([rng.randrange(4)]) * 40
    return bytes(out[:n])


def _splits(data: bytes, rng: random.Random) -> list[bytes]:
    cuts = sorted(rng.randrange(len(data) + 1) for _ in range(rng.randrange(6)))
    bounds = [0, *cuts, len(data)]
    return [data[a:b] for a, b in zip(bounds, bounds[1:])]


def _threads() -> int:
    return len(os.listdir("/proc/self/task"))


def _maps_of(path) -> int:
    with open("/proc/self/maps") as f:
        return sum(str(path) in line for line in f)


# --------------------------------------------------------------------------- the documented format

def test_tree_format_matches_the_spec_by_hand():
    """docs/formats.md: leaves 0x00||data, nodes 0x01||l||r, odd node promoted, root binds len+leaf."""
    sha = lambda b: hashlib.sha256(b).digest()  # noqa: E731
    final = lambda top, n, leaf: sha(b"\x02" + n.to_bytes(8, "big") + leaf.to_bytes(4, "big") + top)  # noqa: E731
    assert H.tree_hash(b"", 64) == final(sha(b"\x00"), 0, 64)
    data = bytes(range(64)) * 2 + b"xyz"                            # leaves: 64, 64, 3 bytes
    l0, l1, l2 = (sha(b"\x00" + data[i:i + 64]) for i in (0, 64, 128))
    expect = final(sha(b"\x01" + sha(b"\x01" + l0 + l1) + l2), len(data), 64)
    assert H.tree_hash(data, 64) == expect
    assert H.py_tree_hash(data, 64) == expect
    # the same bytes under another leaf size, and a prefix of a stream, give different roots
    assert H.tree_hash(data, 128) != expect
    assert H.tree_hash(data[:128], 64) != final(sha(b"\x01" + l0 + l1), 131, 64)


def test_gear_table_is_the_documented_derivation():
    c_table = H.ffi.new("uint64_t[256]")
    H.lib.xv_gear_table(c_table)
    label = b"xen-vtpm gear v1"
    expect = [int.from_bytes(hashlib.sha256(label + bytes([i])).digest()[:8], "little") for i in range(256)]
    assert list(c_table) == expect == H.gear_table()


# --------------------------------------------------------------------------- tree hash vs reference

@pytest.mark.parametrize("leaf", [64, 1024, 4096])
@pytest.mark.parametrize("kind", ["random", "low"])
def test_tree_hash_equals_reference(tmp_path, leaf, kind):
    rng = random.Random(leaf)
    sizes = [0, 1, leaf - 1, leaf, leaf + 1, 2 * leaf, 3 * leaf, 5 * leaf + 7, 17 * leaf, 64 * leaf + 3]
    for n in sizes:
        data = _rand(n, n) if kind == "random" else _low_entropy(n, n)
        expect = H.py_tree_hash(data, leaf)
        f = tmp_path / f"img{n}"
        f.write_bytes(data)
        ref_stream = H.PyStreamTreeHash(leaf)
        c_stream = H.StreamTreeHash(leaf)
        for piece in _splits(data, rng):
            ref_stream.update(piece)
            c_stream.update(piece)
        got = {
            "buffer": H.tree_hash(data, leaf),
            "bytearray-1-thread": H.tree_hash(bytearray(data), leaf, threads=1),
            "memoryview-3-threads": H.tree_hash(memoryview(data), leaf, threads=3),
            "file": H.tree_hash(f, leaf),
            "file-str-1-thread": H.tree_hash(str(f), leaf, threads=1),
            "py-stream": ref_stream.digest(),
            "c-stream": c_stream.digest(),
        }
        assert got == dict.fromkeys(got, expect), n


@pytest.mark.parametrize("n,leaf", [((3 << 20) + 5, 1 << 20), ((4 << 20), 1 << 20), ((19 << 20) + 3, 64 << 10)])
def test_tree_hash_mib_inputs(tmp_path, n, leaf):
    """Several mapping windows and worker blocks; a partial last block."""
    data = _rand(n, 7)
    f = tmp_path / "img"
    f.write_bytes(data)
    expect = H.py_tree_hash(data, leaf)
    s = H.StreamTreeHash(leaf)
    for i in range(0, n, 300_001):
        s.update(data[i:i + 300_001])
    assert H.tree_hash(data, leaf) == H.tree_hash(f, leaf) == s.digest() == expect
    assert H.tree_hash(f, leaf, threads=1) == expect


def test_default_leaf_and_stream_digest_is_final():
    s = H.StreamTreeHash()
    s.update(b"abc")
    assert s.digest() == s.digest() == H.tree_hash(b"abc") == H.py_tree_hash(b"abc", 1 << 20)
    with pytest.raises(ValueError, match="already finished"):
        s.update(b"more")


# --------------------------------------------------------------------------- chunker vs reference

def _c_chunks(data: bytes, pieces: list[bytes], sizes=SMALL, threads=None) -> list[H.Chunk]:
    c = H.Chunker(*sizes, threads=threads)
    out = []
    for p in pieces:
        out += c.feed(p)
    return out + c.finish()


def _py_chunks(data: bytes, sizes=SMALL) -> list[H.Chunk]:
    c = H.PyChunker(*sizes)
    return c.feed(data) + c.finish()


def _check_chunk_invariants(chunks: list[H.Chunk], data: bytes, sizes) -> None:
    lo, _, hi = sizes
    assert b"".join(c.data for c in chunks) == data
    pos = 0
    for i, c in enumerate(chunks):
        assert c.offset == pos and c.length == len(c.data)
        assert c.digest == hashlib.sha256(c.data).digest()
        assert c.length <= hi and (c.length >= lo or i == len(chunks) - 1)
        pos += c.length


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=12_000),
                      st.builds(lambda n, s: _low_entropy(n, s), st.integers(0, 12_000), st.integers(0, 99)),
                      st.builds(lambda n, s: _rand(n, s), st.integers(0, 12_000), st.integers(0, 99))),
       seed=st.integers(0, 2**32), threads=st.sampled_from([1, 2, 3]))
def test_chunker_equals_reference_for_any_split(data, seed, threads):
    pieces = _splits(data, random.Random(seed))
    ref = _py_chunks(data)
    assert _c_chunks(data, pieces, threads=threads) == ref
    _check_chunk_invariants(ref, data, SMALL)


@pytest.mark.parametrize("make", [_rand, _low_entropy])
def test_chunker_default_sizes_mib(make):
    data = make((3 << 20) + 11, 3)
    pieces = _splits(data, random.Random(1))
    sizes = (H.DEFAULT_MIN, H.DEFAULT_AVG, H.DEFAULT_MAX)
    ref = _py_chunks(data, sizes)
    assert _c_chunks(data, pieces, sizes) == ref
    _check_chunk_invariants(ref, data, sizes)


def test_chunker_long_stream_any_split_any_threads():
    """20 MiB with small chunks: the engine cycles its buffers many times; results stay identical."""
    sizes = (256, 1024, 4096)
    data = _low_entropy(10 << 20, 4) + _rand(10 << 20, 4)
    whole = _c_chunks(data, [data], sizes, threads=1)
    rng = random.Random(5)
    pieces, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 100, 4096, 65536, 1 << 20, 3 << 20])
        pieces.append(data[pos:pos + n])
        pos += n
    assert _c_chunks(data, pieces, sizes, threads=3) == whole
    _check_chunk_invariants(whole, data, sizes)
    ref = H.PyChunker(*sizes)            # spot-check boundaries against the reference cut function
    for i in rng.sample(range(len(whole) - 1), 40) + [len(whole) - 1]:
        c = whole[i]
        assert ref.cut(data[c.offset:c.offset + sizes[2]], final=i == len(whole) - 1) == c.length


def test_chunk_and_tree_from_a_real_pipe():
    """One pass over a pipe: the same chunks as Chunker, the same root as tree_hash."""
    data = _rand((5 << 20) + 999, 11)
    r, w = os.pipe()

    def writer():
        with os.fdopen(w, "wb") as f:
            for i in range(0, len(data), 70_000):
                f.write(data[i:i + 70_000])

    t = threading.Thread(target=writer)
    t.start()
    cat = H.ChunkAndTree(64 << 10, 2048, 8192, 32768)
    with os.fdopen(r, "rb", buffering=0) as f:
        chunks = list(cat.consume(f))
    t.join()
    assert chunks == _c_chunks(data, [data], (2048, 8192, 32768))
    assert cat.digest() == H.tree_hash(data, 64 << 10)
    _check_chunk_invariants(chunks, data, (2048, 8192, 32768))


def test_chunker_consume_fd_and_empty_stream():
    r, w = os.pipe()
    os.close(w)
    assert list(H.Chunker().consume(r)) == []
    os.close(r)
    cat = H.ChunkAndTree()
    assert cat.finish() == []
    assert cat.digest() == H.tree_hash(b"")


# --------------------------------------------------------------------------- boundary stability

def _shared_bytes(a: list[H.Chunk], b: list[H.Chunk]) -> int:
    have = {c.digest for c in a}
    return sum(c.length for c in b if c.digest in have)


def test_insertion_near_start_changes_only_nearby_chunks():
    sizes = (1024, 4096, 16384)
    base = _rand(2 << 20, 5)
    edited = base[:100] + _rand(300, 6) + base[100:]
    a = _c_chunks(base, [base], sizes)
    b = _c_chunks(edited, [edited], sizes)
    known = {c.digest for c in a}
    changed = [c for c in b if c.digest not in known]
    assert changed and all(c.offset < 3 * sizes[2] for c in changed)
    assert len(changed) <= 3 and b[:len(changed)] == changed
    # every later chunk is an original chunk, shifted by the 300 inserted bytes
    tail = b[len(changed):]
    assert [(c.offset - 300, c.digest) for c in tail] == [(c.offset, c.digest) for c in a[len(a) - len(tail):]]


def test_page_edits_change_only_the_chunks_around_them():
    sizes = (1024, 4096, 16384)
    base = bytearray(_rand(2 << 20, 8))
    edited = bytearray(base)
    rng = random.Random(9)
    pages = sorted(rng.sample(range(len(base) // 4096), 8))
    for p in pages:
        edited[p * 4096:(p + 1) * 4096] = _rand(4096, p)
    a = _c_chunks(bytes(base), [bytes(base)], sizes)
    b = _c_chunks(bytes(edited), [bytes(edited)], sizes)
    known = {c.digest for c in a}
    # A changed chunk overlaps an edited page or follows one closely: after an edit the two boundary
    # sequences meet again within a few chunks.
    for c in b:
        if c.digest not in known:
            assert any(p * 4096 < c.offset + c.length and c.offset < (p + 1) * 4096 + 12 * sizes[1]
                       for p in pages)
    assert _shared_bytes(a, b) >= 0.9 * len(edited)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("leaf", [0, 1, 3, 32, 100, 3 << 10, 1 << 27, -64, 1.5, "4096"])
def test_bad_leaf_size(leaf, tmp_path):
    for call in (lambda: H.tree_hash(b"x", leaf), lambda: H.StreamTreeHash(leaf),
                 lambda: H.ChunkAndTree(leaf), lambda: H.py_tree_hash(b"x", leaf)):
        with pytest.raises(ValueError, match="power of two"):
            call()


@pytest.mark.parametrize("sizes", [(0, 256, 1024), (64, 300, 1024), (256, 256, 1024), (64, 1024, 1024),
                                   (64, 128, 1024), (64, 256, 1 << 27)])
def test_bad_chunk_sizes(sizes):
    for cls in (H.Chunker, H.PyChunker):
        with pytest.raises(ValueError, match="chunk sizes"):
            cls(*sizes)


def test_bad_threads_and_use_after_finish():
    with pytest.raises(ValueError, match="threads"):
        H.tree_hash(b"x", threads=0)
    c = H.Chunker()
    c.finish()
    for call in (lambda: c.feed(b"x"), c.finish):
        with pytest.raises(ValueError, match="already finished"):
            call()


def test_missing_directory_and_fifo(tmp_path):
    with pytest.raises(HashSourceError, match="no such file"):
        H.tree_hash(tmp_path / "absent")
    with pytest.raises(HashSourceError, match="is a directory"):
        H.tree_hash(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with pytest.raises(HashSourceError, match="not a regular file"):
        H.tree_hash(fifo)
    assert issubclass(HashSourceError, StorageError)


def test_unreadable_file(tmp_path):
    f = tmp_path / "secret"
    f.write_bytes(b"x" * 100)
    f.chmod(0)
    if os.geteuid() != 0:
        with pytest.raises(HashSourceError, match="permission denied"):
            H.tree_hash(f)
        return
    # root reads anything: check in a child that drops to an unprivileged uid
    tmp_path.chmod(0o755)
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setgid(65534)
            os.setuid(65534)
            try:
                H.tree_hash(f)
                msg = b"no error"
            except HashSourceError as e:
                msg = str(e).encode()
            os.write(w, msg)
        finally:
            os._exit(0)
    os.close(w)
    with os.fdopen(r, "rb") as fr:
        msg = fr.read().decode()
    os.waitpid(pid, 0)
    assert "permission denied" in msg and str(f) in msg


def test_shrunk_mapping_raises_instead_of_crashing(tmp_path):
    """SIGBUS from a mapping whose file was truncated is caught per thread and reported."""
    f = tmp_path / "img"
    f.write_bytes(_rand(8 << 20, 1))
    before = _threads()
    with open(f, "r+b") as fh:
        m = mmap.mmap(fh.fileno(), 0)
        fh.truncate(4096)
        for threads in (1, 2, 4):
            with pytest.raises(HashSourceError, match="changed size"):
                H.tree_hash(m, 64 << 10, threads=threads)
        m.close()
    assert _threads() == before
    assert H.tree_hash(f, 64 << 10) == H.py_tree_hash(f.read_bytes(), 64 << 10)   # still healthy


def test_file_shrinking_while_hashed(tmp_path):
    """Whatever the timing: a clear error or the digest of one of the two contents, never a crash."""
    data = _rand(48 << 20, 2)
    full, short = H.tree_hash(data), H.tree_hash(data[:1 << 20])
    f = tmp_path / "img"
    outcomes = set()
    for delay in (0.0, 0.002, 0.005, 0.01, 0.02):
        f.write_bytes(data)
        timer = threading.Timer(delay, os.truncate, (f, 1 << 20))
        timer.start()
        try:
            digest = H.tree_hash(f)
            assert digest in (full, short)
            outcomes.add("ok")
        except HashSourceError as e:
            assert str(f) in str(e) and "changed" in str(e)
            outcomes.add("error")
        timer.join()
    assert outcomes
    assert _maps_of(f) == 0


def test_concurrent_calls_from_python_threads(tmp_path):
    """The GIL is released during a call: several callers at once, each with its own workers."""
    blobs = [_rand((6 << 20) + i, i) for i in range(4)]
    files = []
    for i, b in enumerate(blobs):
        files.append(tmp_path / f"f{i}")
        files[-1].write_bytes(b)
    expect = [H.py_tree_hash(b) for b in blobs]
    results: dict[int, bytes] = {}

    def work(i):
        results[i] = H.tree_hash(files[i]) if i % 2 else H.tree_hash(blobs[i])

    ts = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert [results[i] for i in range(4)] == expect


def test_no_leaked_threads_or_mappings(tmp_path):
    f = tmp_path / "img"
    f.write_bytes(_rand(40 << 20, 3))
    gc.collect()
    threads, maps = _threads(), _maps_of(f)
    H.tree_hash(f, threads=4)
    cat = H.ChunkAndTree(threads=3)
    cat.feed(b"x" * (3 << 20))
    cat.finish()
    abandoned = H.Chunker(threads=4)
    abandoned.feed(_rand(1 << 20, 4))
    assert _threads() > threads          # its workers are running ...
    del abandoned, cat
    gc.collect()
    assert _threads() == threads         # ... and are joined when it goes away
    assert _maps_of(f) == maps == 0


# --------------------------------------------------------------------------- multi-lane SHA-256

def _lane_messages(seed: int) -> list[bytes]:
    """Lengths around every block and padding edge, mixed with long ones so lanes refill mid-batch."""
    rng = random.Random(seed)
    sizes = list(range(0, 200)) + [rng.randrange(0, 1 << 18) for _ in range(40)] + [1 << 20, (1 << 20) + 63]
    rng.shuffle(sizes)
    return [rng.randbytes(n) for n in sizes]


@pytest.mark.parametrize("prefix", [None, 0x00, 0x01, 0xFF])
def test_sha256_many_equals_hashlib(prefix):
    msgs = _lane_messages(prefix or 7)
    head = b"" if prefix is None else bytes([prefix])
    assert H.sha256_many(msgs, prefix) == [hashlib.sha256(head + m).digest() for m in msgs]
    assert H.sha256_many([], prefix) == []


def test_sha256_many_accepts_views_and_rejects_a_bad_prefix():
    data = bytearray(random.Random(3).randbytes(5000))
    views = [memoryview(data)[i:i + 700] for i in range(0, 5000, 700)]
    assert H.sha256_many(views) == [hashlib.sha256(v).digest() for v in views]
    with pytest.raises(ValueError, match="prefix"):
        H.sha256_many([b"x"], 256)


def test_libcrypto_engine_gives_the_same_results(tmp_path):
    """The lane engine and the libcrypto fallback (forced by the environment) agree on every API."""
    probe = (
        "import hashlib, random, sys\n"
        "from xen_vtpm import hashing as H\n"
        "rng = random.Random(11)\n"
        "msgs = [rng.randbytes(n) for n in list(range(150)) + [70000, 262144, 1 << 20]]\n"
        "blob = rng.randbytes(5 << 20)\n"
        "c = H.Chunker(min_size=2048, avg_size=8192, max_size=32768)\n"
        "chunks = [(k.offset, k.length, k.digest) for k in c.feed(blob)] + "
        "[(k.offset, k.length, k.digest) for k in c.finish()]\n"
        "print(H.SHA256_ENGINE)\n"
        "print(hashlib.sha256(repr((H.sha256_many(msgs, 0), H.tree_hash(blob, 4096), chunks)).encode()).hexdigest())\n"
    )
    import subprocess
    import sys

    def run(engine: str | None) -> list[str]:
        env = {k: v for k, v in os.environ.items() if k != "XEN_VTPM_SHA256"}
        if engine:
            env["XEN_VTPM_SHA256"] = engine
        out = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, check=True)
        return out.stdout.split()

    forced, default = run("libcrypto"), run(None)
    assert forced[0] == "libcrypto"
    assert forced[-1] == default[-1]
