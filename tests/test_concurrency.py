"""Load and concurrency (issue 7, item 4): many `xen-vtpm` processes at once on one host.

One simulated host for the module: guest1 (16 MiB, from e2e_helpers) and guest2..guest16 (8 MiB),
each with its own vTPM stub domain.  Every command is a separate `python -m xen_vtpm` process,
as 16 administrators or cron jobs would run them.

* 16 snapshots started together, one per guest: all succeed, every checkpoint verifies, the audit
  chain verifies, the host counter moved by exactly 16 and every guest runs on with its vTPM.
* Two rollbacks of the same guest: exactly one wins, the other exits 4 (locked) without touching
  anything; the guest ends paired with the checkpoint's vTPM.
* A snapshot of one guest while a rollback of another is in flight (and the other way round):
  both succeed.  The command that starts second runs `recover` first, and must leave the live
  operation of the other guest alone (its VM lock is held).

Overlap is made certain, not left to scheduling: the command that must be in flight runs with an
`xl` wrapper that stops at one xl subcommand (a "gate") until the test opens it.  While it waits
there, it holds its VM lock and has journaled an unfinished operation.
"""
from __future__ import annotations

import contextlib
import json
import shlex
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import GUEST, E2EHost, assert_one_line_error, e2e_host, pcr_extend, pcr_read, saved_memory_digest

N_GUESTS = 16
OTHERS = [f"guest{i}" for i in range(2, N_GUESTS + 1)]
GUESTS = [GUEST, *OTHERS]
WAIT = 240  # upper bound for a command on a loaded 2-core machine; never a pass/fail criterion

# Stops at one xl subcommand until OPEN exists (bounded, so a failed test cannot leave it behind).
_GATE_XL = """#!/bin/sh
if [ "$1" = {cmd} ]; then
    : > {reached}
    n=0
    while [ ! -e {open} ] && [ $n -lt 1200 ]; do sleep 0.05; n=$((n + 1)); done
fi
exec {real} "$@"
"""


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[E2EHost]:
    with e2e_host(tmp_path_factory.mktemp("conc")) as h:
        for name in OTHERS:
            h.tool("sim", "create", name, "--memory", "8")
        yield h


@contextlib.contextmanager
def processes() -> Iterator[list[subprocess.Popen]]:
    """Commands started in the background; any still running at the end is killed."""
    procs: list[subprocess.Popen] = []
    try:
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def spawn(procs: list[subprocess.Popen], env: dict[str, str], *args: str) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-m", "xen_vtpm", *args], env=env, text=True,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    procs.append(p)
    return p


def finish(p: subprocess.Popen) -> tuple[int, str, str]:
    out, err = p.communicate(timeout=WAIT)
    return p.returncode, out, err


class Gate:
    """A config whose xl stops at `cmd` (e.g. "save", "destroy") until `open()`."""

    def __init__(self, host: E2EHost, where: Path, cmd: str) -> None:
        where.mkdir()
        self.reached, self.opened = where / "reached", where / "open"
        xl = where / "xl"
        xl.write_text(_GATE_XL.format(cmd=shlex.quote(cmd), reached=shlex.quote(str(self.reached)),
                                      open=shlex.quote(str(self.opened)),
                                      real=shlex.quote(str(host.dir / "bin" / "xl"))))
        xl.chmod(xl.stat().st_mode | stat.S_IXUSR)
        lines = [f"xl = {xl}" if ln.startswith("xl =") else ln for ln in host.sim.config.read_text().splitlines()]
        config = where / "xen-vtpm.conf"
        config.write_text("\n".join(lines) + "\n")
        self.env = dict(host.sim.env, XEN_VTPM_CONFIG=str(config))

    def wait_reached(self, procs: list[subprocess.Popen]) -> None:
        deadline = time.monotonic() + WAIT
        while not self.reached.exists():
            exited = [(p.args[3:], p.returncode, p.stderr.read()) for p in procs if p.poll() is not None]
            assert not exited, f"a command ended before reaching the gate: {exited}"
            assert time.monotonic() < deadline, "no command reached the gate"
            time.sleep(0.05)

    def open(self) -> None:
        self.opened.touch()


# --- what the host looks like ----------------------------------------------------------------

def counter(host: E2EHost) -> int:
    return int(host.tool_json("status")["counter"])


def audit_count(host: E2EHost) -> int:
    return len(host.tool_json("audit"))


def unfinished_ops(host: E2EHost) -> list[tuple]:
    """(op_id, kind, params, steps) of every operation the journal has not closed."""
    with contextlib.closing(sqlite3.connect(f"file:{host.catalog}?mode=ro", uri=True)) as db:
        ops = db.execute("SELECT op_id, kind, params FROM op_journal WHERE finished IS NULL ORDER BY op_id").fetchall()
        return [(op_id, kind, json.loads(params),
                 [s for (s,) in db.execute("SELECT step FROM op_steps WHERE op_id=? ORDER BY seq", (op_id,))])
                for op_id, kind, params in ops]


def vtpm_links(host: E2EHost, guests: list[str]) -> dict[str, tuple[str, str, str]]:
    """(frontend state, backend state, uuid check) of each guest's one vTPM link."""
    rows = {r["name"]: r for r in host.tool_json("list")}
    out = {}
    for guest in guests:
        links = rows[guest]["vtpms"]
        assert len(links) == 1, (guest, links)
        out[guest] = (links[0]["state"], links[0]["backend_state"], links[0]["uuid_check"])
    return out


def assert_run_with_their_vtpm(host: E2EHost, *guests: str) -> None:
    """Running, not paused, and each vTPM link Connected on both ends with the right uuid."""
    for row in host.xl("list").stdout.splitlines()[1:]:
        cols = row.split()
        if cols and cols[0] in guests:
            assert "p" not in cols[4], f"{cols[0]} was left paused"
    assert set(guests) <= set(host.domids()), f"not running: {set(guests) - set(host.domids())}"
    # A guest just unpaused (re)connects its frontend on its own; give it the time it needs.
    deadline = time.monotonic() + WAIT
    while (bad := {g: link for g, link in vtpm_links(host, list(guests)).items() if link != ("4", "4", "ok")}) \
            and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not bad, f"vTPM link (frontend, backend, uuid check) not Connected/ok: {bad}"


def assert_store_and_audit_verify(host: E2EHost) -> None:
    host.tool("verify", "--all")
    host.tool("audit", "--verify")
    assert unfinished_ops(host) == [], "an operation was left unfinished"


# --- the tests -------------------------------------------------------------------------------

def test_sixteen_guests_snapshotted_concurrently(host):
    before_counter, before_audit = counter(host), audit_count(host)
    with processes() as procs:
        for guest in GUESTS:
            spawn(procs, host.sim.env, "--json", "snapshot", guest, "--name", "concurrent")
        results = dict(zip(GUESTS, (finish(p) for p in procs)))

    failed = {g: (rc, err.strip()) for g, (rc, _, err) in results.items() if rc != 0}
    assert not failed, f"{len(failed)} of {N_GUESTS} concurrent snapshots failed: {failed}"
    made = {g: json.loads(out) for g, (_, out, _) in results.items()}
    assert {m["domain"] for m in made.values()} == set(GUESTS)

    listed = [c for c in host.tool_json("checkpoints") if c["name"] == "concurrent"]
    assert sorted(c["id"] for c in listed) == sorted(m["id"] for m in made.values())
    verified = {r["id"] for r in host.tool_json("verify", "--all")}  # exit 0: every checkpoint verifies
    assert {m["id"] for m in made.values()} <= verified
    host.tool("audit", "--verify")
    assert unfinished_ops(host) == [], "an operation was left unfinished"
    # Each snapshot is one state change: one counter increment and one audit record, no more, no less.
    assert counter(host) == before_counter + N_GUESTS
    records = host.tool_json("audit")[before_audit:]
    assert sorted((r["action"], r["vm"], r["result"]) for r in records) == \
        sorted(("snapshot", g, "ok") for g in GUESTS)
    assert_run_with_their_vtpm(host, *GUESTS)


def test_two_rollbacks_of_one_guest_one_wins_the_other_is_locked(host, tmp_path):
    tcti = host.tcti()
    pcr_extend(tcti, b"race: before the checkpoint")
    host.snapshot("race-base")
    mem_at_checkpoint = saved_memory_digest(host.last_save_record())
    pcr_at_checkpoint = pcr_read(tcti)
    pcr_extend(tcti, b"race: after the checkpoint")  # the vTPM moves on: the rollback must bring it back
    assert pcr_read(tcti) != pcr_at_checkpoint
    before_counter = counter(host)

    # Whichever takes the VM lock first stops in its safety snapshot's `xl save`, lock held.
    gate = Gate(host, tmp_path / "gate", "save")
    with processes() as procs:
        for _ in range(2):
            spawn(procs, gate.env, "--json", "rollback", GUEST, "race-base", "--yes", "--paused")
        try:
            deadline = time.monotonic() + WAIT
            while all(p.poll() is None for p in procs):
                assert time.monotonic() < deadline, "neither rollback ended while one held the lock"
                time.sleep(0.05)
            loser = next(p for p in procs if p.poll() is not None)
            winner = next(p for p in procs if p is not loser)
            rc, _, err = finish(loser)
            assert rc == 4, f"the rollback that lost the race exited {rc}, expected 4 (locked): {err.strip()}"
            assert "locked" in assert_one_line_error(subprocess.CompletedProcess(loser.args, rc, "", err))
            gate.wait_reached([winner])  # the winner, lock held all along, gets on with its rollback
        finally:
            gate.open()
        rc, out, err = finish(winner)
    assert rc == 0, f"the rollback that won the race exited {rc}: {err.strip()}"
    assert json.loads(out)["name"] == "race-base"

    # One rollback happened, paired: the guest's memory and its vTPM are both the checkpoint's.
    assert host.is_paused(GUEST)  # --paused: as the checkpoint left it, memory not yet run on
    assert host.memdigest() == mem_at_checkpoint
    assert pcr_read(host.tcti()) == pcr_at_checkpoint
    host.xl("unpause", GUEST)
    assert_run_with_their_vtpm(host, GUEST)
    assert_store_and_audit_verify(host)
    assert counter(host) == before_counter + 2  # the winner's safety snapshot and rollback; nothing from the loser


@pytest.mark.parametrize("held, held_args, gate_cmd, other_args", [
    pytest.param("rollback", ["rollback", "guest2", "overlap-base", "--yes"], "destroy",
                 ["snapshot", "guest3", "--name", "beside-a-rollback"], id="snapshot-during-rollback"),
    pytest.param("snapshot", ["snapshot", "guest4", "--name", "beside-a-rollback"], "save",
                 ["rollback", "guest5", "overlap-base", "--yes"], id="rollback-during-snapshot"),
])
def test_other_guests_command_runs_while_one_is_in_flight(host, tmp_path, held, held_args, gate_cmd, other_args):
    """The second command's recover sees the first one's unfinished op and must leave it alone."""
    rolled_back = held_args[1] if held == "rollback" else other_args[1]
    host.snapshot("overlap-base", guest=rolled_back)
    before_counter = counter(host)
    gate = Gate(host, tmp_path / "gate", gate_cmd)
    with processes() as procs:
        first = spawn(procs, gate.env, "--json", *held_args)
        try:
            gate.wait_reached(procs)
            live = unfinished_ops(host)
            assert [op[1] for op in live] == [held], live
            host.tool("--json", *other_args)  # runs recover first, then its own sequence
            assert unfinished_ops(host) == live, "recover touched an operation whose command is alive"
            assert first.poll() is None
        finally:
            gate.open()
        rc, out, err = finish(first)
    assert rc == 0, f"the {held} held at `xl {gate_cmd}` exited {rc}: {err.strip()}"
    assert_run_with_their_vtpm(host, held_args[1], other_args[1])
    assert_store_and_audit_verify(host)
    # snapshot: 1 change; rollback with its safety snapshot: 2.
    assert counter(host) == before_counter + 3
