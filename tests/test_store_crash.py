"""Crash safety: SIGKILL a writer or deleter at each journaled step, then recover and verify.

The child process runs the real store code with a test hook installed (``xen_vtpm.faults``) that
SIGKILLs it at the named step (docs/formats.md, "Checkpoint store" §4).  A second variant kills a writer while
it is blocked
reading its input pipe after N bytes.
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from test_store_helpers import (
    guest_memory,
    open_repo,
    randbytes,
    read_all,
    rewrite_pages,
    store_files,
    write_checkpoint,
)

from xen_vtpm.errors import IntegrityError

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent

CHILD = r"""
import sys
sys.path[:0] = [sys.argv[1], sys.argv[2]]
import os, signal
from pathlib import Path
from test_store_helpers import open_repo, guest_memory, randbytes, rewrite_pages, write_checkpoint
from xen_vtpm import faults
from xen_vtpm.errors import XenVtpmError
state, op, arg, crash_at = Path(sys.argv[3]), sys.argv[4], sys.argv[5], sys.argv[7]
if crash_at:
    faults.install(lambda name: name == "store:" + crash_at and os.kill(os.getpid(), signal.SIGKILL))
try:
    repo = open_repo(state, pack_target=int(sys.argv[6]))
    if op == "write":
        print(write_checkpoint(repo, guest_memory(int(arg), seed=77), name="new"), flush=True)
    elif op == "write-delta":   # B's memory with 5% of its pages rewritten: delta chunks against B
        data = rewrite_pages(guest_memory(1 << 20, seed=61) + randbytes(1 << 20, seed=63), 0.05, seed=78)
        print(write_checkpoint(repo, data, name="new"), flush=True)
    elif op == "write-stdin":
        with repo.begin_checkpoint("vm-1", "guest1", name="piped") as w:
            w.add_stream("memory", sys.stdin.buffer)
            w.commit()
    elif op == "delete":
        print(repo.delete(arg), flush=True)
except XenVtpmError as exc:
    print(f"{type(exc).__name__}: {exc}", flush=True)
    sys.exit(exc.exit_code)
"""

P = guest_memory(1 << 20, seed=61)
Q = randbytes(3 << 20, seed=62)
R = randbytes(1 << 20, seed=63)


_children: list[subprocess.Popen] = []


@pytest.fixture(autouse=True)
def reap_children():
    """Every child is gone after its test, pass or fail."""
    yield
    while _children:
        proc = _children.pop()
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def child(state: Path, op: str, arg: str, *, crash_at: str | None = None, pack_target: int = 8 << 20,
          stdin=None, preexec=None) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", CHILD, str(TESTS), str(ROOT), str(state), op, arg,
                             str(pack_target), crash_at or ""], stdin=stdin, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, preexec_fn=preexec)
    _children.append(proc)
    return proc


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """Checkpoint A = P+Q in one pack, B = P+R: deleting A leaves A's pack 25% live, so it is compacted."""
    state = tmp_path_factory.mktemp("crash") / "state"
    repo = open_repo(state, pack_target=8 << 20)
    ids = write_checkpoint(repo, P + Q, name="a"), write_checkpoint(repo, P + R, name="b")
    repo.close()
    return state, ids


@pytest.fixture
def store(pristine, tmp_path):
    src, ids = pristine
    state = tmp_path / "state"
    shutil.copytree(src, state)
    return state, ids


def consistent(state: Path) -> list[str]:
    """Recover, then prove the store is consistent: every checkpoint verifies, nothing is orphaned."""
    with open_repo(state) as repo:
        repo.recover()
        assert repo.catalog.journal_entries() == []
        packs = {f"packs/{n}.pack" for (n,) in repo.catalog.query("SELECT name FROM packs")}
        ids = [r["id"] for r in repo.list_checkpoints()]
        assert store_files(state) == packs | {f"manifests/{i}.manifest" for i in ids}
        assert not [p for p in (state / "store-locks").iterdir() if p.name != "store.lock"]
        # refcount = references + delta chunks using it as a base; nothing unused is kept.
        assert repo.catalog.query("SELECT count(*) FROM chunks c WHERE refcount != "
                                  "(SELECT count(*) FROM refs r WHERE r.chunk = c.id) "
                                  "+ (SELECT count(*) FROM deps d WHERE d.base = c.id)") == [(0,)]
        assert repo.catalog.query("SELECT count(*) FROM chunks WHERE id NOT IN (SELECT chunk FROM refs) "
                                  "AND id NOT IN (SELECT base FROM deps)") == [(0,)]
        for i in ids:
            assert repo.verify(i)["status"] == "ok"
        return ids


# Every crash point of a write, and whether the checkpoint is committed when the process dies there.
WRITE_POINTS = pytest.mark.parametrize("point, committed", [
    ("write.journaled", False),
    ("write.pack-published", False),
    ("write.manifest-published", False),
    ("write.committed", True),
])


@WRITE_POINTS
def test_kill_during_write(store, point, committed):
    state, (a, b) = store
    proc = child(state, "write", str(5 << 20), crash_at=point, pack_target=1 << 20)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ids = consistent(state)
    assert (len(ids) == 3) == committed and {a, b} <= set(ids)
    with open_repo(state) as repo:
        assert read_all(repo, b) == P + R
        names = {r["name"] for r in repo.list_checkpoints()}
    if committed:
        with open_repo(state) as repo:
            new = repo.resolve("new", vm_uuid="vm-1")["id"]
            assert read_all(repo, new) == guest_memory(5 << 20, seed=77)
    else:
        assert "new" not in names


# --- delta chunks: a checkpoint C = B with 5% of its pages rewritten is mostly deltas against B ---
# (the child's "write-delta" builds the same bytes)
DELTA = rewrite_pages(P + R, 0.05, seed=78)


def _deltas(state: Path) -> int:
    with open_repo(state) as repo:
        return repo.catalog.query("SELECT count(*) FROM chunks WHERE delta != 0")[0][0]


@WRITE_POINTS
def test_kill_during_delta_write(store, point, committed):
    state, (a, b) = store
    before = _deltas(state)   # B's chunk straddling P|R is already a delta against A's P|Q
    proc = child(state, "write-delta", "", crash_at=point, pack_target=1 << 20)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    ids = consistent(state)
    assert (len(ids) == 3) == committed and (_deltas(state) > before + 5) == committed
    if committed:
        with open_repo(state) as repo:
            assert read_all(repo, repo.resolve("new", vm_uuid="vm-1")["id"]) == DELTA


@pytest.fixture
def delta_store(store):
    state, (a, b) = store
    before = _deltas(state)
    with open_repo(state, pack_target=1 << 20) as repo:
        c = write_checkpoint(repo, DELTA, name="c")
    assert _deltas(state) > before + 5
    return state, (a, b, c)


@pytest.mark.parametrize("victim, point", [
    ("a", "delete.committed"), ("a", "delete.unlinked-one"),          # A's pack holds bases of C: compacted
    ("a", "compact.pack-published"), ("a", "compact.committed"),
    ("b", "delete.committed"), ("b", "delete.unlinked-one"),          # C's parent
    ("c", "delete.committed"), ("c", "delete.unlinked-one"),          # the deltas release their bases
])
def test_kill_during_delete_with_delta_chunks(delta_store, victim, point):
    state, ids = delta_store
    data = dict(zip("abc", (P + Q, P + R, DELTA)))
    proc = child(state, "delete", ids["abc".index(victim)], crash_at=point)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    left = [i for n, i in zip("abc", ids) if n != victim]
    assert sorted(consistent(state)) == sorted(left)
    with open_repo(state) as repo:
        for n, i in zip("abc", ids):
            if n != victim:
                assert read_all(repo, i) == data[n]


@pytest.mark.parametrize("point", ["delete.committed", "delete.unlinked-one",
                                   "compact.pack-published", "compact.committed"])
def test_kill_during_delete(store, point):
    state, (a, b) = store
    proc = child(state, "delete", a, crash_at=point)
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL     # the step was reached: compaction really ran
    assert consistent(state) == [b]
    with open_repo(state) as repo:
        assert read_all(repo, b) == P + R


def test_delete_runs_to_completion_without_crash(store):
    state, (a, b) = store
    proc = child(state, "delete", a)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert int(out) >= len(Q) * 0.9
    assert consistent(state) == [b]


@pytest.mark.parametrize("after", [0, 300_000, 3 << 20])
def test_kill_writer_blocked_on_its_input_after_n_bytes(store, after):
    state, (a, b) = store
    proc = child(state, "write-stdin", "", stdin=subprocess.PIPE, pack_target=1 << 20)
    proc.stdin.write(guest_memory(after, seed=5) if after else b"")
    proc.stdin.flush()
    with open_repo(state) as repo:
        # Wait until the writer has journaled its files (for 3 MiB: published packs), then check that
        # recover leaves a live writer alone, and kill it while it waits for more input.
        want = 4 if after >= 3 << 20 else 0   # the writer reads whole 1 MiB blocks
        deadline = time.monotonic() + 60
        while not any(len(e["payload"]["create"]) >= want for e in repo.catalog.journal_entries()):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        assert repo.recover()["undone"] == []
        assert repo.catalog.journal_entries()
    proc.kill()
    proc.communicate(timeout=60)
    assert consistent(state) == [a, b]


def test_recover_leaves_a_live_writer_alone(store):
    state, (a, b) = store
    with open_repo(state, pack_target=1 << 20) as repo, open_repo(state) as other:
        w = repo.begin_checkpoint("vm-1", "guest1", name="live")
        w.add_stream("memory", [randbytes(3 << 20, seed=9)])
        report = other.recover()
        assert report["undone"] == [] and report["orphans_removed"] == 0
        w.commit()
        assert read_all(repo, w.checkpoint_id) == randbytes(3 << 20, seed=9)
    assert len(consistent(state)) == 3


def test_disk_full_during_write_is_reported_and_leaves_store_consistent(store):
    state, (a, b) = store
    before = store_files(state)

    def small_files():
        import resource
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    proc = child(state, "write", str(6 << 20), preexec=small_files, pack_target=64 << 20)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 10, err
    line = out.decode().strip()
    assert line.startswith("DiskFull: ") and "packs" in line and "free space" in line and "\n" not in line
    assert store_files(state) == before
    assert consistent(state) == [a, b]


def test_missing_pack_of_committed_checkpoint_is_an_integrity_error(store):
    state, (a, b) = store
    with open_repo(state) as repo:
        pack = repo.catalog.query("SELECT pack FROM chunks c JOIN refs r ON r.chunk = c.id "
                                  "WHERE r.checkpoint=? LIMIT 1", (b,))[0][0]
    (state / "packs" / f"{pack}.pack").unlink()
    with open_repo(state) as repo, pytest.raises(IntegrityError, match=f"pack {pack}.*missing.*{b}"):
        repo.recover()


def test_recover_removes_orphans_but_not_foreign_files(store):
    state, (a, b) = store
    orphan = state / "packs" / ("ab" * 16 + ".pack")
    orphan.write_bytes(b"left by a crash before journaling existed")
    stale_tmp = state / "manifests" / "deadbeef.manifest.tmp"
    stale_tmp.write_bytes(b"x")
    foreign = state / "packs" / "README"
    foreign.write_text("not ours")
    with open_repo(state) as repo:
        assert repo.recover()["orphans_removed"] == 2
    assert not orphan.exists() and not stale_tmp.exists() and foreign.exists()
    foreign.unlink()
    assert consistent(state) == [a, b]


def test_altered_journal_cannot_delete_outside_the_store(store, tmp_path):
    state, (a, b) = store
    victim = tmp_path / "precious"
    victim.write_text("keep")
    with open_repo(state) as repo:
        with repo.catalog.transaction() as db:
            db.execute("INSERT INTO journal (op, checkpoint, state, lock, payload) VALUES "
                       "('write', 'x', 'open', 'nobody', ?)", ('{"create": ["packs/../../precious"]}',))
        with pytest.raises(IntegrityError, match="not a store file"):
            repo.recover()
    assert victim.read_text() == "keep"


def test_check_writable(store):
    state, _ = store
    with open_repo(state) as repo:
        repo.check_writable()
    assert consistent(state)
