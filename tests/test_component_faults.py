"""Component failures at every journaled step: a simulated component dies while the tool runs.

For each sequence (snapshot, rollback, save, restore, delete), each step the coordinator journals
(crash_helpers.coordinator_steps) and each component (fault_helpers.COMPONENTS) that runs at that
point, the tool runs with its test hook (tests/faulty_tool.py, xen_vtpm.faults) taking the component
down right after that step is journaled.  Then:

1. the fault is proved to have happened: the hook's log shows the fault command ran there and saw the
   component down, and the test itself still sees it down (fault_helpers.prove_fault); a fault that
   injects nothing fails the case (test_a_fault_that_injects_nothing_is_caught is the control);
2. the tool either finished (the component was not needed any more) or failed with one line and
   the component's exit code — within the subprocess timeout, i.e. it never hangs;
3. what a real host restarts comes back (xenstored, the host TPM); a dead vTPM stub domain or
   manager stays dead, as a crashed domain does under Xen;
4. `xen-vtpm recover` must succeed, and crash_helpers.check_host must pass: the VM/vTPM pair is old
   or new (never mixed, never fresh), nothing paused or leaked, store and audit log verify; every
   checkpoint the faulted command kept is rolled back to and must give back the pair it was taken of.

A dead vTPM stub domain: recover must still succeed; rolling back re-creates the stub from a
checkpoint, so the full check runs after rolling back to the kept checkpoint and to the target.
A dead manager: recover succeeds or fails in one line (exit 9) leaving only this case's operation
open; the full check runs with the manager dead (guest1 keeps its pair, since its vTPM still runs);
kept checkpoints verify.  No rollback is tried: the tool cannot rebuild a vTPM under a re-created
manager, and a rollback with a dead manager passes its point of no return before it fails.

The default run takes a representative subset; `make crash` (-m crash_full) runs the rest.
XEN_VTPM_FAULT_TABLE=FILE writes the outcome table there.
"""
from __future__ import annotations

import shlex
from pathlib import Path

import crash_helpers as ch
import fault_helpers as fh
import pytest
from crash_helpers import GUEST
from sim_fixture import start_sim_host, stop_sim_host

from xen_vtpm.core import steps as S

STEPS = ch.coordinator_steps()
KINDS = ("snapshot", "rollback", "save", "restore", "delete")
EXIT = {"xenstored": (9,), "hosttpm": (8,), "vtpm": (9,), "vtpmmgr": (9,)}
RESULTS: list[tuple[str, str, str]] = []

# (kind, step, component) -> open entry in docs/reliability.md (CF-n); such cases run as xfail(strict=True).
KNOWN_BUGS: dict[tuple[str, str, str], str] = {}

# The default run: per sequence, the step where each component that comes back is first needed
# after the fault, and the dead-domain cases where the sequence most depends on that domain.
REPRESENTATIVE = {
    ("snapshot", "guest-save", "xenstored"), ("snapshot", "manager-checkpoint", "hosttpm"),
    ("snapshot", "manager-checkpoint", "vtpmmgr"), ("snapshot", "manager-checkpoint", "vtpm"),
    ("rollback", "start-vtpm", "xenstored"), ("rollback", "advance-head", "hosttpm"),
    ("save", "destroy-guest", "xenstored"), ("restore", "restore-guest", "hosttpm"),
    ("delete", "discard-manager", "vtpmmgr"),
}

# A dead vTPM stub domain or manager is tried at every step of the sequences that lean on it most
# (the others reach it through the same ports: pause/capture, stop/start, discard).
DEAD_DOMAIN_KINDS = {"vtpm": ("snapshot", "rollback"), "vtpmmgr": ("snapshot", "delete")}


def runs_at(kind: str, step: str, comp: str) -> bool:
    """Is `comp` running right after `step` is journaled?  A vTPM stub domain is not from the step
    after stop-vtpm through start-vtpm (journaled before it re-creates the stub): nothing to take down."""
    seq = STEPS[kind]
    if comp != "vtpm" or S.STOP_VTPM not in seq:
        return True
    return not seq.index(S.STOP_VTPM) < seq.index(step) <= seq.index(S.START_VTPM)


def cases() -> list:
    params = []
    for kind in KINDS:
        for step in STEPS[kind]:
            for comp in fh.COMPONENTS:
                if kind not in DEAD_DOMAIN_KINDS.get(comp, KINDS) or not runs_at(kind, step, comp):
                    continue
                marks = [] if (kind, step, comp) in REPRESENTATIVE else [pytest.mark.crash_full]
                bug = KNOWN_BUGS.get((kind, step, comp))
                if bug:
                    marks.append(pytest.mark.xfail(strict=True, reason=bug))
                params.append(pytest.param(kind, step, comp, id=f"{kind}:{step}:{comp}", marks=marks))
    return params


@pytest.fixture(scope="module", autouse=True)
def report_table():
    yield
    ch.report(RESULTS, "XEN_VTPM_FAULT_TABLE")


class Host:
    """One simulated host reused while cases leave it whole; a dead vTPM or manager, or a failed
    case, gets the next case a fresh one."""

    def __init__(self, factory) -> None:
        self.factory = factory
        self.sim: ch.SimHost | None = None
        self.target: ch.Pair | None = None

    def get(self) -> ch.SimHost:
        if self.sim is None:
            sim = start_sim_host(self.factory.mktemp("fault") / "h")
            try:
                sim.tool("init")
                ch.prime_host(sim)
                fh.set_timeouts(sim)
                self.target = ch.new_state(sim)
                sim.tool("snapshot", GUEST, "--name", "target")
            except BaseException:
                stop_sim_host(sim)
                raise
            self.sim = sim
        return self.sim

    def discard(self) -> None:
        if self.sim is not None:
            sim, self.sim = self.sim, None
            stop_sim_host(sim)


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    h = Host(tmp_path_factory)
    try:
        yield h
    finally:
        h.discard()


def prepare(sim: ch.SimHost, kind: str, target: ch.Pair, tmp_path: Path) -> tuple[list[str], dict, dict]:
    """argv of the sequence, the pairs the guest may be in afterwards, and what a check needs."""
    ctx: dict = {}
    if kind == "snapshot":
        cur = ch.new_state(sim)
        return ["snapshot", GUEST, "--name", "faulted"], {"old": cur}, ctx
    if kind == "rollback":
        cur = ch.new_state(sim)
        return (["rollback", GUEST, "target", "--yes", "--no-safety-checkpoint"],
                {"old": cur, "new": target}, ctx)
    if kind == "save":
        cur = ch.new_state(sim)
        ctx["path"] = tmp_path / "guest.save"
        return ["save", GUEST, str(ctx["path"])], {"old": cur}, ctx
    if kind == "restore":
        saved = ch.new_state(sim)
        ctx["path"] = tmp_path / "guest.save"
        sim.tool("save", GUEST, str(ctx["path"]))
        ch.advance_vtpm_nv(sim)
        sim.run(["tpm2_pcrextend", "-T", ch.tcti(sim, GUEST), "16:sha256=" + "5a" * 32])
        return ["restore", str(ctx["path"])], {"saved": saved}, ctx
    assert kind == "delete"
    ctx["doomed"] = ch.new_state(sim)
    sim.tool("snapshot", GUEST, "--name", "doomed")
    cur = ch.new_state(sim)
    return ["delete", "doomed"], {"old": cur}, ctx


def kept_checkpoints(sim: ch.SimHost, kind: str, op: dict, allowed: dict, ctx: dict,
                     roll_back: bool = True) -> str:
    """What the faulted command kept must be whole: a kept snapshot or undeleted checkpoint gives back
    the pair it was taken of (`roll_back`) or at least verifies; one that is gone left no manager
    entry behind; an undone save left no checkpoint."""
    ids = ch.checkpoint_ids(sim)
    notes = []
    for name, pair in (("faulted", allowed.get("old")), ("doomed", ctx.get("doomed"))):
        if name not in ids:
            continue
        if roll_back:
            ch.rolls_back_to(sim, name, pair)
            notes.append(f"kept {name} rolls back to its pair")
            sim.tool("delete", name, timeout=150)
        else:   # a delete needs the dead manager too; the host is not reused
            sim.tool("verify", ids[name], timeout=150)
            notes.append(f"kept {name} verifies")
    gone = op.get("manager_checkpoint") or op.get("checkpoint")
    if roll_back and gone and gone not in ids.values() and kind in ("snapshot", "delete", "save"):
        assert not ch.manager_knows(sim, gone), f"{kind}: manager entry {gone} outlived its checkpoint"
        notes.append("manager entry gone")
    return "; ".join(notes)


def settle(sim: ch.SimHost, kind: str, op: dict, allowed: dict, ctx: dict) -> str:
    """After recover: the full host check; a saved-away guest is restored from its file; kept
    checkpoints are rolled back to."""
    state = ch.check_host(sim, allowed, guest_expected=None)
    if state == "absent":
        path = ctx["path"]
        assert path.is_file(), f"{GUEST} is gone and {path.name} does not exist"
        sim.tool("restore", str(path))
        state = ch.check_host(sim, {k: v for k, v in allowed.items() if k in ("old", "saved")})
        state = f"absent; restored from its file: {state}"
    elif kind == "save":
        assert op["checkpoint"] not in ch.checkpoint_ids(sim).values(), \
            "the guest runs on, but the undone save's checkpoint is still in the catalog"
    kept = kept_checkpoints(sim, kind, op, allowed, ctx)
    return state + (f"; {kept}" if kept else "")


def dead_manager_checks(sim: ch.SimHost, kind: str, op: dict, allowed: dict, ctx: dict) -> str:
    """A dead manager: recover ends in one line (or succeeds), never hangs; then the full check with
    the manager dead — guest1 runs with an allowed pair (its vTPM stub still serves), nothing paused,
    no stray process, store and audit log verify; only this case's op may wait for the manager."""
    proc = sim.tool("recover", check=False, timeout=150)
    if proc.returncode:
        fh.assert_one_line_error(proc, EXIT["vtpmmgr"], "recover with a dead vtpmmgr")
    open_op = op["op_id"] if ch.op_outcome(sim, op["op_id"]) == "" else None
    state = ch.check_host(sim, allowed, open_op=open_op)
    kept = kept_checkpoints(sim, kind, op, allowed, ctx, roll_back=False)
    waits = f"; op {op['op_id']} waits for the manager" if open_op else ""
    return f"recover {'ok' if proc.returncode == 0 else f'exit {proc.returncode}'}; {state}{waits}" + \
        (f"; {kept}" if kept else "")


def repair_dead_vtpm(sim: ch.SimHost, target: ch.Pair, allowed: dict) -> str:
    """The admin's repair for a guest whose vTPM stub domain crashed (its PCRs are gone with it):
    roll the guest back to a checkpoint, which re-creates the stub domain from the stored pair.
    A checkpoint the faulted snapshot kept must hold the pair it claims: the one before it."""
    ids = ch.checkpoint_ids(sim)
    checks = [("faulted", allowed["old"])] if "faulted" in ids else []
    for name, pair in checks + [("target", target)]:
        sim.tool("rollback", GUEST, name, "--yes", "--no-safety-checkpoint", timeout=150)
        assert ch.check_host(sim, {name: pair}) == name, f"checkpoint {name} does not hold its pair"
    if checks:
        sim.tool("delete", "faulted")
    return ("kept checkpoint rolls back to its pair; " if checks else "") + "rollback rebuilt the pair"


@pytest.mark.parametrize("kind,step,comp", cases())
def test_component_dies(host, tmp_path, kind, step, comp):
    sim = host.get()
    whole = False
    try:
        argv, allowed, ctx = prepare(sim, kind, host.target, tmp_path)
        log = ch.fresh_log(sim)
        proc = sim.run([*fh.fault_argv(sim, f"{kind}:{step}", comp, log), *argv], check=False, timeout=150)
        fh.prove_fault(log, f"{kind}:{step}", comp)
        op = ch.last_op(sim)
        assert op["kind"] == kind, f"the last journaled op is a {op['kind']}, expected {kind}"
        if proc.returncode:
            err = fh.assert_one_line_error(proc, EXIT[comp], f"{kind} with {comp} dead at {step}")
            tool = f"exit {proc.returncode} ({err.split(':', 2)[-1].strip()[:60]}…)"
        else:
            tool = "exit 0"
        if comp in fh.COMES_BACK:
            fh.bring_back(sim, comp)
            ch.recover(sim)
            outcome = settle(sim, kind, op, allowed, ctx)
            whole = True
        elif comp == "vtpmmgr":
            outcome = dead_manager_checks(sim, kind, op, allowed, ctx)
        else:
            # The tool can always re-create a vTPM stub domain from its cfg and a checkpoint:
            # recover must not stay stuck on a dead one, and the guest must still exist.
            proc = sim.tool("recover", check=False, timeout=150)
            assert proc.returncode == 0, f"recover cannot get past the dead vTPM stub domain: {proc.stderr.strip()}"
            outcome = "recover ok; " + repair_dead_vtpm(sim, host.target, allowed)
            whole = True
        RESULTS.append((kind, f"{step} × {comp}", f"fault proved; {tool}; {outcome}"))
    finally:
        if not whole:
            host.discard()


def test_a_fault_that_injects_nothing_is_caught(host):
    """Negative control for prove_fault: a fault command that takes nothing down, one that fails, and
    a point the command never reaches must each fail the proof."""
    sim = host.get()
    log = ch.fresh_log(sim)
    noop = ("snapshot:guest-save", "true")
    failing = ("snapshot:manager-checkpoint", shlex.join(["sh", "-c", "echo 'down hosttpm pid 1' >&2; exit 1"]))
    sim.run([*ch.faulty_argv(faults=[noop, failing], log=log), "snapshot", GUEST, "--name", "noop"])
    for point, why in (("snapshot:guest-save", "did not take hosttpm down"),
                       ("snapshot:manager-checkpoint", "did not take hosttpm down"),
                       ("snapshot:no-such-step", "never reached")):
        with pytest.raises(AssertionError, match=why):
            fh.prove_fault(log, point, "hosttpm")
    # A command that claims to have taken down a component that runs: the test's own look finds it up.
    claim = log.with_name("claim.log")
    claim.write_text(f"reached snapshot:commit fault-exit 0 'down hosttpm pid {fh.pid_of(sim, 'hosttpm')}'\n")
    with pytest.raises(AssertionError, match="is up again"):
        fh.prove_fault(claim, "snapshot:commit", "hosttpm")
    sim.tool("delete", "noop")
