"""Issue 18 items 5 and 8: a nearly full disk and Ctrl-C end in one line, never a traceback, and an
interrupted rollback is undone before its point of no return and finished after it.

* Free-space sweep: the state dir on a tmpfs with a filler file leaving exactly N KiB free, for a
  range of N from nothing to enough; a snapshot and a rollback at each level must exit 0 or 10 (one
  line naming the full disk), and a refused one leaves the guest running with the pair it had.
  Freeing the space, the next command recovers.
* SIGINT at every point of a rollback (its safety snapshot's steps, the journaled operation before
  its first step, and each step): exit 130 with one line; after recover, a rollback interrupted
  before `destroy-guest` is undone (same domain, same VM/vTPM pair), one interrupted at or after it
  is finished (the checkpoint's pair).  Then SIGINTs at random moments of a snapshot and a rollback,
  with the same rule read off the domain id: never destroyed means nothing changed.

`make test` runs a representative part; `make crash` (`-m crash_full`) the whole sweep and every
step of the other sequences.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import crash_helpers as ch
import fault_helpers as fh
import pytest
from crash_helpers import GUEST

from xen_vtpm.core import steps as S

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
FULL = pytest.mark.crash_full


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Iterator[ch.SimHost]:
    with ch.primed_host(tmp_path_factory.mktemp("intr") / "h") as sim:
        yield sim


def one_line(proc: subprocess.CompletedProcess, codes: tuple[int, ...], what: str) -> str:
    return fh.assert_one_line_error(proc, codes, what) if proc.returncode else ""


def domid(sim: ch.SimHost, name: str = GUEST) -> int | None:
    rows = sim.xl("list").stdout.splitlines()[1:]
    return next((int(r.split()[1]) for r in rows if r.split()[0] == name), None)


# --- item 5: a sweep of free-space levels ---------------------------------------------------------

FILLER = ".filler"

# KiB left free: nothing, the 40-48 KiB (the journal, the audit log, the catalog), enough.
LEVELS = [0, 44, 4096]
# Every page where the metadata writes fail (24-72 KiB), then coarser up to a snapshot that fits.
FULL_LEVELS = sorted({0, 8, 16, *range(24, 73, 4), 96, 128, 192, 256, 512, 1024, 4096})


@contextlib.contextmanager
def free_space(state: Path, kib: int) -> Iterator[None]:
    """Fill the state dir's file system until `kib` KiB are free; remove the filler afterwards."""
    filler = state / FILLER
    st = os.statvfs(state)
    size = st.f_bavail * st.f_frsize - kib * 1024
    assert size >= 0, f"the tmpfs has less than {kib} KiB free"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        if size:
            os.posix_fallocate(fd, 0, size)
    finally:
        os.close(fd)
    try:
        st = os.statvfs(state)
        assert abs(st.f_bavail * st.f_frsize - kib * 1024) < 4096, "the filler missed its level"
        yield
    finally:
        filler.unlink()


def _sweep(sim: ch.SimHost, levels: list[int]) -> list[str]:
    """Snapshot and rollback at each level; returns the outcome lines (printed as a table)."""
    state = ch.state_dir(sim)
    taken = ch.new_state(sim)
    sim.tool("snapshot", GUEST, "--name", "sweep-base")
    outcomes = []
    with fh.state_on_tmpfs(sim, fh.state_usage(sim) + (64 << 20)):
        for kib in levels:
            for command in ("snapshot", "rollback"):
                cur = ch.new_state(sim)
                before = domid(sim)
                argv = (["snapshot", GUEST, "--name", f"full-{kib}"] if command == "snapshot"
                        else ["rollback", GUEST, "sweep-base", "--yes", "--no-safety-checkpoint"])
                with free_space(state, kib):
                    proc = sim.tool(*argv, check=False, timeout=120)
                    line = one_line(proc, (10,), f"{command} with {kib} KiB free")
                    assert not line or "full" in line or "No space" in line, line
                    if proc.returncode and domid(sim) == before:
                        fh.guest_and_vtpm_running(sim)    # refused before anything running was touched
                sim.tool("recover", timeout=120)          # the space is back: finish or undo
                fh.guest_and_vtpm_running(sim)
                # Never replaced means nothing changed; replaced means rolled back, completely.
                expected = cur if command == "snapshot" or domid(sim) == before else taken
                assert ch.read_pair(sim) == expected, f"{command} at {kib} KiB: wrong VM/vTPM pair after recover"
                if f"full-{kib}" in ch.checkpoint_ids(sim):
                    sim.tool("delete", f"full-{kib}")
                cause = line.split(": ", 2)[-1] if line else ""       # the message without the path
                outcomes.append(f"{kib:>6} KiB  {command:<8}  exit {proc.returncode}  {cause[:100]}")
    print("\n" + "\n".join(outcomes))
    assert ch.check_host(sim, {"any": ch.read_pair(sim)}) == "any"
    sim.tool("delete", "sweep-base")
    return outcomes


def test_free_space_sweep(sim):
    outcomes = _sweep(sim, LEVELS)
    assert any("exit 10" in o for o in outcomes) and any("exit 0" in o for o in outcomes), \
        "the sweep never crossed from refused to done: its levels prove nothing"


@FULL
def test_free_space_sweep_full(sim):
    _sweep(sim, FULL_LEVELS)


# --- item 8 (and 5): SIGINT ------------------------------------------------------------------------

FAULTY_TOOL = Path(__file__).resolve().parent / "faulty_tool.py"


def interrupted(sim: ch.SimHost, point: str, *argv: str, log: Path) -> subprocess.CompletedProcess:
    proc = sim.run([sys.executable, str(FAULTY_TOOL), "--interrupt-at", point, "--log", str(log), "--", *argv],
                   check=False, timeout=120)
    assert f"reached {point}" in log.read_text(), f"{point} was never reached: {proc.stderr}"
    return proc


ROLLBACK_POINTS = ([f"{S.PRE_ROLLBACK}:{s}" for s in ("begin", *S.SEQUENCES[S.PRE_ROLLBACK])]
                   + [f"{S.ROLLBACK}:{s}" for s in ("begin", *S.SEQUENCES[S.ROLLBACK])])
NO_RETURN = ROLLBACK_POINTS.index(f"{S.ROLLBACK}:{S.DESTROY_GUEST}")
# The default run: either side of the point of no return, the safety snapshot committed but not
# bound, and the last step; `make crash` runs every point.
REPRESENTATIVE = {f"{S.PRE_ROLLBACK}:{S.COMMIT}", f"{S.ROLLBACK}:begin", f"{S.ROLLBACK}:{S.DESTROY_GUEST}",
                  f"{S.ROLLBACK}:{S.UNPAUSE_GUEST}"}


@pytest.mark.parametrize("point", [pytest.param(p, marks=[] if p in REPRESENTATIVE else [FULL])
                                   for p in ROLLBACK_POINTS])
def test_sigint_at_every_point_of_a_rollback(sim, tmp_path, point):
    sim.tool("snapshot", GUEST, "--name", "intr-target")
    target = ch.read_pair(sim)
    try:
        cur = ch.new_state(sim)
        before = domid(sim)
        proc = interrupted(sim, point, "rollback", GUEST, "intr-target", "--yes", log=tmp_path / "hook.log")
        assert proc.returncode == 130, f"{point}: exit {proc.returncode}: {proc.stderr}"
        assert "interrupted" in one_line(proc, (130,), f"rollback interrupted at {point}")
        report = ch.tool_json(sim, "recover")
        if ROLLBACK_POINTS.index(point) < NO_RETURN:
            assert domid(sim) == before, f"{point}: before the point of no return, yet the guest was replaced"
            assert ch.read_pair(sim) == cur, f"{point}: the interrupted rollback was not undone"
            assert all(r["outcome"] != "finished" or r["kind"] != S.ROLLBACK for r in report), report
        else:
            assert ch.read_pair(sim) == target, f"{point}: past the point of no return, yet not finished"
        fh.guest_and_vtpm_running(sim)
        ch.no_unfinished_ops(sim)
    finally:
        for name, _ in ch.checkpoint_ids(sim).items():
            sim.tool("delete", name)
    sim.tool("audit", "--verify")


OTHER_POINTS = {kind: [f"{kind}:{s}" for s in ("begin", *S.SEQUENCES[kind])]
                for kind in (S.SNAPSHOT, S.SAVE, S.RESTORE, S.DELETE)}


@FULL
@pytest.mark.parametrize("point", [p for points in OTHER_POINTS.values() for p in points])
def test_sigint_at_every_step_of_the_others(sim, tmp_path, point):
    """snapshot, save, restore and delete: exit 130, then recover leaves the guest's pair as it was."""
    kind = point.split(":")[0]
    save = tmp_path / "g.save"
    sim.tool("snapshot", GUEST, "--name", "intr-other")
    cur = ch.new_state(sim)
    if kind == S.RESTORE:
        sim.tool("save", GUEST, str(save))
        ch.advance_vtpm_nv(sim)                       # the restore must put the vTPM back
    argv = {S.SNAPSHOT: ["snapshot", GUEST, "--name", "intr-snap"], S.SAVE: ["save", GUEST, str(save)],
            S.RESTORE: ["restore", str(save)], S.DELETE: ["delete", "intr-other"]}[kind]
    proc = interrupted(sim, point, *argv, log=tmp_path / "hook.log")
    assert proc.returncode == 130, f"{point}: exit {proc.returncode}: {proc.stderr}"
    one_line(proc, (130,), point)
    sim.tool("recover")
    if domid(sim) is None:                            # a save that was finished, or a restore undone
        sim.tool("restore", str(save))
    assert ch.read_pair(sim) == cur, f"{point}: the guest's pair changed"
    fh.guest_and_vtpm_running(sim)
    ch.no_unfinished_ops(sim)
    for name in ch.checkpoint_ids(sim):
        sim.tool("delete", name)


def _random_sigints(sim: ch.SimHost, command: str, rounds: int, rng: random.Random) -> list[str]:
    sim.tool("snapshot", GUEST, "--name", "rnd-target")
    target = ch.read_pair(sim)
    t0 = time.monotonic()                               # how long one takes: the window to hit
    sim.tool("snapshot", GUEST, "--name", "rnd-timing") if command == "snapshot" else \
        sim.tool("rollback", GUEST, "rnd-target", "--yes")
    duration = time.monotonic() - t0
    for name in ch.checkpoint_ids(sim):
        if name != "rnd-target":
            sim.tool("delete", name)
    seen = []
    for i in range(rounds):
        cur = ch.new_state(sim)
        before = domid(sim)
        argv = (["snapshot", GUEST, "--name", f"rnd-{i}"] if command == "snapshot"
                else ["rollback", GUEST, "rnd-target", "--yes"])
        proc = subprocess.Popen([*ch.sim_tool_argv(), *argv], env=sim.env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        delay = rng.uniform(0.2, duration)              # not inside the interpreter's own start-up
        time.sleep(delay)
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=120)
        done = subprocess.CompletedProcess(argv, proc.returncode, out, err)
        assert proc.returncode in (0, 130), f"SIGINT after {delay:.2f} s: exit {proc.returncode}: {err}"
        one_line(done, (130,), f"{command} interrupted after {delay:.2f} s")
        sim.tool("recover")
        after = ch.read_pair(sim)
        if command == "snapshot" or domid(sim) == before:
            assert after == cur, f"SIGINT after {delay:.2f} s: the guest was never replaced, yet its pair changed"
        else:
            assert after == target, f"SIGINT after {delay:.2f} s: the guest was replaced, yet not rolled back"
        fh.guest_and_vtpm_running(sim)
        ch.no_unfinished_ops(sim)
        for name in ch.checkpoint_ids(sim):
            if name != "rnd-target":
                sim.tool("delete", name)
        seen.append(f"{delay:5.2f} s → exit {proc.returncode}")
    sim.tool("delete", "rnd-target")
    print(f"\n{command}: " + ", ".join(seen))
    return seen


@pytest.mark.parametrize("command", ["snapshot", "rollback"])
def test_random_sigints(sim, command):
    seed = int(os.environ.get("XEN_VTPM_FUZZ_SEED", random.randrange(1 << 30)))
    print(f"\nseed {seed} (XEN_VTPM_FUZZ_SEED={seed} repeats it)")
    seen = _random_sigints(sim, command, 3, random.Random(seed))
    assert any("exit 130" in s for s in seen), f"no SIGINT landed inside the command: {seen}"


@FULL
@pytest.mark.parametrize("command", ["snapshot", "rollback"])
def test_random_sigints_full(sim, command):
    _random_sigints(sim, command, 26, random.Random(int(os.environ.get("XEN_VTPM_FUZZ_SEED", "18"))))
