"""State hashing: the C engine against the pure-Python reference at 1, 2, 4 and 8 threads, which
SHA-256 engine runs, the documented format, boundary stability, bad input and every C status, no
leaked threads or mappings, and this file's tests again over a build with AddressSanitizer and UBSan."""
from __future__ import annotations

import errno
import functools
import gc
import hashlib
import importlib.util
import json
import mmap
import os
import random
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from xen_vtpm import hashing as H
from xen_vtpm._hashing import ffi, lib
from xen_vtpm.errors import HashEngineError, HashSourceError, StorageError
from xen_vtpm.hashing._native import check

ROOT = Path(__file__).resolve().parents[1]
SMALL = (64, 256, 1024)          # chunk sizes that give many chunks on small inputs
THREADS = (1, 2, 4, 8)
LANES, LIBCRYPTO = "sha-ni, 4 lanes", "libcrypto"


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


def _run_python(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=120)


# --------------------------------------------------------------------------- which engine runs

def _cpu_has_sha_ni() -> bool:
    with open("/proc/cpuinfo") as f:
        return any(line.startswith("flags") and "sha_ni" in line.split() for line in f)


def _expected_engine(setting: str | None) -> str:
    """The engine a process must pick when its XEN_VTPM_SHA256 is ``setting`` (None: unset)."""
    if setting == "libcrypto":
        return LIBCRYPTO
    if _cpu_has_sha_ni():
        return LANES
    if os.environ.get("XEN_VTPM_SHA256") == "libcrypto":
        return LIBCRYPTO          # this run explicitly gave up on the lanes
    pytest.fail("this CPU does not report sha_ni in /proc/cpuinfo, so the SHA-NI lane engine cannot be "
                "tested here; run the tests with XEN_VTPM_SHA256=libcrypto to test the libcrypto engine alone")


def test_engine_in_use_is_the_one_the_cpu_and_the_environment_select():
    assert H.SHA256_ENGINE == _expected_engine(os.environ.get("XEN_VTPM_SHA256"))


def _engine_inputs() -> tuple[list[bytes], bytes]:
    rng = random.Random(11)
    msgs = [rng.randbytes(n) for n in list(range(150)) + [70000, 262144, 1 << 20]]
    return msgs, _low_entropy(1 << 20, 12) + rng.randbytes((1 << 20) + 77)


def _hex(results: dict) -> str:
    return json.dumps({k: [[x.hex() if isinstance(x, bytes) else x for x in row] for row in v]
                       for k, v in results.items()})


def _engine_results() -> dict:
    """Every API of the C engine in this process over _engine_inputs()."""
    msgs, blob = _engine_inputs()
    both = H.ChunkAndTree(4096, 2048, 8192, 32768, threads=4)
    chunks = both.feed(blob) + both.finish()
    stream = H.StreamTreeHash(4096, threads=2)
    stream.update(blob)
    return {"sha256_many": [H.sha256_many(msgs, p) for p in (None, 0, 255)] + [H.sha256_many([], 0)],
            "tree": [[H.tree_hash(blob, 4096, threads=t) for t in (1, 4)] + [stream.digest(), both.digest()]],
            "chunks": [[c.offset, c.length, c.digest] for c in chunks]}


@functools.cache
def _reference_results() -> dict:
    msgs, blob = _engine_inputs()
    ref = H.PyChunker(2048, 8192, 32768)
    root = H.py_tree_hash(blob, 4096)
    return {"sha256_many": [[hashlib.sha256(head + m).digest() for m in msgs] for head in (b"", b"\0", b"\xff")]
            + [[]],
            "tree": [[root] * 4],
            "chunks": [[c.offset, c.length, c.digest] for c in ref.feed(blob) + ref.finish()]}


_ENGINE_PROBE = (
    "import importlib.util, sys\n"
    "spec = importlib.util.spec_from_file_location('probe', sys.argv[1])\n"
    "T = importlib.util.module_from_spec(spec)\n"
    "spec.loader.exec_module(T)\n"
    "print(T.H.SHA256_ENGINE)\n"
    "print(T._hex(T._engine_results()))\n"
)


@pytest.mark.parametrize("setting", [None, "libcrypto"])
def test_each_engine_is_the_expected_one_and_equals_the_reference(setting):
    """A process without XEN_VTPM_SHA256 runs the lanes wherever the CPU has SHA-NI; forced to
    libcrypto it runs libcrypto; both give the reference's results for every API."""
    env = {k: v for k, v in os.environ.items() if k != "XEN_VTPM_SHA256"}
    if setting:
        env["XEN_VTPM_SHA256"] = setting
    out = _run_python(_ENGINE_PROBE, __file__, env=env)
    assert out.returncode == 0, out.stderr
    engine, results = out.stdout.splitlines()
    assert engine == _expected_engine(setting)
    assert json.loads(results) == json.loads(_hex(_reference_results()))


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
    c_table = ffi.new("uint64_t[256]")
    assert lib.xv_gear_table(c_table) == lib.XV_OK
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
            "memoryview-8-threads": H.tree_hash(memoryview(data), leaf, threads=8),
            "file": H.tree_hash(f, leaf),
            "file-str-1-thread": H.tree_hash(str(f), leaf, threads=1),
            "py-stream": ref_stream.digest(),
            "c-stream": c_stream.digest(),
        }
        assert got == dict.fromkeys(got, expect), n


# Large enough that the C code really starts `threads` workers (it starts one per 512 KiB and per
# block): several mapping windows and worker blocks, and a partial last block.
TREE_CASES = [((3 << 20) + 5, 1 << 20), (4 << 20, 1 << 20), ((6 << 20) + 3, 4096), ((19 << 20) + 3, 64 << 10)]


@functools.cache
def _tree_case(n: int, leaf: int) -> tuple[bytes, bytes]:
    data = _rand(n, 7)
    return data, H.py_tree_hash(data, leaf)


@pytest.mark.parametrize("threads", THREADS)
def test_tree_hash_equals_reference_at_any_thread_count(tmp_path, threads):
    for n, leaf in TREE_CASES:
        data, expect = _tree_case(n, leaf)
        f = tmp_path / "img"
        f.write_bytes(data)
        s = H.StreamTreeHash(leaf, threads=threads)
        for i in range(0, n, 300_001):
            s.update(data[i:i + 300_001])
        got = [H.tree_hash(data, leaf, threads=threads), H.tree_hash(f, leaf, threads=threads), s.digest()]
        assert got == [expect] * 3, (n, leaf)


def test_default_leaf_and_stream_digest_is_final():
    s = H.StreamTreeHash()
    s.update(b"abc")
    assert s.digest() == s.digest() == H.tree_hash(b"abc") == H.py_tree_hash(b"abc", 1 << 20)
    with pytest.raises(ValueError, match="already finished"):
        s.update(b"more")


# --------------------------------------------------------------------------- streams vs reference

def _c_chunks(pieces: list[bytes], sizes=SMALL, threads=None) -> list[H.Chunk]:
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


@functools.cache
def _stream_case() -> tuple[bytes, tuple[int, int, int], list[H.Chunk], bytes]:
    """1 MiB (low entropy, then random) with its reference chunks and 4 KiB-leaf root."""
    data = _low_entropy(384 << 10, 21) + _rand(640 << 10, 21)
    sizes = (256, 1024, 4096)
    return data, sizes, _py_chunks(data, sizes), H.py_tree_hash(data, 4096)


@pytest.mark.parametrize("threads", THREADS)
def test_every_stream_api_equals_reference_at_any_thread_count(tmp_path, threads):
    data, sizes, ref, root = _stream_case()
    pieces = _splits(data, random.Random(threads))
    assert _c_chunks(pieces, sizes, threads) == ref

    both = H.ChunkAndTree(4096, *sizes, threads=threads)
    got = []
    for p in pieces:
        got += both.feed(p)
    assert got + both.finish() == ref and both.digest() == root

    stream = H.StreamTreeHash(4096, threads=threads)
    for p in pieces:
        stream.update(p)
    assert stream.digest() == root

    f = tmp_path / "stream"
    f.write_bytes(data)
    with open(f, "rb") as fh:
        assert list(H.Chunker(*sizes, threads=threads).consume(fh)) == ref
    both = H.ChunkAndTree(4096, *sizes, threads=threads)
    with open(f, "rb") as fh:
        assert list(both.consume(fh.fileno())) == ref and both.digest() == root


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.one_of(st.binary(max_size=12_000),
                      st.builds(lambda n, s: _low_entropy(n, s), st.integers(0, 12_000), st.integers(0, 99)),
                      st.builds(lambda n, s: _rand(n, s), st.integers(0, 12_000), st.integers(0, 99))),
       seed=st.integers(0, 2**32), threads=st.sampled_from(THREADS))
def test_chunker_equals_reference_for_any_split(data, seed, threads):
    pieces = _splits(data, random.Random(seed))
    ref = _py_chunks(data)
    assert _c_chunks(pieces, threads=threads) == ref
    _check_chunk_invariants(ref, data, SMALL)


@pytest.mark.parametrize("make", [_rand, _low_entropy])
def test_chunker_default_sizes_mib(make):
    data = make((3 << 20) + 11, 3)
    pieces = _splits(data, random.Random(1))
    sizes = (H.DEFAULT_MIN, H.DEFAULT_AVG, H.DEFAULT_MAX)
    ref = _py_chunks(data, sizes)
    assert _c_chunks(pieces, sizes) == ref
    _check_chunk_invariants(ref, data, sizes)


LONG_SIZES = (256, 1024, 4096)


@functools.cache
def _long_stream() -> tuple[bytes, list[H.Chunk]]:
    data = _low_entropy(10 << 20, 4) + _rand(10 << 20, 4)
    return data, _c_chunks([data], LONG_SIZES, threads=1)


@pytest.mark.parametrize("threads", [2, 4, 8])
def test_chunker_long_stream_any_split_any_threads(threads):
    """20 MiB with small chunks: the engine cycles its buffers many times; results stay identical."""
    data, whole = _long_stream()
    rng = random.Random(threads)
    pieces, pos = [], 0
    while pos < len(data):
        n = rng.choice([1, 100, 4096, 65536, 1 << 20, 3 << 20])
        pieces.append(data[pos:pos + n])
        pos += n
    assert _c_chunks(pieces, LONG_SIZES, threads=threads) == whole
    _check_chunk_invariants(whole, data, LONG_SIZES)
    ref = H.PyChunker(*LONG_SIZES)        # spot-check boundaries against the reference cut function
    for i in rng.sample(range(len(whole) - 1), 40) + [len(whole) - 1]:
        c = whole[i]
        assert ref.cut(data[c.offset:c.offset + LONG_SIZES[2]], final=i == len(whole) - 1) == c.length


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
    assert chunks == _c_chunks([data], (2048, 8192, 32768))
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
    a = _c_chunks([base], sizes)
    b = _c_chunks([edited], sizes)
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
    a = _c_chunks([bytes(base)], sizes)
    b = _c_chunks([bytes(edited)], sizes)
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


@pytest.mark.parametrize("threads", [0, -1, 1025, 1 << 40, 2.0, "4", True])
def test_bad_threads(threads):
    for call in (lambda: H.tree_hash(b"x", threads=threads), lambda: H.Chunker(threads=threads),
                 lambda: H.StreamTreeHash(threads=threads), lambda: H.ChunkAndTree(threads=threads)):
        with pytest.raises(ValueError, match="threads .*from 1 to 1024"):
            call()


def test_use_after_finish_and_digest_before_it():
    c = H.Chunker()
    c.finish()
    for call in (lambda: c.feed(b"x"), c.finish, lambda: list(c.consume(0))):
        with pytest.raises(ValueError, match="already finished"):
            call()
    both = H.ChunkAndTree()
    both.feed(b"x" * 100)
    with pytest.raises(ValueError, match="call finish"):
        both.digest()
    assert both.finish()[0].data == b"x" * 100 and both.digest() == H.tree_hash(b"x" * 100)


def test_sha256_many_rejects_a_bad_prefix():
    for prefix in (256, -1, 1.0):
        with pytest.raises(ValueError, match="prefix"):
            H.sha256_many([b"x"], prefix)


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
        for threads in THREADS:
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


# --------------------------------------------------------------------------- every C status

def test_c_entry_points_refuse_bad_arguments():
    """Defence in depth: the C side checks what the Python face already checked, and says so."""
    out, one = ffi.new("unsigned char[32]"), ffi.from_buffer(b"x")
    bad_tree = [(one, 1, 100, 1, out), (one, 1, 1 << 27, 1, out), (one, 1, 4096, 0, out),
                (ffi.NULL, 1, 4096, 1, out), (one, 1, 4096, 1, ffi.NULL)]
    assert [lib.xv_tree_hash_buf(*a) for a in bad_tree] == [lib.XV_EINVAL] * len(bad_tree)
    assert lib.xv_tree_hash_fd(-1, 1, 4096, 1, out, ffi.NULL) == lib.XV_EINVAL
    assert bytes(out) == bytes(32)                               # no result on failure

    made = ffi.new("xv_stream **")
    bad_streams = [(0, 0, 0, 0, 0, 4096, 0), (1, 64, 300, 1024, 0, 0, 0), (1, 64, 256, 1 << 27, 0, 0, 0),
                   (0, 0, 0, 0, 1, 100, 0), (1, 64, 256, 1024, 0, 0, -1)]
    for args in bad_streams:
        assert lib.xv_stream_new(*args, made) == lib.XV_EINVAL and made[0] == ffi.NULL, args
    assert lib.xv_stream_new(1, 64, 256, 1024, 0, 0, 0, ffi.NULL) == lib.XV_EINVAL

    ptrs, lens = ffi.new("const unsigned char *[]", [one]), ffi.new("size_t[]", [1])
    for prefix in (256, -2):
        assert lib.xv_sha256_batch(1, ptrs, lens, prefix, out) == lib.XV_EINVAL
    assert lib.xv_sha256_batch(1, ffi.NULL, lens, -1, out) == lib.XV_EINVAL
    assert lib.xv_sha256_batch(0, ffi.NULL, ffi.NULL, -1, ffi.NULL) == lib.XV_OK     # nothing to do
    assert lib.xv_sha256_engine(ffi.NULL) == lib.xv_gear_table(ffi.NULL) == lib.XV_EINVAL
    with pytest.raises(HashEngineError, match=r"^thing: the C engine refused .*this is a bug, please report it$"):
        check(lib.XV_EINVAL, "thing")
    with pytest.raises(HashEngineError, match="unknown status 99"):
        check(99, "thing")


def test_c_stream_states():
    made, out32 = ffi.new("xv_stream **"), ffi.new("unsigned char[32]")
    assert lib.xv_stream_new(1, 64, 256, 1024, 1, 4096, 1, made) == lib.XV_OK
    s = ffi.gc(made[0], lib.xv_stream_free)
    cap, buf, got, n_out = ffi.new("size_t *"), ffi.new("unsigned char **"), ffi.new("size_t *"), ffi.new("size_t *")
    assert lib.xv_stream_max_out(s, cap) == lib.XV_OK and cap[0] > 0
    chunks = ffi.new("xv_chunk[]", cap[0])
    assert lib.xv_stream_root(s, out32) == lib.XV_ESTATE                        # not finished yet
    assert lib.xv_stream_space(s, 5000, buf, got) == lib.XV_OK and got[0] == 5000
    assert lib.xv_stream_commit(s, 1 << 30, 0, chunks, n_out) == lib.XV_EINVAL  # more than lent
    ffi.memmove(buf[0], _rand(5000, 3), 5000)
    assert lib.xv_stream_commit(s, 5000, 1, chunks, n_out) == lib.XV_OK
    got_chunks = [bytes(ffi.buffer(chunks[i].data, chunks[i].length)) for i in range(n_out[0])]
    assert b"".join(got_chunks) == _rand(5000, 3)
    assert lib.xv_stream_root(s, out32) == lib.XV_OK and bytes(out32) == H.py_tree_hash(_rand(5000, 3), 4096)
    assert lib.xv_stream_space(s, 1, buf, got) == lib.XV_ESTATE and buf[0] == ffi.NULL and got[0] == 0
    assert lib.xv_stream_commit(s, 0, 1, chunks, n_out) == lib.XV_ESTATE
    assert lib.xv_stream_new(1, 64, 256, 1024, 0, 0, 0, made) == lib.XV_OK   # chunks only: no root
    chunker = ffi.gc(made[0], lib.xv_stream_free)
    assert lib.xv_stream_commit(chunker, 0, 1, chunks, n_out) == lib.XV_OK and n_out[0] == 0
    assert lib.xv_stream_root(chunker, out32) == lib.XV_ESTATE


def test_unmappable_file_is_a_hash_source_error(tmp_path):
    f = tmp_path / "img"
    f.write_bytes(b"x" * 10000)
    fd = os.open(f, os.O_WRONLY)              # mmap(PROT_READ) of a write-only fd: EACCES
    try:
        out, err = ffi.new("unsigned char[32]"), ffi.new("int *")
        rc = lib.xv_tree_hash_fd(fd, 10000, 4096, 2, out, err)
    finally:
        os.close(fd)
    assert (rc, err[0]) == (lib.XV_EIO, errno.EACCES)
    with pytest.raises(HashSourceError, match=r"^.*/img: cannot map it \(Permission denied\); check the file$"):
        check(rc, str(f), err[0])


_OUT_OF_MEMORY = """
import resource
from xen_vtpm import hashing as H
with open("/proc/self/status") as f:
    vm = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize"))
resource.setrlimit(resource.RLIMIT_AS, (vm + (96 << 20), resource.RLIM_INFINITY))
for make in (lambda: H.Chunker(1024, 1 << 20, 64 << 20, threads=1), lambda: H.StreamTreeHash(64 << 20, threads=1)):
    try:
        make()
        print("no error")
    except MemoryError as e:
        print(e)
print(len(H.Chunker(threads=1).feed(bytes(300_000))))     # smaller streams still work
"""


def test_out_of_memory_is_a_memory_error_naming_the_stream():
    """Each stream's two buffers are 130 MiB here; an address-space limit makes malloc fail."""
    out = _run_python(_OUT_OF_MEMORY)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [
        "Chunker: out of memory while hashing; free memory or pass fewer threads",
        "StreamTreeHash: out of memory while hashing; free memory or pass fewer threads",
        "1"]


_NO_SHA256 = """
from xen_vtpm import hashing as H
from xen_vtpm._hashing import ffi, lib
from xen_vtpm.errors import HashEngineError
assert lib.xv_gear_table(ffi.new("uint64_t[256]")) == lib.XV_ECRYPTO
for call in (lambda: H.tree_hash(b"x"), lambda: H.sha256_many([b"x"]), H.Chunker, H.StreamTreeHash,
             H.ChunkAndTree):
    try:
        call()
        print("no error")
    except HashEngineError as e:
        print(type(e).__name__, e)
"""


def test_libcrypto_without_sha256_is_a_hash_engine_error(tmp_path):
    """OpenSSL configured with only the null provider cannot fetch SHA-256: every API says so (the
    gear table, too, instead of handing out zeros)."""
    cnf = tmp_path / "openssl.cnf"
    cnf.write_text("openssl_conf = init\n[init]\nproviders = providers\n[providers]\nnull = null\n"
                   "[null]\nactivate = 1\n")
    out = _run_python(_NO_SHA256, env={**os.environ, "OPENSSL_CONF": str(cnf)})
    assert out.returncode == 0, out.stderr
    labels = ["tree_hash of a buffer", "sha256_many", "Chunker", "StreamTreeHash", "ChunkAndTree"]
    assert out.stdout.splitlines() == [
        f"HashEngineError {label}: libcrypto cannot compute SHA-256; check the OpenSSL configuration "
        "(OPENSSL_CONF and its providers)" for label in labels]


# --------------------------------------------------------------------------- threads, mappings, lanes

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


def test_sha256_many_accepts_views():
    data = bytearray(random.Random(3).randbytes(5000))
    views = [memoryview(data)[i:i + 700] for i in range(0, 5000, 700)]
    assert H.sha256_many(views) == [hashlib.sha256(v).digest() for v in views]


# --------------------------------------------------------------------------- the C header

def test_public_header_is_self_contained_and_include_guarded(tmp_path):
    """cext/hashing.h compiles on its own, twice in a row, as C and as C++."""
    src = tmp_path / "use.c"
    src.write_text('#include "hashing.h"\n#include "hashing.h"\n'
                   "int main(void) { xv_chunk c; (void)c; return XV_OK; }\n")
    for compiler in (["gcc", "-std=c99", "-pedantic"], ["g++", "-x", "c++"]):
        out = subprocess.run([*compiler, "-Wall", "-Wextra", "-Werror", "-fsyntax-only",
                              f"-I{ROOT / 'cext'}", str(src)], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr


# --------------------------------------------------------------------------- sanitizers

SANITIZE = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all"]

# Loaded first by the child interpreter (PYTHONPATH): the sanitized build stands in for xen_vtpm._hashing.
_LOADER = """
import importlib.util, os, sys
spec = importlib.util.spec_from_file_location("xen_vtpm._hashing", os.environ["XV_SANITIZED_EXTENSION"])
module = importlib.util.module_from_spec(spec)
sys.modules["xen_vtpm._hashing"] = module
spec.loader.exec_module(module)
"""

# One byte too few for 32 digests, in a block big enough that malloc (not pymalloc) holds it.
_CANARY = """
import xen_vtpm._hashing as m
print(m.__file__, flush=True)
msgs = [m.ffi.from_buffer(bytes(10))] * 32
m.lib.xv_sha256_batch(32, m.ffi.new("const unsigned char *[]", msgs), m.ffi.new("size_t[]", [10] * 32), -1,
                      m.ffi.new("unsigned char[]", 32 * 32 - 1))
"""


def _sanitized_build(tmp_path: Path) -> str:
    spec = importlib.util.spec_from_file_location("build_hashing", ROOT / "cext" / "build_hashing.py")
    build = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build)
    ffi_build = build.make_ffi([*SANITIZE, "-O1", "-g", "-fno-omit-frame-pointer"], SANITIZE)
    return ffi_build.compile(tmpdir=str(tmp_path / "build"))


# Per engine, the tests that reach C code: all of them over the lanes (less the slowest, whose C paths
# others cover), and those that hash through libcrypto, the only code the other engine changes.
_SANITIZED_RUNS = {
    None: "not sanitizers and not file_shrinking and not each_engine and not default_sizes and not header "
          "and not test_bad",
    "libcrypto": "equals_reference or sha256_many or c_stream or c_entry or out_of_memory",
}


def test_the_c_engine_under_address_and_undefined_behaviour_sanitizers(tmp_path):
    """Builds the extension with ASan and UBSan and runs this file's tests over it, once per engine:
    any out-of-bounds access, use after free or undefined behaviour aborts the run."""
    libasan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True).stdout.strip()
    assert os.path.isabs(libasan), "gcc has no libasan: install build-essential (gcc's sanitizer runtimes)"
    so = _sanitized_build(tmp_path)
    (tmp_path / "site").mkdir()
    (tmp_path / "site" / "sitecustomize.py").write_text(_LOADER)
    env = {**os.environ, "XV_SANITIZED_EXTENSION": so, "LD_PRELOAD": libasan,
           "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), str(ROOT)]),
           "ASAN_OPTIONS": "detect_leaks=0:allocator_may_return_null=1", "UBSAN_OPTIONS": "print_stacktrace=1"}
    env.pop("XEN_VTPM_SHA256", None)

    canary = _run_python(_CANARY, env=env)   # proves the build is the one loaded and is checked
    assert canary.stdout.split() == [so] and "AddressSanitizer: heap-buffer-overflow" in canary.stderr

    runs = {}
    for setting, select in _SANITIZED_RUNS.items():     # side by side: one per core
        run_env = {**env, "XEN_VTPM_SHA256": setting} if setting else env
        runs[setting] = subprocess.Popen(
            [sys.executable, "-m", "pytest", __file__, "-q", "-x", "-p", "no:cacheprovider", "-k", select],
            env=run_env, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for setting, proc in runs.items():
        out, err = proc.communicate(timeout=300)
        report = f"XEN_VTPM_SHA256={setting}:\n{out[-4000:]}{err[-4000:]}"
        assert proc.returncode == 0 and " passed" in out, report
        assert "Sanitizer" not in err and "runtime error" not in err, report
