"""Every file the tool publishes is on disk, name included, before it reports success.

Read off a real syscall trace (strace) of a real `xen-vtpm init` on a swtpm and of real store
operations; the checker is in durability_trace.py.  Each check names the file and the missing
step.  The negative controls remove one step from a real trace and require the checker to name
it, so a check that passes is a check that could have failed.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
from durability_trace import SYNCS, Call, parse, publish_problems, run_traced, sqlite_problems, stdout_marker, without
from tpm_fixture import fresh_cache, make_cfg, swtpm_session  # noqa: F401

from xen_vtpm.host import session

# A store session in its own process: two checkpoints, then a delete that compacts (A = P+Q in one
# pack, B = P+R: deleting A leaves A's pack a quarter live), each step reported on stdout.
STORE_OPS = """
import random, sys
from pathlib import Path
from xen_vtpm.host.keys import derive_keys
from xen_vtpm.store import Repository
rnd = random.Random(5)
p, q, r = rnd.randbytes(256 << 10), rnd.randbytes(768 << 10), rnd.randbytes(256 << 10)
with Repository(Path(sys.argv[1]), derive_keys(b"k" * 32), pack_target=4 << 20) as repo:
    for name, data in (("a", p + q), ("b", p + r)):
        with repo.begin_checkpoint("vm-1", "guest1", name=name, checkpoint_id=name) as w:
            w.add_stream("memory", [data])
            w.add_blob("vtpm-image", rnd.randbytes(3000))
            w.set_metadata(b"{}")
            w.commit()
        print(f"committed {name}", flush=True)
    repo.delete("a")
    print("deleted a", flush=True)
"""


def _renamed_onto(calls: list[Call], suffix: str) -> list[str]:
    return sorted({c.paths[-1] for c in calls if c.name.startswith("rename") and c.ok and c.paths[-1].endswith(suffix)})


def _next_report(calls: list[Call], path: str, reports: list[int]) -> int:
    """The first success report after ``path`` got its final name."""
    renamed = max(c.end for c in calls if c.name.startswith("rename") and c.ok and c.paths[-1] == path)
    return min(r for r in reports if r > renamed)


@pytest.fixture(scope="module")
def store_trace(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Call], list[int]]:
    base = tmp_path_factory.mktemp("durable-store")
    state = base / "state"
    result, calls = run_traced([sys.executable, "-c", STORE_OPS, str(state)], base / "trace")
    assert result.returncode == 0, result.stderr[-2000:]
    reports = [stdout_marker(calls, text) for text in ("committed a", "committed b", "deleted a")]
    return state, calls, reports


@pytest.fixture(scope="module")
def init_trace(tmp_path_factory: pytest.TempPathFactory, swtpm_session) -> tuple[Path, Path, list[Call], int]:
    """`xen-vtpm init` laid out as on a host: the config in its own directory (etc/), the state dir
    created by init under an existing var/lib/, the config rewritten because keys are missing."""
    base = tmp_path_factory.mktemp("durable-init")
    cfg = make_cfg(base, swtpm_session.tcti)
    (base / "etc").mkdir()
    (base / "var" / "lib").mkdir(parents=True)
    state, conf = base / "var" / "lib" / "xen-vtpm", base / "etc" / "xen-vtpm.conf"
    conf.write_text(f"[xen-vtpm]\nstate_dir = {state}\ntcti = {cfg.tcti}\ncounter_index = {cfg.counter_index:#x}\n")
    session.close_all()   # the swtpm serves one client at a time
    result, calls = run_traced([sys.executable, "-m", "xen_vtpm", "--config", str(conf), "init"], base / "trace")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "provisioned" in result.stdout and (state / "sealed" / "hostkey.json").is_file()
    return state, conf, calls, stdout_marker(calls, "provisioned")


# --- `xen-vtpm init`: sealed host key, config, catalog head ---------------------------------------

def test_init_publishes_the_sealed_host_key_durably(init_trace):
    state, _, calls, success = init_trace
    assert publish_problems(calls, state / "sealed" / "hostkey.json", success) == []


def test_init_publishes_the_config_durably(init_trace):
    _, conf, calls, success = init_trace
    assert publish_problems(calls, conf, success) == []


def test_init_commits_the_catalog_head_durably(init_trace):
    state, _, calls, success = init_trace
    db = str(state / "catalog.sqlite")
    assert any(c.name in ("open", "openat") and c.created and c.paths == (db,) for c in calls)
    assert sqlite_problems(calls, state / "catalog.sqlite", success) == []


# --- store: packs (their index is inside them), manifests, catalog ---------------------------------

def test_store_publishes_packs_and_manifests_durably(store_trace):
    state, calls, reports = store_trace
    packs, manifests = _renamed_onto(calls, ".pack"), _renamed_onto(calls, ".manifest")
    assert manifests == [str(state / "manifests" / "a.manifest"), str(state / "manifests" / "b.manifest")]
    compacted = [p for p in packs if _next_report(calls, p, reports) == reports[2]]
    assert len(packs) >= 3 and len(compacted) == 1 and Path(compacted[0]).exists()   # compaction really ran
    for path in packs + manifests:
        assert publish_problems(calls, Path(path), _next_report(calls, path, reports)) == [], path


def test_store_commits_its_catalog_durably(store_trace):
    state, calls, reports = store_trace
    for report in reports:
        assert sqlite_problems(calls, state / "catalog.sqlite", report) == []


# --- negative controls: the same real traces, one step removed ------------------------------------

def test_checker_names_a_missing_directory_fsync_after_the_rename(init_trace):
    state, conf, calls, success = init_trace
    sealed = str(state / "sealed")
    key_dir_synced = [c for c in calls if c.name in SYNCS and c.fd_path == sealed]
    assert key_dir_synced
    assert publish_problems(without(calls, lambda c: c in key_dir_synced), state / "sealed" / "hostkey.json",
                            success) == [f"{state}/sealed/hostkey.json: missing step fsync({sealed}) after "
                                         f"rename({sealed}/hostkey.json.new -> {sealed}/hostkey.json)"]
    etc = str(conf.parent)
    assert publish_problems(without(calls, lambda c: c.name in SYNCS and c.fd_path == etc), conf, success) == \
        [f"{conf}: missing step fsync({etc}) after rename({conf}.tmp -> {conf})"]


def test_checker_names_a_missing_file_fsync(store_trace):
    state, calls, reports = store_trace
    manifest = state / "manifests" / "a.manifest"
    tmp = f"{manifest}.tmp"
    problems = publish_problems(without(calls, lambda c: c.name in SYNCS and c.fd_path == tmp), manifest,
                                reports[0])
    assert problems == [f"{manifest}: missing step fsync({tmp}) between its last write and the rename"]
    pack = _renamed_onto(calls, ".pack")[0]
    problems = publish_problems(without(calls, lambda c: c.name in SYNCS and c.fd_path == pack + ".tmp"),
                                Path(pack), _next_report(calls, pack, reports))
    assert problems == [f"{pack}: missing step fsync({pack}.tmp) between its last write and the rename"]


def test_checker_names_a_new_directory_left_out_of_its_parent(init_trace, store_trace):
    state, _, calls, success = init_trace
    lib = str(state.parent)
    assert publish_problems(without(calls, lambda c: c.name in SYNCS and c.fd_path == lib),
                            state / "sealed" / "hostkey.json", success) == \
        [f"{state}/sealed/hostkey.json: missing step fsync({lib}) after mkdir({state}) (the new directory's entry "
         "can vanish, and the file with it)"]
    state, calls, reports = store_trace
    packs = str(state / "packs")
    pack = _renamed_onto(calls, ".pack")[0]
    assert publish_problems(without(calls, lambda c: c.name in SYNCS and c.fd_path == str(state)), Path(pack),
                            _next_report(calls, pack, reports)) == \
        [f"{pack}: missing step fsync({state}) after mkdir({packs}) (the new directory's entry can vanish, and the "
         "file with it)"]


def test_checker_names_sqlite_steps(store_trace, init_trace):
    state, calls, reports = store_trace
    db, parent = state / "catalog.sqlite", str(state)
    wal = str(db) + "-wal"
    wal_dir_sync = next(c for c in calls if c.name in SYNCS and c.fd_path == parent and c.start > next(
        o.end for o in calls if o.name in ("open", "openat") and o.paths == (wal,)))
    assert f"{db}: missing step fsync({parent}) after catalog.sqlite-wal was created" in \
        sqlite_problems(without(calls, lambda c: c is wal_dir_sync), db, reports[0])
    assert f"{db}: missing step fsync({wal}) after a write to it" in \
        sqlite_problems(without(calls, lambda c: c.name in SYNCS and c.fd_path == wal), db, reports[0])


def test_checker_names_an_unsynced_rollback_journal_commit(tmp_path):
    # SQLite's default journal mode with the project's synchronous=FULL: the commit is the
    # journal's unlink, and FULL does not fsync the directory after it.
    script = ("import sqlite3, sys\nc = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
              "c.execute('PRAGMA synchronous=FULL')\nc.execute('CREATE TABLE t (x)')\nprint('done', flush=True)\n")
    db = tmp_path / "d.sqlite"
    result, calls = run_traced([sys.executable, "-c", script, str(db)], tmp_path / "trace")
    assert result.returncode == 0, result.stderr
    assert sqlite_problems(calls, db, stdout_marker(calls, "done")) == \
        [f"{db}: missing step fsync({tmp_path}) after the unlink of its rollback journal (the commit; the journal "
         "can come back and roll it back)"]


def test_parser_joins_interrupted_calls_and_reads_fd_paths():
    trace = ('7 write(5</s/p.tmp>, "ab"..., 2) = 2\n'
             '8 fsync(5</s/p.tmp> <unfinished ...>\n'
             '7 rename("/s/p.tmp", "/s/p") = 0\n'
             '8 <... fsync resumed>) = 0\n'
             '7 fdatasync(3</s>) = 0\n'
             '7 write(1<pipe:[9]>, "ok\\n", 3) = 3\n')
    calls = parse(trace)
    fsync = next(c for c in calls if c.name == "fsync")
    assert (fsync.start, fsync.end, fsync.fd_path) == (1, 3, "/s/p.tmp")
    success = stdout_marker(calls, "ok")
    # The fsync had not returned when the rename started: the order is not established.
    assert publish_problems(calls, Path("/s/p"), success) == \
        ["/s/p: missing step fsync(/s/p.tmp) between its last write and the rename"]
    ordered = parse(trace.replace("8 fsync(5</s/p.tmp> <unfinished ...>\n", "8 fsync(5</s/p.tmp>) = 0\n")
                    .replace("8 <... fsync resumed>) = 0\n", ""))
    assert publish_problems(ordered, Path("/s/p"), stdout_marker(ordered, "ok")) == []

