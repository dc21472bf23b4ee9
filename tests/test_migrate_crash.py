"""Kill either side of a move at every journaled step, `recover` both hosts, check both.

Source steps (`migrate`) and destination steps (`migrate-receive`) come from the step table
(xen_vtpm/core/steps.py); every case moves with --with-checkpoints, so the checkpoint steps act too, and
runs for each backend: guest1's vTPM a stub domain, or an swtpm behind its device model (whose state,
key and record, and swtpm process, must then be on one host only).
The source is run through the test hook (tests/faulty_tool.py) and must die by SIGKILL at its step;
the destination is killed through a one-shot `xen-vtpm` wrapper in that host's bin/ (the `sim ssh`
stand-in runs the remote command by name with the host's PATH, as ssh would), its kill proved by the
hook's log.  After `recover` on both hosts:

* the guest and its vTPM exist on exactly one host, running, with the (memory marker, PCR 16) pair
  they had, their vTPM booted from its state (never fresh);
* the other host has no guest, no vTPM stub domain, image, cfg or usable manager entry;
* the moved checkpoint is on the guest's host only, and still rolls it back;
* nothing is unfinished or left over on either host, its bystander guest is untouched, and
  `verify --all` and `audit --verify` pass on both.

Before the source's "send" step and before the destination's "commit" step, the move is undone;
from them on it finishes.  Every case moves a guest between two hosts, minutes on two cores: the whole
file runs under `make crash` (crash_full); `make test` keeps the end-to-end moves of test_migrate.py.
"""
from __future__ import annotations

import contextlib
import time
from pathlib import Path

import crash_helpers as ch
import pytest
from crash_helpers import BYSTANDER, GUEST
from e2e_helpers import assert_one_line_error
from move_helpers import FAULTY_TOOL, SSH, VENV_BIN, live_entries, manager_table, ssh_wrapper, vtpm_uuid, with_venv
from sim_fixture import start_sim_host, stop_sim_host, swtpm_home

from xen_vtpm.core import steps
from xen_vtpm_sim import domains, host

SOURCE = list(steps.SEQUENCES[steps.MIGRATE])
DESTINATION = list(steps.SEQUENCES[steps.MIGRATE_IN])
# The first step at which each side can no longer undo the move.
SOURCE_POINT_OF_NO_RETURN = steps.FINISH_SOURCE       # the destination said "committed"
DESTINATION_DECISION = steps.COMMIT
RESULTS: list[tuple[str, str, str]] = []


pytestmark = pytest.mark.crash_full


def cases() -> list:
    return [pytest.param(side, step, id=f"{side}:{step}")
            for side, names in (("source", SOURCE), ("destination", DESTINATION)) for step in names]


def expected(side: str, step: str) -> str:
    names, decisive = (SOURCE, SOURCE_POINT_OF_NO_RETURN) if side == "source" else (DESTINATION, DESTINATION_DECISION)
    return "moved" if names.index(step) >= names.index(decisive) else "stayed"


class Hosts:
    """A (guest1 with a checkpoint, a bystander) and B (a bystander), trusting each other; guest1's vTPM
    is ``vtpm`` (a key of e2e_helpers.VTPMS): a stub domain, or an swtpm behind its device model."""

    def __init__(self, base: Path, vtpm: str = "stubdom-tpm2.0") -> None:
        self.base = base
        self.hook_log = base / "destination-hook.log"   # the destination's kill, proved (faulty_tool --log)
        self.a = start_sim_host(base / "A")
        self.b = start_sim_host(base / "B")
        for sim in (self.a, self.b):
            sim.env = with_venv(sim.env)
            # `sim ssh` runs the remote command with that host's PATH, whose bin/ has its `xen-vtpm`:
            # the wrapper of `arm` takes its place there.
            tool = sim.dir / "bin" / "xen-vtpm"
            tool.rename(tool.with_name("xen-vtpm.real"))
        self.arm(None)
        for name, sim in (("A", self.a), ("B", self.b)):
            sim.tool("init")
            (base / f"{name}.hostkey").write_text(sim.tool("host-key").stdout)
        self.a.tool("trust", "add", "hostB", str(base / "B.hostkey"))
        self.b.tool("trust", "add", "hostA", str(base / "A.hostkey"))
        ch.prime_host(self.a, vtpm)
        ch._vtpms.setdefault(self.b.dir, {})[GUEST] = vtpm      # what guest1's vTPM is once it moved there
        self.b.create_guest(BYSTANDER, memory=16)
        ch._bystanders[self.b.dir] = ch.new_state(self.b, BYSTANDER)
        self.kept = ch.new_state(self.a)
        self.a.tool("snapshot", GUEST, "--name", "kept")

    def arm(self, step: str | None) -> None:
        """The destination's next `migrate-receive` (not an --outcome query) dies at ``step``; once."""
        armed = self.base / "armed"
        self.hook_log.unlink(missing_ok=True)
        with contextlib.suppress(FileNotFoundError):
            armed.rmdir()
        crash = (f'if [ -n "{step or ""}" ] && [ "$1" = migrate-receive ] && [ "$2" != --outcome ] '
                 f'&& mkdir {armed} 2>/dev/null; then\n'
                 f'    exec {VENV_BIN}/python {FAULTY_TOOL} --crash-at migrate-in:{step} --log {self.hook_log} '
                 '-- "$@"\nfi\n')
        for sim in (self.a, self.b):
            ssh_wrapper(sim.dir / "bin", "xen-vtpm", crash + f'exec {sim.dir / "bin" / "xen-vtpm.real"} "$@"\n')

    def where(self) -> ch.SimHost:
        return self.a if GUEST in ch.xl_rows(self.a) else self.b

    def close(self) -> None:
        for sim in (self.a, self.b):
            stop_sim_host(sim)


@contextlib.contextmanager
def _hosts(base: Path, vtpm: str):
    h = Hosts(base, vtpm)
    try:
        yield h
    finally:
        h.close()


@pytest.fixture(scope="module")
def hosts(tmp_path_factory):
    with _hosts(tmp_path_factory.mktemp("mvcrash"), "stubdom-tpm2.0") as h:
        yield h
    ch.report(RESULTS, "XEN_VTPM_MOVE_CRASH_TABLE")


@pytest.fixture(scope="module")
def swtpm_hosts(tmp_path_factory):
    with _hosts(tmp_path_factory.mktemp("mvcrash-sw"), "swtpm") as h:
        yield h


def _uuid(sim: ch.SimHost) -> str:
    return swtpm_home(sim).name if ch.backend(sim) == "swtpm" else vtpm_uuid(sim)


def _receivers_gone(sim: ch.SimHost) -> None:
    """A source killed mid-move leaves its `migrate-receive` behind until that one decides."""
    deadline = time.monotonic() + 60
    while any(b"migrate-receive" in Path(f"/proc/{pid}/cmdline").read_bytes()
              for pid in domains.owned_pids(sim.dir) if Path(f"/proc/{pid}").exists()):
        assert time.monotonic() < deadline, "the destination's migrate-receive never ended"
        time.sleep(0.2)


def _gone_from(sim: ch.SimHost, uuid: str, kept_ckpt: str) -> None:
    """No trace of the guest a host gave away (or never got)."""
    ch.no_unfinished_ops(sim)
    rows = ch.xl_rows(sim)
    assert GUEST not in rows and f"vtpm-{GUEST}" not in rows, rows
    assert not [p.name for p in (sim.dir / "images").glob(f"vtpm-{GUEST}.*")]
    assert uuid not in live_entries(sim), "a usable manager entry of the moved vTPM is left"
    # swtpm: no state, key or record of the vTPM, and no swtpm of it.
    assert not (sim.dir / "state" / "swtpm" / uuid).exists()
    assert not list((sim.dir / host.SWTPM_RUN).glob(f"{uuid}.*"))
    assert kept_ckpt not in ch.checkpoint_ids(sim).values()
    ch.bystander_untouched(sim)
    sim.tool("verify", "--all")
    sim.tool("audit", "--verify")
    ch.no_stray_processes(sim)


def _move_back(h: Hosts) -> None:
    if h.where() is h.b:
        h.b.tool("migrate", "-s", SSH, "--with-checkpoints", GUEST, str(h.a.dir), timeout=300)


@pytest.mark.parametrize("backend", ["stubdom", "swtpm"])
@pytest.mark.parametrize("side,step", cases())
def test_kill_a_side_of_a_move(request, backend, side, step):
    h = request.getfixturevalue("hosts" if backend == "stubdom" else "swtpm_hosts")
    _move_back(h)
    cur = ch.new_state(h.a)
    uuid, kept = _uuid(h.a), ch.checkpoint_ids(h.a)["kept"]
    argv = ["migrate", "-s", SSH, "--with-checkpoints", GUEST, str(h.b.dir)]
    if side == "source":
        ch.crash(h.a, *argv, at=f"migrate:{step}")
        _receivers_gone(h.b)
    else:
        h.arm(step)
        proc = h.a.tool(*argv, check=False, timeout=300)
        assert (h.base / "armed").is_dir(), "the destination's crash point was never armed"
        assert f"reached migrate-in:{step} crash" in h.hook_log.read_text(), "the destination was not killed there"
        h.arm(None)
        # The source asks the destination, whose --outcome runs its recover first: it finishes or refuses.
        assert proc.returncode in (0, 11), proc.stderr
    ch.recover(h.a)
    ch.recover(h.b)
    where = h.where()
    other = h.b if where is h.a else h.a
    outcome = "moved" if where is h.b else "stayed"
    assert outcome == expected(side, step), f"killed at {side}:{step}: the guest {outcome}"
    assert ch.check_host(where, {"current": cur}) == "current"
    _gone_from(other, uuid, kept)
    # The moved checkpoint went with the guest and still rolls it back to its pair.
    ch.new_state(where)
    where.tool("rollback", GUEST, "kept", "--yes", "--no-safety-checkpoint")
    assert ch.check_host(where, {"kept": h.kept}) == "kept"
    RESULTS.append((f"migrate {backend} ({side})", step, f"ok — {outcome}; the other host holds nothing"))


def test_the_step_table_is_what_a_move_journals(hosts):
    h = hosts
    _move_back(h)
    h.a.tool("migrate", "-s", SSH, "--with-checkpoints", GUEST, str(h.b.dir), timeout=300)
    source = ch.recorded_steps(ch.state_dir(h.a))[steps.MIGRATE][-1]
    destination = ch.recorded_steps(ch.state_dir(h.b))[steps.MIGRATE_IN][-1]
    assert source == SOURCE and destination == DESTINATION


def test_an_unreachable_destination_leaves_the_move_in_doubt(hosts, tmp_path):
    """The destination dies mid-move and cannot be asked: the source neither deletes nor resumes,
    its other guests are not held up, and `recover` settles the move once the destination answers."""
    h = hosts
    _move_back(h)
    cur = ch.new_state(h.a)
    uuid = vtpm_uuid(h.a)
    reachable = tmp_path / "reachable"
    reachable.touch()
    # The `-s` of this move: the session goes through, an --outcome query only while `reachable` exists.
    ssh = ssh_wrapper(tmp_path, "flaky-ssh", f'case "$*" in *--outcome*) [ -e {reachable} ] || exit 255;; esac\n'
                                             f'exec {SSH} "$@"\n')
    h.arm(steps.START_VTPM)
    reachable.unlink()
    line = assert_one_line_error(h.a.tool("migrate", "-s", ssh, GUEST, str(h.b.dir), check=False, timeout=300))
    assert f"reached migrate-in:{steps.START_VTPM} crash" in h.hook_log.read_text()
    h.arm(None)
    assert "is in doubt" in line and "recover" in line
    # Suspended and parked: neither running on here nor deleted.
    assert "p" in ch.xl_rows(h.a)[GUEST]
    assert manager_table(h.a)[uuid][0] & 0x6 == 0x6
    h.a.tool("snapshot", BYSTANDER, "--name", "not-held-up")          # other guests go on
    h.a.tool("delete", "not-held-up")
    report = ch.tool_json(h.a, "recover")
    assert [r["outcome"] for r in report if r["kind"] == "migrate"][0].startswith("in doubt")
    reachable.touch()
    ch.recover(h.a)
    ch.recover(h.b)
    assert ch.check_host(h.a, {"current": cur}) == "current"
    _gone_from(h.b, uuid, ch.checkpoint_ids(h.a)["kept"])
    RESULTS.append(("migrate, destination unreachable", "start-vtpm", "ok — in doubt, then undone by recover"))
