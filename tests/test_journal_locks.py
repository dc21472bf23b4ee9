"""The coordinator's write-ahead journal and per-VM locks, on a real SQLite file and real flock."""
import multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest

from xen_vtpm import faults
from xen_vtpm.core.journal import Journal, OpParams
from xen_vtpm.core.locks import VmLock
from xen_vtpm.errors import IntegrityError, Locked

KEY = bytes(range(32))


def test_steps_survive_a_reopen_and_finished_ops_disappear(tmp_path):
    j = Journal(tmp_path / "catalog.sqlite", KEY)
    op = j.begin("snapshot", "vm-1", OpParams(guest="g1", checkpoint="c1"))
    j.step(op, "guest-save")
    j.step(op, "manager-checkpoint", extra=1)
    done = j.begin("delete", "vm-2", OpParams(guest="g2", checkpoint="c2"))
    j.finish(done, "done")
    j.close()
    again = Journal(tmp_path / "catalog.sqlite", KEY).unfinished()
    assert [(o.kind, o.vm, o.last_step) for o in again] == [("snapshot", "vm-1", "manager-checkpoint")]
    assert again[0].params == OpParams(guest="g1", checkpoint="c1")
    assert again[0].data("manager-checkpoint") == {"extra": 1}
    assert again[0].reached("guest-save") and not again[0].reached("commit")


def test_crash_point_kills_right_after_the_step_is_durable(tmp_path):
    db = tmp_path / "catalog.sqlite"
    code = textwrap.dedent(f"""
        import os, signal
        from xen_vtpm import faults
        from xen_vtpm.core.journal import Journal, OpParams
        faults.install(lambda name: name == "snapshot:guest-save" and os.kill(os.getpid(), signal.SIGKILL))
        j = Journal({str(db)!r}, {KEY!r})
        op = j.begin("snapshot", "vm-1", OpParams(guest="g"))
        j.step(op, "guest-save")
        j.step(op, "manager-checkpoint")
        print("not reached")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == -9 and "not reached" not in proc.stdout
    (op,) = Journal(db, KEY).unfinished()
    assert op.last_step == "guest-save"


def _hold(path, vm, ready, release):
    with VmLock(path, vm, "guest1"):
        ready.set()
        release.wait(10)


def test_lock_excludes_a_second_holder_and_is_freed_when_the_holder_dies(tmp_path):
    ctx = multiprocessing.get_context("fork")
    ready, release = ctx.Event(), ctx.Event()
    holder = ctx.Process(target=_hold, args=(tmp_path, "vm-1", ready, release))
    holder.start()
    try:
        assert ready.wait(10)
        with pytest.raises(Locked, match=r"guest1: locked by pid \d+"):
            with VmLock(tmp_path, "vm-1", "guest1"):
                pass
        with VmLock(tmp_path, "vm-2", "guest2"):   # other VMs are independent
            pass
    finally:
        holder.kill()
        holder.join()
    with VmLock(tmp_path, "vm-1", "guest1"):       # killed holder: the kernel dropped the lock
        pass


def test_fault_hook_runs_its_command_at_the_step_then_carries_on(tmp_path):
    db, marker = tmp_path / "catalog.sqlite", tmp_path / "ran"
    code = textwrap.dedent(f"""
        import os, pathlib
        from xen_vtpm import faults
        from xen_vtpm.core.journal import Journal, OpParams
        faults.install(lambda name: name == "snapshot:manager-checkpoint" and pathlib.Path({str(marker)!r}).touch())
        j = Journal({str(db)!r}, {KEY!r})
        op = j.begin("snapshot", "vm-1", OpParams(guest="g"))
        j.step(op, "guest-save")
        print("marker before manager-checkpoint:", os.path.exists({str(marker)!r}))
        j.step(op, "manager-checkpoint")
        print("marker after:", os.path.exists({str(marker)!r}))
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["marker before manager-checkpoint: False", "marker after: True"]


def test_points_inside_a_step_are_named_for_the_hook_and_journal_nothing(tmp_path):
    seen: list[str] = []
    faults.install(seen.append)
    try:
        j = Journal(tmp_path / "catalog.sqlite", KEY)
        op = j.begin("delete", "vm-1", OpParams(guest="g"))
        j.step(op, "delete-store")
        j.passed(op, "delete-store", "deleted")
        j.step(op, "advance-head")
        j.passed(op, "advance-head", "audited")
    finally:
        faults.install(None)
    assert seen == ["delete:begin", "delete:delete-store", "delete:delete-store:deleted", "delete:advance-head",
                    "delete:advance-head:audited"]
    (again,) = Journal(tmp_path / "catalog.sqlite", KEY).unfinished()
    assert [name for name, _ in again.steps] == ["delete-store", "advance-head"]


def _tamper(db, sql, *args):
    import sqlite3
    con = sqlite3.connect(db)
    con.execute(sql, args)
    con.commit()
    con.close()


@pytest.mark.parametrize("forge", [
    # a rollback op an attacker inserted, with a MAC made under another key
    lambda j, db: _tamper(db, "INSERT INTO op_journal(kind, vm, started, params, mac) VALUES "
                              "('rollback', 'vm-1', 0, '{\"checkpoint\": \"old\"}', ?)", b"\0" * 32),
    # an unfinished op's parameters edited (point it at another checkpoint)
    lambda j, db: _tamper(db, "UPDATE op_journal SET params = '{\"checkpoint\": \"old\"}' WHERE finished IS NULL"),
    # a step inserted into an unfinished op
    lambda j, db: _tamper(db, "INSERT INTO op_steps(op_id, seq, step, data, at, mac) "
                              "SELECT op_id, 2, 'destroy-guest', '{}', 0, x'00' FROM op_journal "
                              "WHERE finished IS NULL"),
    # a step removed from the middle of an unfinished op
    lambda j, db: _tamper(db, "DELETE FROM op_steps WHERE seq = 0 AND op_id IN "
                              "(SELECT op_id FROM op_journal WHERE finished IS NULL)"),
    # a finished rollback marked unfinished so that recover would run it again
    lambda j, db: _tamper(db, "UPDATE op_journal SET finished = NULL WHERE kind = 'rollback'"),
], ids=["forged-op", "edited-params", "forged-step", "removed-step", "unfinished-again"])
def test_recover_refuses_a_forged_or_edited_journal(tmp_path, forge):
    db = tmp_path / "catalog.sqlite"
    j = Journal(db, KEY)
    done = j.begin("rollback", "vm-1", OpParams(guest="g1", checkpoint="c0"))
    j.step(done, "destroy-guest")
    j.finish(done, "done")
    live = j.begin("snapshot", "vm-1", OpParams(guest="g1", checkpoint="c1"))
    j.step(live, "guest-save")
    j.step(live, "manager-checkpoint")
    assert [o.op_id for o in j.unfinished()] == [live.op_id]
    forge(j, db)
    with pytest.raises(IntegrityError, match="journal .*(MAC|edited|removed)"):
        Journal(db, KEY).unfinished()


def test_another_hosts_key_cannot_read_the_journal_as_valid(tmp_path):
    j = Journal(tmp_path / "catalog.sqlite", KEY)
    j.step(j.begin("snapshot", "vm-1", OpParams(guest="g1")), "guest-save")
    with pytest.raises(IntegrityError, match="fails its MAC"):
        Journal(tmp_path / "catalog.sqlite", bytes(32)).unfinished()
