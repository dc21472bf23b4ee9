"""Storage faults under a snapshot: disk full (a small tmpfs as the state dir, or a file-size limit
on the tool), an unwritable state dir (read-only bind mount), a torn write of the catalog.

Each must end in one clear line with exit 10 (storage) or 5 (integrity), the guest and its vTPM
unpaused, running and still the pair they were, the store consistent (verify passes for what
remains, nothing half-written left), and the host usable again once the fault is gone.
"""
from __future__ import annotations

import os
import secrets

import pytest

import crash_helpers as ch
import fault_helpers as fh
from crash_helpers import GUEST
from sim_fixture import start_sim_host, stop_sim_host

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs / read-only bind needs root")


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    sim = start_sim_host(tmp_path_factory.mktemp("stor") / "h")
    try:
        sim.tool("init")
        ch.prime_host(sim)
        yield sim
    finally:
        stop_sim_host(sim)


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


def test_disk_full_during_snapshot(sim):
    cur = fill_guest_memory(sim)
    room = fh.state_usage(sim) + (3 << 20)          # far less than the 16 MiB of random memory
    with fh.state_on_tmpfs(sim, room) as state:
        proc = sim.tool("snapshot", GUEST, "--name", "full", check=False, timeout=120)
        err = fh.assert_one_line_error(proc, (10,), "snapshot on a full disk")
        assert "disk full" in err or "No space left" in err, err
        after_fault(sim, cur, "full")
        assert fh.is_mounted(state)
    assert not fh.is_mounted(state)
    usable_again(sim)


def test_file_size_limit_during_snapshot(sim):
    """RLIMIT_FSIZE on the tool: its writes beyond the limit fail with EFBIG (Python ignores SIGXFSZ)."""
    cur = fill_guest_memory(sim)
    limit = max(p.stat().st_size for p in ch.state_dir(sim).rglob("*") if p.is_file()) + (1 << 20)
    proc = sim.run(["prlimit", f"--fsize={limit}", *ch.sim_tool_argv(), "snapshot", GUEST, "--name", "limited"],
                   check=False, timeout=120)
    fh.assert_one_line_error(proc, (10,), "snapshot under a file-size limit")
    after_fault(sim, cur, "limited")
    usable_again(sim)


def test_read_only_state_dir(sim):
    cur = ch.new_state(sim)
    state = ch.state_dir(sim)
    with fh.read_only(state):
        proc = sim.tool("snapshot", GUEST, "--name", "ro", check=False, timeout=120)
        fh.assert_one_line_error(proc, (10,), "snapshot with a read-only state dir")
        fh.guest_and_vtpm_running(sim)
        assert ch.read_pair(sim) == cur
    after_fault(sim, cur, "ro")
    usable_again(sim)
