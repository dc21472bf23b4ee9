"""Component failures at every journaled step: a simulated component dies while the tool runs.

For each sequence (snapshot, rollback, save, restore, delete), each step the coordinator journals
(crash_helpers.coordinator_steps) and each component (fault_helpers.COMPONENTS), the tool runs with
its test hook (tests/faulty_tool.py, xen_vtpm.faults) taking the component down right
after that step is journaled.  Then:

1. the tool either finished (the component was not needed any more) or failed with one line and
   the component's exit code — within the subprocess timeout, i.e. it never hangs;
2. what a real host restarts comes back (xenstored, the host TPM); a dead vTPM stub domain or
   manager stays dead, as a crashed domain does under Xen;
3. `xen-vtpm recover` must succeed, and crash_helpers.check_host must pass: the VM/vTPM pair is old
   or new (never mixed, never fresh), nothing paused or leaked, store and audit log verify.

With a dead vTPM or manager the guest has lost its vTPM's volatile state, so step 3 becomes: the
tool and recover fail cleanly (one line, exit 9), nothing is left paused, the store verifies.

The default run takes a representative subset; `make crash` (-m crash_full) runs the rest.
XEN_VTPM_FAULT_TABLE=FILE writes the outcome table there.
"""
from __future__ import annotations

from pathlib import Path

import pytest

import crash_helpers as ch
import fault_helpers as fh
from crash_helpers import GUEST
from sim_fixture import start_sim_host, stop_sim_host

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


def cases() -> list:
    params = []
    for kind in KINDS:
        for step in STEPS[kind]:
            for comp in fh.COMPONENTS:
                if kind not in DEAD_DOMAIN_KINDS.get(comp, KINDS):
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
    ch.new_state(sim)
    sim.tool("snapshot", GUEST, "--name", "doomed")
    cur = ch.new_state(sim)
    return ["delete", "doomed"], {"old": cur}, ctx


def settle(sim: ch.SimHost, kind: str, allowed: dict, ctx: dict) -> str:
    """After recover: the full host check; a saved-away guest is restored from its file."""
    state = ch.check_host(sim, allowed, guest_expected=None)
    if state == "absent":
        path = ctx["path"]
        assert path.is_file(), f"{GUEST} is gone and {path.name} does not exist"
        sim.tool("restore", str(path))
        state = ch.check_host(sim, {k: v for k, v in allowed.items() if k in ("old", "saved")})
        state = f"absent; restored from its file: {state}"
    names = ch.checkpoint_ids(sim)
    for leftover in ("faulted", "doomed"):
        if leftover in names:
            sim.tool("delete", leftover)
    return state


def dead_domain_checks(sim: ch.SimHost, comp: str) -> str:
    """A dead vTPM stub domain or manager: recover ends in one line (or succeeds), never hangs,
    leaves nothing paused; the store and audit log still verify."""
    proc = sim.tool("recover", check=False, timeout=150)
    if proc.returncode:
        fh.assert_one_line_error(proc, EXIT[comp], "recover with a dead " + comp)
    for name, state in ch.xl_rows(sim).items():
        assert "p" not in state, f"{name}: left paused ({state}) with {comp} dead"
    sim.tool("verify", "--all", timeout=150)
    sim.tool("audit", "--verify")
    return "recover ok" if proc.returncode == 0 else f"recover exit {proc.returncode}"


def repair_dead_vtpm(sim: ch.SimHost, target: ch.Pair, allowed: dict) -> str:
    """The admin's repair for a guest whose vTPM stub domain crashed (its PCRs are gone with it):
    roll the guest back to a checkpoint, which re-creates the stub domain from the stored pair.
    A checkpoint the faulted snapshot kept must hold the pair it claims: the one before it."""
    ids = ch.checkpoint_ids(sim)
    checks = [("faulted", allowed["old"])] if "faulted" in ids else []
    for name, pair in checks + [("target", target)]:
        sim.tool("rollback", GUEST, name, "--yes", "--no-safety-checkpoint", timeout=150)
        assert ch.check_host(sim, {name: pair}) == name, f"checkpoint {name} does not hold its pair"
    for leftover in ("faulted", "doomed"):
        if leftover in ids:
            sim.tool("delete", leftover)
    return ("kept checkpoint rolls back to its pair; " if checks else "") + "rollback rebuilt the pair"


@pytest.mark.parametrize("kind,step,comp", cases())
def test_component_dies(host, tmp_path, kind, step, comp):
    sim = host.get()
    whole = False
    try:
        argv, allowed, ctx = prepare(sim, kind, host.target, tmp_path)
        proc = sim.run([*fh.fault_argv(sim, f"{kind}:{step}", comp), *argv], check=False, timeout=150)
        if proc.returncode:
            err = fh.assert_one_line_error(proc, EXIT[comp], f"{kind} with {comp} dead at {step}")
            tool = f"exit {proc.returncode} ({err.split(':', 2)[-1].strip()[:60]}…)"
        else:
            tool = "exit 0"
        if comp in fh.COMES_BACK:
            fh.bring_back(sim, comp)
            ch.recover(sim)
            outcome = settle(sim, kind, allowed, ctx)
            whole = True
        else:
            outcome = dead_domain_checks(sim, comp)
            if comp == "vtpm":
                # The tool can always re-create a vTPM stub domain from its cfg and a checkpoint:
                # recover must not stay stuck on a dead one, and the guest must still exist.
                assert outcome == "recover ok", f"recover cannot get past the dead vTPM stub domain: {outcome}"
                outcome += "; " + repair_dead_vtpm(sim, host.target, allowed)
                whole = True
        RESULTS.append((kind, f"{step} × {comp}", f"{tool}; {outcome}"))
    finally:
        if not whole:
            host.discard()
