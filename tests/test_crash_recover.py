"""Crash at every journaled step: SIGKILL the tool there, run `xen-vtpm recover`, check the host.

For each sequence (snapshot, rollback with its pre-rollback safety snapshot, save, restore, delete) and
each step the coordinator journals (its step table, xen_vtpm/core/steps.py), plus the store's internal
crash points during every checkpoint write (snapshot, safety snapshot, save) and a delete, one case:

1. move the VM/vTPM pair on (memory marker + PCR 16) so old and new states differ,
2. run the command through the test hook (tests/faulty_tool.py) with a crash point kind:step (or
   store:point) and require that it really died by SIGKILL there,
3. `xen-vtpm recover`, then crash_helpers.check_host: the pair is one allowed state (old or new, never
   mixed or fresh), the vTPM's last boot loaded its state, nothing paused/leaked, verify + audit pass,
4. if recover kept a checkpoint / save file, prove it holds the right pair by using it.

Every case runs on a vTPM stub domain and on an swtpm in dom0 behind an HVM guest's device model
(the rollback cases also on Xen's TPM 1.2 stub): the same steps, each backend's own checks
(crash_helpers).  One simulated host per sequence type and vTPM; recover leaves it consistent, so the
next step runs on it.  The default run takes a representative subset (on the stub domain: first and
last step of each sequence, its points of no return, two store points, one chain of killed recovers; on
swtpm: ``SWTPM_REPRESENTATIVE``); `make crash` (`pytest -m crash_full`) runs the rest of the matrix.
XEN_VTPM_CRASH_TABLE=FILE writes the outcome table there.
"""
from __future__ import annotations

import contextlib

import crash_helpers as ch
import pytest
from crash_helpers import GUEST
from e2e_helpers import VTPMS
from sim_fixture import start_sim_host, stop_sim_host

from xen_vtpm.core import steps as S

STEPS = ch.coordinator_steps()
RESULTS: list[tuple[str, str, str]] = []
KILLED_RECOVER = "+recover-killed"

# (sequence, label) -> bug reference in docs/reliability.md; such cases run as xfail(strict=True).
KNOWN_BUGS: dict[tuple[str, str], str] = {}

# `make test` runs a representative subset (pyproject deselects crash_full); `make crash`
# (`pytest -m crash_full`) runs the rest of the matrix (hours on 2 cores: a nightly job, not every CI run).
FULL_ONLY = pytest.mark.crash_full
NO_RETURN = ("commit", "destroy-guest")
REPRESENTATIVE_STORE = ("write.committed", "delete.committed")
# Inside advance-head, after the audit record: the one crash that leaves an operation the audit log
# records as ended, i.e. recover's "closed" branch; and the undo of a capture, killed part way.
REPRESENTATIVE_EXTRA = {("snapshot", f"advance-head:{S.AUDITED}"), ("snapshot", "manager-checkpoint" + KILLED_RECOVER)}
# Same code as a representative case already in the default run (the safety snapshot is
# _snapshot_locked again; --paused only changes the last restore step).
FULL_ONLY_ALSO = {("pre-rollback", "commit"), ("restore --paused", "stop-vtpm")}

# The vTPMs every sequence runs on (rollback: every one of VTPMS) and the prefix of their case ids.
STUB, TPM12, SWTPM = "stubdom-tpm2.0", "stubdom-tpm1.2", "swtpm"
BACKENDS = (STUB, SWTPM)
ID_PREFIX = {STUB: "", TPM12: "tpm1.2-", SWTPM: "swtpm-"}
# On swtpm the default run takes a handful (the same code as the stub domain's apart from the backend's
# own steps: its capture, stop/put-back/start, and the restart before a restore); the rest is crash_full.
SWTPM_REPRESENTATIVE = {("rollback", "destroy-guest"), ("rollback", "start-vtpm"),
                        ("snapshot", "manager-checkpoint")}


def cases(kind: str, *, store: bool = False, chained: bool = True, seq: str | None = None,
          extra: tuple = (), vtpms: tuple[str, ...] = BACKENDS) -> list:
    """One case per vTPM of `vtpms` (``vtpm``: the class's host on it) and crash point of `kind`
    (each journaled step and each point between two writes of one step, core/steps.py) and per store
    crash point if `store`; `chained` adds, per journaled step, a case whose recover is itself killed at
    every point it reaches, one per run, before a last, clean recover (every step's recover journals at
    least one step or passes one point; asserted)."""
    seq = seq or kind
    steps = STEPS[kind]
    labels = [(p, p in (steps[0], steps[-1]) or p in NO_RETURN) for p in ch.crash_points(kind)]
    if store:
        labels += [(f"store:{p}", p in REPRESENTATIVE_STORE) for p in ch.STORE_POINTS[kind]]
    if chained:
        labels += [(s + KILLED_RECOVER, kind == "rollback" and s == steps[0]) for s in steps]
    params = []
    for vtpm in vtpms:
        for label, representative in labels:
            if vtpm == SWTPM:
                representative = (seq, label) in SWTPM_REPRESENTATIVE
            elif vtpm == TPM12 and seq == "pre-rollback":
                representative = False   # the safety snapshot: a vTPM's TPM version matters only at its restart
            else:
                representative = (representative or (seq, label) in REPRESENTATIVE_EXTRA) \
                    and (seq, label) not in FULL_ONLY_ALSO
            marks = [] if representative else [FULL_ONLY]
            bug = KNOWN_BUGS.get((seq, label))
            if bug:
                marks.append(pytest.mark.xfail(strict=True, reason=bug))
            params.append(pytest.param(vtpm, label, *extra, id=f"{ID_PREFIX[vtpm]}{seq}:{label}", marks=marks))
    return params


def on_vtpms(vtpms: tuple[str, ...] = BACKENDS) -> pytest.MarkDecorator:
    """A one-off test of a class, on each of `vtpms` (its host on it); on swtpm crash_full."""
    return pytest.mark.parametrize("vtpm", [pytest.param(v, id=v, marks=[FULL_ONLY] if v == SWTPM else [])
                                            for v in vtpms])


def crash_and_recover(sim: ch.SimHost, kind: str, label: str, *argv: str) -> tuple[dict, str]:
    """Kill `xen-vtpm ARGV` at the label's crash point, then recover; returns the crashed op and a note.
    Every kill is proved (SIGKILL and the hook's log line at that point)."""
    base = label.removesuffix(KILLED_RECOVER)
    if base.startswith("store:"):
        ch.crash(sim, *argv, store_at=base[len("store:"):])
    else:
        ch.crash(sim, *argv, at=f"{kind}:{base}")
    op = ch.last_op(sim)
    assert op["kind"] == kind, f"the last journaled op is a {op['kind']}, expected {kind}"
    if base == label:
        ch.recover(sim)
        note = ""
    else:
        kills = ch.recover(sim, kill_at=ch.recover_points(kind))
        assert kills, f"{kind}:{base}: recover passed none of its crash points, so it could not be killed"
        note = f" (recover itself killed {len(kills)}x first: {', '.join(k.split(':', 1)[1] for k in kills)})"
    if base.startswith(f"{S.ADVANCE_HEAD}:"):
        # Killed after the audit record that ends the op: recover must close it, never run it again.
        outcome = ch.op_outcome(sim, op["op_id"])
        assert outcome.startswith("closed"), f"op {op['op_id']} after a crash at {base}: outcome {outcome!r}"
    return op, note


@pytest.fixture(scope="module", autouse=True)
def report_table():
    yield
    ch.report(RESULTS, "XEN_VTPM_CRASH_TABLE")


def new_host(tmp_path_factory, vtpm: str = STUB) -> ch.SimHost:
    sim = start_sim_host(tmp_path_factory.mktemp("crash") / "h")
    try:
        sim.tool("init")
        ch.prime_host(sim, vtpm)
    except BaseException:
        stop_sim_host(sim)
        raise
    return sim


class HostHolder:
    """One simulated host per sequence type, reused across its steps.  A case that fails may leave the
    host wedged (that is what it found); the next case then gets a fresh host instead of a cascade."""

    def __init__(self, factory, setup=None, vtpm: str = STUB) -> None:
        self.factory, self.setup, self.vtpm = factory, setup, vtpm
        self.sim: ch.SimHost | None = None
        self.broken = False
        self.extra: dict = {}

    @contextlib.contextmanager
    def case(self):
        if self.sim is not None and self.broken:
            self.close()
        try:
            if self.sim is None:
                self.sim = new_host(self.factory, self.vtpm)
                self.broken = False
                self.extra = self.setup(self.sim) if self.setup else {}
            yield self.sim
        except BaseException:
            self.broken = True
            raise

    def close(self) -> None:
        if self.sim is not None:
            sim, self.sim = self.sim, None
            stop_sim_host(sim)


@pytest.fixture(scope="class")
def holders(request, tmp_path_factory):
    """One host per class and vTPM, made when a case first needs it and kept for the class (the cases
    of one class alternate between vTPMs, so a parametrized class-scoped fixture would be rebuilt)."""
    made: dict[str, HostHolder] = {}

    def holder(vtpm: str) -> HostHolder:
        if vtpm not in made:
            made[vtpm] = HostHolder(tmp_path_factory, getattr(request.cls, "setup_host", None), vtpm)
        return made[vtpm]
    try:
        yield holder
    finally:
        for h in made.values():
            h.close()


@pytest.fixture
def host(holders, vtpm):
    """The class's host on the case's vTPM (``vtpm``: one of VTPMS, a parameter of every case)."""
    return holders(vtpm)


def record(kind: str, label: str, outcome: str) -> None:
    RESULTS.append((kind, label, outcome))


def test_discovered_steps_match_a_clean_run(tmp_path_factory, tmp_path):
    """The step table (core/steps.py) is exactly what clean runs journal (op_steps), and every crash
    point the matrix uses — each step and each point between two writes of one step — is passed by a
    clean run in that order (the hook's trace), so no crash case can name a point the code lacks."""
    sim = new_host(tmp_path_factory)
    log = tmp_path / "trace.log"
    traced = ch.faulty_argv(log=log, trace=True)
    try:
        for argv in (["snapshot", GUEST, "--name", "t"], ["rollback", GUEST, "t", "--yes"],
                     ["save", GUEST, str(tmp_path / "g.save")], None, ["restore", str(tmp_path / "g.save")],
                     ["delete", "t"], ["snapshot", GUEST, "--name", "t2"], ["keep", "t2"], ["unkeep", "t2"],
                     # removes the safety checkpoint: every delete step
                     ["prune", GUEST, "--keep-last", "1"]):
            if argv is None:
                ch.advance_vtpm_nv(sim)     # the vTPM moves on: restore must put it back (all its steps)
            else:
                sim.run([*traced, *argv], timeout=120)
        seen = ch.recorded_steps(ch.state_dir(sim))
    finally:
        stop_sim_host(sim)
    local = {kind: steps for kind, steps in STEPS.items() if kind not in S.MOVES}   # moves: test_migrate_crash.py
    for kind, steps in local.items():
        assert seen.get(kind), f"no clean {kind} was journaled"
        assert seen[kind][-1] == steps, f"{kind}: journal recorded {seen[kind][-1]}, source lists {steps}"
    assert set(seen) == set(local), f"journaled kinds {sorted(seen)} vs covered {sorted(local)}"
    passed = [line.split(" ")[1] for line in ch.hook_log(log)]
    for kind in local:
        points = [p.split(":", 1)[1] for p in passed if p.split(":", 1)[0] == kind]
        # Each run of the kind starts at ``begin`` (the operation journaled, no step yet).
        runs = [run.strip().split("\n") for run in "\n".join(points).split("begin\n") if run]
        assert points[0] == "begin" and runs, f"{kind}: a clean run passed {points}"
        for run in runs:
            assert run == ch.crash_points(kind), f"{kind}: a clean run passed {run}"


class TestSnapshot:
    @pytest.mark.parametrize("vtpm,label", cases("snapshot", store=True))
    def test_crash(self, host, label):
        with host.case() as sim:
            cur = ch.new_state(sim)
            name = "c-" + label.replace(":", "-").replace(".", "-").replace("+", "-")
            op, note = crash_and_recover(sim, "snapshot", label, "snapshot", GUEST, "--name", name)
            assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
            ids = ch.checkpoint_ids(sim)
            if name in ids:
                assert ids[name] == op["checkpoint"]
                ch.rolls_back_to(sim, name, cur)
                sim.tool("delete", name)
                outcome = "finished: checkpoint kept, rolls back to its pair"
            else:
                assert not ch.backend_holds(sim, op["checkpoint"]), "the vTPM backend kept the undone checkpoint"
                outcome = "undone: no checkpoint, manager entry gone"
            record(f"snapshot ({host.vtpm})", label, f"ok — {outcome}{note}")

    @on_vtpms()
    def test_next_command_recovers_first(self, host):
        """No explicit recover: the admin just runs the next command, which must recover first
        (here the crash left guest1 paused, which a snapshot would otherwise refuse)."""
        with host.case() as sim:
            cur = ch.new_state(sim)
            ch.crash(sim, "snapshot", GUEST, "--name", "crashed", at="snapshot:manager-checkpoint")
            sim.tool("snapshot", GUEST, "--name", "next")
            assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
            assert "crashed" not in ch.checkpoint_ids(sim)
            ch.rolls_back_to(sim, "next", cur)
            sim.tool("delete", "next")
            record(f"snapshot, then snapshot ({host.vtpm})", "manager-checkpoint",
                   "ok — the next snapshot undid the crashed one first")

    @on_vtpms()
    def test_checks_catch_an_unrecovered_crash(self, host):
        """Negative control: without recover, the checks must see the crash (paused domains, open op)."""
        with host.case() as sim:
            ch.new_state(sim)
            ch.crash(sim, "snapshot", GUEST, "--name", "unrecovered", at="snapshot:manager-checkpoint")
            with pytest.raises(AssertionError, match="unfinished operations"):
                ch.no_unfinished_ops(sim)
            with pytest.raises(AssertionError, match="left paused"):
                ch.no_paused_domains(sim)
            ch.recover(sim)


# Every synchronized-rollback case runs on every vTPM: the TPM 2.0 stand-in and Xen's own TPM 1.2 in a
# stub domain, and swtpm in dom0.
class TestRollback:
    @staticmethod
    def setup_host(sim: ch.SimHost) -> dict:
        pair = ch.new_state(sim)
        sim.tool("snapshot", GUEST, "--name", "target")
        return {"target": pair}

    @pytest.mark.parametrize("vtpm,label", cases("pre-rollback", store=True, vtpms=tuple(VTPMS)))
    def test_crash_in_safety_snapshot(self, host, label):
        with host.case() as sim:
            target = host.extra["target"]
            cur = ch.new_state(sim)
            before = set(ch.checkpoint_ids(sim))
            op, note = crash_and_recover(sim, "pre-rollback", label, "rollback", GUEST, "target", "--yes")
            # The rollback itself never began: the VM must still be in its old state.
            assert ch.check_host(sim, {"old": cur, "target": target}) == "old"
            kept = {n: i for n, i in ch.checkpoint_ids(sim).items() if n not in before}
            if kept:
                assert list(kept.values()) == [op["checkpoint"]]
                ch.rolls_back_to(sim, op["checkpoint"], cur)
                sim.tool("delete", op["checkpoint"])
                outcome = "old state; safety checkpoint kept, rolls back to its pair"
            else:
                assert not ch.backend_holds(sim, op["checkpoint"]), "the vTPM backend kept the undone checkpoint"
                outcome = "old state; safety checkpoint undone"
            record(f"pre-rollback ({host.vtpm})", label, f"ok — {outcome}{note}")

    @pytest.mark.parametrize("vtpm,label", cases("rollback", vtpms=tuple(VTPMS)))
    def test_crash(self, host, label):
        with host.case() as sim:
            target = host.extra["target"]
            cur = ch.new_state(sim)
            _, note = crash_and_recover(sim, "rollback", label, "rollback", GUEST, "target", "--yes",
                                        "--no-safety-checkpoint")
            state = ch.check_host(sim, {"old": cur, "new": target})
            record(f"rollback ({host.vtpm})", label, "ok — " + {"new": "rolled forward to the checkpoint",
                                                                 "old": "undone: old state kept"}[state] + note)

    @on_vtpms(tuple(VTPMS))
    def test_next_command_recovers_first(self, host):
        """A rollback cut short after its point of no return; the next command finishes it first."""
        with host.case() as sim:
            cur = ch.new_state(sim)
            ch.crash(sim, "rollback", GUEST, "target", "--yes", "--no-safety-checkpoint",
                     at="rollback:put-back-vtpm")
            sim.tool("snapshot", GUEST, "--name", "next")
            assert ch.check_host(sim, {"old": cur, "new": host.extra["target"]}) == "new"
            sim.tool("delete", "next")
            record(f"rollback, then snapshot ({host.vtpm})", "put-back-vtpm",
                   "ok — the snapshot finished the rollback first")


class TestSave:
    @pytest.mark.parametrize("vtpm,label", cases("save", store=True))
    def test_crash(self, host, tmp_path, label):
        with host.case() as sim:
            cur = ch.new_state(sim)
            path = tmp_path / "guest.save"
            op, note = crash_and_recover(sim, "save", label, "save", GUEST, str(path))
            state = ch.check_host(sim, {"old": cur}, guest_expected=None)
            if state == "absent":
                # Finished as xl save: the file and its binding must give back exactly the saved pair.
                assert path.is_file(), f"{GUEST} is gone but {path.name} does not exist"
                restored = sim.tool("restore", str(path), check=False)
                assert restored.returncode == 0, f"guest gone, save file not restorable: {restored.stderr.strip()}"
                assert ch.check_host(sim, {"saved": cur}) == "saved"
                outcome = "finished: guest saved, restore gives its pair back"
            else:
                # Undone: the guest runs on, so the save must have left nothing behind.
                assert op["checkpoint"] not in ch.checkpoint_ids(sim).values(), \
                    "the guest runs on, but the undone save's checkpoint is still in the catalog"
                assert not ch.backend_holds(sim, op["checkpoint"]), "the vTPM backend kept the undone checkpoint"
                outcome = "undone: guest runs on in its old state, no checkpoint, manager entry gone"
            record(f"save ({host.vtpm})", label, f"ok — {outcome}{note}")


class TestRestore:
    @pytest.mark.parametrize("vtpm,label,paused", cases("restore", extra=(False,))
                             + cases("restore", chained=False, seq="restore --paused", extra=(True,)))
    def test_crash(self, host, tmp_path, label, paused):
        with host.case() as sim:
            saved = ch.new_state(sim)
            path = tmp_path / "guest.save"
            sim.tool("save", GUEST, str(path))
            # The vTPM moves on without its guest (a PCR and its disk image), so restore must put it back.
            ch.move_vtpm_on_while_saved(sim, path)
            flags = ["--paused"] if paused else []
            _, note = crash_and_recover(sim, "restore", label, "restore", str(path), *flags)
            state = ch.check_host(sim, {"saved": saved}, guest_expected=None, paused=paused)
            if state == "absent":
                sim.tool("restore", str(path), *flags)
                assert ch.check_host(sim, {"saved": saved}, paused=paused) == "saved"
                outcome = "undone: guest not restored, the save file still restores"
            else:
                outcome = "finished: guest restored with its saved pair" + (", paused" if paused else "")
            if paused:
                sim.xl("unpause", GUEST)
                ch.wait_connected(sim, GUEST)
            record(f"restore{' --paused' if paused else ''} ({host.vtpm})", label, f"ok — {outcome}{note}")


class TestDelete:
    @pytest.mark.parametrize("vtpm,label", cases("delete", store=True))
    def test_crash(self, host, label):
        with host.case() as sim:
            taken = ch.new_state(sim)
            name = "d-" + label.replace(":", "-").replace(".", "-").replace("+", "-")
            sim.tool("snapshot", GUEST, "--name", name)
            ckpt = ch.checkpoint_ids(sim)[name]
            cur = ch.new_state(sim)
            _, note = crash_and_recover(sim, "delete", label, "delete", name)
            assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
            if name in ch.checkpoint_ids(sim):
                ch.rolls_back_to(sim, name, taken)
                sim.tool("delete", name)
                outcome = "undone: checkpoint kept, rolls back to its pair"
            else:
                assert not ch.backend_holds(sim, ckpt), "the vTPM backend kept the deleted checkpoint"
                outcome = "finished: checkpoint and manager entry gone"
            record(f"delete ({host.vtpm})", label, f"ok — {outcome}{note}")


def every_step(kind: str, store: bool = False) -> list:
    """``cases`` with every journaled step (and the first store point) in the default run: the day-two
    sequences are short, so `make test` kills each of their steps; chained recovers stay in `make crash`."""
    out = []
    for p in cases(kind, store=store):
        vtpm, label = p.values[:2]
        full = vtpm == SWTPM or label.endswith(KILLED_RECOVER) or \
            label.startswith("store:") and label[6:] not in REPRESENTATIVE_STORE
        out.append(p if full else pytest.param(*p.values, id=p.id, marks=[m for m in p.marks if m is not FULL_ONLY]))
    return out


class TestPrune:
    """prune with `--keep-last 1` removes the older of two new snapshots; a third, marked with `keep`,
    stays.  Once journaled, a prune is finished by recover: the checkpoint and its manager entry are
    gone, the others intact."""

    @staticmethod
    def setup_host(sim: ch.SimHost) -> dict:
        sim.tool("snapshot", GUEST, "--name", "marked")
        sim.tool("keep", "marked")
        return {}

    @pytest.mark.parametrize("vtpm,label", every_step("prune", store=True))
    def test_crash(self, host, label):
        with host.case() as sim:
            tag = label.replace(":", "-").replace(".", "-").replace("+", "-")
            old, new = f"old-{tag}", f"new-{tag}"
            for name in (old, new):
                ch.new_state(sim)
                sim.tool("snapshot", GUEST, "--name", name)
            cur = ch.new_state(sim)
            before = ch.checkpoint_ids(sim)
            _, note = crash_and_recover(sim, "prune", label, "prune", GUEST, "--keep-last", "1")
            assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
            after = ch.checkpoint_ids(sim)
            assert set(after) == {"marked", new}, f"after recover: {sorted(after)}"
            assert not ch.backend_holds(sim, before[old]), "the pruned checkpoint's manager entry leaked"
            assert all(ch.backend_keeps(sim, before[n]) for n in after), "a kept checkpoint lost its entry"
            assert [c["kept"] for c in ch.tool_json(sim, "checkpoints", GUEST)] == [True, False]
            sim.tool("delete", new)
            record(f"prune ({host.vtpm})", label,
                   f"ok — finished: the older gone with its manager entry, the rest intact{note}")


class TestKeep:
    """A mark set or cleared, with the head that binds it, or neither: recover finishes it, and every
    check of the catalog (verify, audit --verify) passes afterwards."""

    @staticmethod
    def setup_host(sim: ch.SimHost) -> dict:
        sim.tool("snapshot", GUEST, "--name", "k")
        return {}

    @pytest.mark.parametrize("vtpm,label,kind", [pytest.param(*p.values, k, id=p.id, marks=p.marks)
                                                 for k in ("keep", "unkeep") for p in every_step(k)])
    def test_crash(self, host, label, kind):
        with host.case() as sim:
            sim.tool("unkeep" if kind == "keep" else "keep", "k")    # the state the command changes
            cur = ch.new_state(sim)
            _, note = crash_and_recover(sim, kind, label, kind, "k")
            assert ch.check_host(sim, {"unchanged": cur}) == "unchanged"
            (row,) = ch.tool_json(sim, "checkpoints", GUEST)
            assert row["kept"] is (kind == "keep"), f"{kind} not finished by recover: {row}"
            record(f"{kind} ({host.vtpm})", label,
                   f"ok — finished: {'marked' if kind == 'keep' else 'unmarked'}, bound to the head{note}")
