"""Storage faults under a snapshot: disk full (a small tmpfs as the state dir, or a file-size limit
on the tool), an unwritable state dir (read-only bind mount), a torn write of the catalog.

Each must end in one clear line with exit 10 (storage) or 5 (integrity), the guest and its vTPM
unpaused, running and still the pair they were, the store consistent (verify passes for what
remains, nothing half-written left), and the host usable again once the fault is gone.
"""
from __future__ import annotations

import os
import secrets

import crash_helpers as ch
import fault_helpers as fh
import pytest
from crash_helpers import GUEST

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs / read-only bind needs root")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with ch.primed_host(tmp_path_factory.mktemp("stor") / "h") as sim:
        yield sim


def fill_guest_memory(sim) -> ch.Pair:
    """Random guest memory: a snapshot of it cannot be deduplicated into a few chunks."""
    path = ch.memfile(sim)
    size = path.stat().st_size
    with open(path, "r+b") as fh_:
        fh_.write(secrets.token_bytes(size))
    return ch.new_state(sim)


def after_fault(sim, cur: ch.Pair, refused: str) -> None:
    """The refused command changed nothing: same pair, running, unpaused, store verifies."""
    fh.guest_and_vtpm_running(sim)
    assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
    assert refused not in ch.checkpoint_ids(sim)


def usable_again(sim) -> None:
    cur = ch.new_state(sim)
    sim.tool("snapshot", GUEST, "--name", "after-fault")
    ch.new_state(sim)
    sim.tool("rollback", GUEST, "after-fault", "--yes", "--no-safety-checkpoint")
    assert ch.check_host(sim, {"taken": cur}) == "taken"
    sim.tool("delete", "after-fault")


def _spool_config(sim, where, spool_ram_mib: int):
    config = where / "spool.ini"
    config.write_text(sim.config.read_text().replace("spool_ram_mib = -1", f"spool_ram_mib = {spool_ram_mib}"))
    assert f"spool_ram_mib = {spool_ram_mib}" in config.read_text()
    return config


SPOOLS = pytest.mark.parametrize("spool_ram_mib", [-1, 0], ids=["memory-spool", "disk-spool"])


@SPOOLS
def test_disk_full_during_snapshot(sim, tmp_path, spool_ram_mib):
    """No room for the guest's memory in the store: with the spool in RAM the pack writes fail,
    with the spool on disk (state_dir/tmp) the spool is the first big write that fails."""
    cur = fill_guest_memory(sim)
    room = fh.state_usage(sim) + (3 << 20)          # far less than the 16 MiB of random memory
    config = _spool_config(sim, tmp_path, spool_ram_mib)
    with fh.state_on_tmpfs(sim, room) as state:
        proc = sim.tool("--config", str(config), "snapshot", GUEST, "--name", "full", check=False, timeout=120)
        err = fh.assert_one_line_error(proc, (10,), "snapshot on a full disk")
        print(f"\ndisk full: exit {proc.returncode}: {err}")
        assert "disk full" in err or "No space left" in err, err
        after_fault(sim, cur, "full")
        assert fh.is_mounted(state)
    assert not fh.is_mounted(state)
    usable_again(sim)


@SPOOLS
def test_file_size_limit_during_snapshot(sim, tmp_path, spool_ram_mib):
    """RLIMIT_FSIZE on the tool: its writes beyond the limit fail with EFBIG (Python ignores SIGXFSZ).
    `xl save` inherits it: writing the in-memory spool fails in `xl`, which is still a storage error."""
    cur = fill_guest_memory(sim)
    limit = max(p.stat().st_size for p in ch.state_dir(sim).rglob("*") if p.is_file()) + (1 << 20)
    config = _spool_config(sim, tmp_path, spool_ram_mib)
    proc = sim.run(["prlimit", f"--fsize={limit}", *ch.sim_tool_argv(), "--config", str(config),
                    "snapshot", GUEST, "--name", "limited"], check=False, timeout=120)
    err = fh.assert_one_line_error(proc, (10,), "snapshot under a file-size limit")
    print(f"\nfile-size limit: exit {proc.returncode}: {err}")
    after_fault(sim, cur, "limited")
    usable_again(sim)


def test_read_only_state_dir(sim):
    cur = ch.new_state(sim)
    state = ch.state_dir(sim)
    with fh.read_only(state):
        proc = sim.tool("snapshot", GUEST, "--name", "ro", check=False, timeout=120)
        err = fh.assert_one_line_error(proc, (10,), "snapshot with a read-only state dir")
        print(f"\nread-only: exit {proc.returncode}: {err}")
        fh.guest_and_vtpm_running(sim)
        assert ch.read_pair(sim) == cur
    after_fault(sim, cur, "ro")
    usable_again(sim)


def test_torn_wal_of_a_snapshot_commit(sim):
    """Power cut while the catalog commit of a snapshot was written: the tool died there (store crash
    point after the commit) and the WAL's last frame is cut in half, as an unfinished sector write
    leaves it.  SQLite drops the torn transaction; recover must leave a consistent pair and store."""
    cur = ch.new_state(sim)
    ch.crash(sim, "snapshot", GUEST, "--name", "torn", store_at="write.committed")
    op = ch.last_op(sim)
    wal = ch.state_dir(sim) / "catalog.sqlite-wal"
    size = wal.stat().st_size
    assert size > 4096, f"no WAL left by the killed commit ({size} bytes)"
    os.truncate(wal, size - 2000)
    ch.recover(sim)
    assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
    ids = ch.checkpoint_ids(sim)
    if "torn" in ids:
        ch.new_state(sim)
        sim.tool("rollback", GUEST, "torn", "--yes", "--no-safety-checkpoint")
        assert ch.check_host(sim, {"taken": cur}) == "taken"
        sim.tool("delete", "torn")
    else:
        assert not ch.manager_knows(sim, op["checkpoint"]), "manager checkpoint entry leaked"
    usable_again(sim)


def test_truncated_catalog(sim):
    """catalog.sqlite cut in half: every command refuses in one line (exit 10 or 5), touches no
    domain; with the admin's copy of the catalog put back, the host works again."""
    cur = ch.new_state(sim)
    state = ch.state_dir(sim)
    catalog = state / "catalog.sqlite"
    assert not (state / "catalog.sqlite-wal").exists(), "a WAL is left: the copy below would be stale"
    backup = catalog.read_bytes()
    os.truncate(catalog, len(backup) // 2)
    try:
        for argv in (["verify", "--all"], ["snapshot", GUEST, "--name", "cut"], ["recover"]):
            proc = sim.tool(*argv, check=False, timeout=120)
            err = fh.assert_one_line_error(proc, (10, 5), f"{argv[0]} on a truncated catalog")
            assert "catalog" in err, err
            fh.guest_and_vtpm_running(sim)
            assert ch.read_pair(sim) == cur
    finally:
        for extra in ("catalog.sqlite-wal", "catalog.sqlite-shm"):
            (state / extra).unlink(missing_ok=True)
        catalog.write_bytes(backup)
    after_fault(sim, cur, "cut")
    usable_again(sim)
