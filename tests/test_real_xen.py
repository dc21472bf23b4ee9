"""Xen 4.17's vTPM traps (docs/real-xen.md): the simulator reproduces each one, the tool survives each one.

One simulated host per trap (`sim up --xsm none`, `--unprovisioned`, `--console-log none`,
`--release-delay`), plus a correctly configured one for the disks, the stopped vTPM and a busy host TPM.
On each host the first test shows the trap itself on the simulator (a raw vTPM stub domain, driven like
Xen's, reaches the failure Xen reaches), the next ones run `xen-vtpm` against it: it either succeeds with
the guest's memory and vTPM a matching pair, or refuses with exit 4, one line naming the fix, and nothing
changed.  Guests use Xen's own TPM 1.2 vTPM (raw TPM 1.2 commands, tests/tpm12.py) unless said otherwise.
`xen-vtpm doctor` is checked on the same hosts.
"""
from __future__ import annotations

import configparser
import contextlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import tpm12
from e2e_helpers import GUEST, e2e_host, saved_memory_digest
from test_vtpm_stubdom import VtpmLab

from xen_vtpm.vtpm import console
from xen_vtpm_sim import domains


def _trap_host(label: str, **platform: object):
    """A class-scoped fixture: an initialised host reproducing ``platform``'s traps, guest1 on a TPM 1.2
    vTPM that its guest has provisioned."""
    @pytest.fixture(scope="class")
    def host(tmp_path_factory):
        with e2e_host(tmp_path_factory.mktemp(label), tpm_version="1.2", **platform) as h:
            h.provision_tpm()
            yield h
    return host


def _untouched(host) -> tuple:
    """Domains (nothing created or re-created), the vTPM's slots (any command or put-back moves them), the
    stored checkpoints and whether the guest is paused."""
    return host.domids(), host.slot_fingerprints(), host.checkpoint_ids(), host.is_paused(GUEST)


def _doctor(host, expect: int) -> dict:
    """`xen-vtpm --json doctor`: the exit code it must give and its checks by name (a failing doctor prints
    its report, not a one-line error)."""
    proc = subprocess.run([sys.executable, "-m", "xen_vtpm", "--json", "doctor"], env=host.env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == expect, proc.stdout + proc.stderr
    return {c["name"]: c for c in json.loads(proc.stdout)}


def _restart_refused(host, words: tuple[str, ...]) -> None:
    """rollback (after a snapshot) and restore of a saved guest whose vTPM stopped are refused, changing nothing."""
    host.snapshot("before")
    advanced = host.advance_tpm(b"after before")
    state = _untouched(host)
    line = host.fails(4, "rollback", GUEST, "before", "--yes")
    assert all(w in line for w in words), line
    assert _untouched(host) == state and host.tpm_state() == advanced
    host.tool("delete", "before")


def _lab_boots(lab: VtpmLab, name: str) -> list[console.BootVerdict]:
    log = lab.console(name)
    starts = [i for i in range(len(log)) if log.startswith(console.BOOT_START, i)]
    return [console.boot_verdict(log[i:j]) for i, j in zip(starts, [*starts[1:], len(log)], strict=True)]


@pytest.fixture
def lab_of(request):
    labs: list[VtpmLab] = []

    def make(host) -> VtpmLab:
        labs.append(VtpmLab(host.sim))
        return labs[-1]
    yield make
    for lab in labs:
        lab.close()


def _tpm12_populated(lab: VtpmLab, name: str, vtpm_uuid: str | None = None, **kw):
    dom = lab.create(name, vtpm_uuid, version="1.2", **kw)
    tcti = lab.tcti(dom)
    tpm12.nv_define(tcti, 8)
    tpm12.nv_write(tcti, b"identity")
    return dom, tpm12.pubek_digest(tcti)


# --- no XSM ------------------------------------------------------------------------------------------
noxsm = _trap_host("noxsm", xsm="none")


class TestNoXsm:
    def test_a_restarted_vtpm_comes_up_fresh_and_its_first_command_replaces_it(self, noxsm, lab_of):
        lab = lab_of(noxsm)
        dom, ek = _tpm12_populated(lab, "vtpm-x1")
        lab.destroy(dom)
        again = lab.create("vtpm-x1", dom.uuid, version="1.2")
        # find_vtpm_khash cannot read the label without XSM: TPM_FAIL, and the vTPM starts fresh.
        assert again.status.fresh and again.status.manager_rc == 9, again.status
        assert tpm12.pubek_digest(lab.tcti(again)) != ek          # its first command: a new TPM saved itself
        lab.destroy(again)
        third = lab.create("vtpm-x1", dom.uuid, version="1.2")
        assert third.status.fresh                                   # and no restart will ever load again
        lab.destroy(third)

    def test_rollback_is_refused_with_the_fix_and_changes_nothing(self, noxsm):
        _restart_refused(noxsm, ("XSM", "FLASK", "docs/real-xen.md"))

    def test_restore_needing_a_vtpm_start_is_refused_but_an_unmoved_running_vtpm_still_restores(self, noxsm,
                                                                                              tmp_path):
        at_save = noxsm.tpm_state()
        save = tmp_path / "g.save"
        noxsm.tool("save", GUEST, str(save))
        assert noxsm.tool_json("restore", str(save))["vtpm_restored"] is False   # no restart: allowed
        assert noxsm.tpm_state() == at_save
        noxsm.tool("save", GUEST, str(save), "--force")         # the restored guest again, over the old image
        noxsm.xl("destroy", f"vtpm-{GUEST}")                        # as after a host reboot
        before = noxsm.domids()
        line = noxsm.fails(4, "restore", str(save))
        assert "XSM" in line, line
        assert noxsm.domids() == before, "no vTPM may be started that would come up fresh"

    def test_doctor_names_the_missing_xsm(self, noxsm):
        checks = _doctor(noxsm, 4)
        assert not checks["xsm"]["passed"] and "FLASK" in checks["xsm"]["fix"]
        assert checks["provisioned"]["passed"] and checks["checkpoint-extension"]["passed"]


# --- unprovisioned manager ---------------------------------------------------------------------------------
unprov = _trap_host("unprov", provisioned=False)


class TestUnprovisioned:
    def test_the_manager_never_writes_its_disk_and_refuses_every_reload(self, unprov, lab_of):
        lab = lab_of(unprov)
        dom, ek = _tpm12_populated(lab, "vtpm-u1")
        assert not any((unprov.dir / "images" / "vtpmmgr.img").read_bytes()), "an unprovisioned manager wrote"
        lab.destroy(dom)
        again = lab.create("vtpm-u1", dom.uuid, version="1.2")
        assert again.status.fresh and again.status.manager_rc == 7, again.status
        assert "Unauthorized vTPM kernel image used!" in lab.manager_log(wait_for="Unauthorized vTPM kernel image")
        lab.destroy(again)

    def test_snapshot_is_refused_with_the_fix_and_changes_nothing(self, unprov):
        """The manager cannot keep a checkpoint entry, so no checkpoint is taken (nor any rollback to
        one possible): refused before the guest is suspended."""
        advanced = unprov.advance_tpm(b"unprovisioned")
        assert unprov.tool_json("checkpoints") == []    # (opens the store, whose catalog _untouched reads)
        state = _untouched(unprov)
        line = unprov.fails(4, "snapshot", GUEST, "--name", "never")
        assert all(w in line for w in ("not provisioned", "kernel", "docs/real-xen.md")), line
        assert _untouched(unprov) == state and unprov.tpm_state() == advanced

    def test_doctor_names_the_missing_provisioning(self, unprov):
        checks = _doctor(unprov, 4)
        assert not checks["provisioned"]["passed"] and "group 0" in checks["provisioned"]["fix"]
        assert not checks["manager-persists"]["passed"] and "fresh" in checks["manager-persists"]["detail"]
        assert checks["xsm"]["passed"]


# --- console logging off -------------------------------------------------------------------------------
nolog = _trap_host("nolog", console_log="none")


class TestConsoleLogOff:
    def test_xenconsoled_writes_no_log_but_serves_ptys(self, nolog):
        assert not list((nolog.dir / "logs").glob("guest-*.log"))
        tty = nolog.sim.run(["xenstore-read", f"/local/domain/{nolog.domids()[f'vtpm-{GUEST}']}/console/tty"])
        assert Path(tty.stdout.strip()).is_char_device()

    def test_rollback_reads_the_verdict_from_the_console_pty(self, nolog):
        at_snapshot = nolog.tpm_state()
        nolog.snapshot("s1")
        mem = saved_memory_digest(nolog.last_save_record())
        nolog.advance_tpm(b"after s1")
        nolog.tool("rollback", GUEST, "s1", "--yes", "--paused", "--no-safety-checkpoint")
        assert nolog.memdigest() == mem and nolog.tpm_state() == at_snapshot
        nolog.xl("unpause", GUEST)
        assert not list((nolog.dir / "logs").glob("guest-*.log"))

    def test_restore_starts_a_stopped_vtpm_and_proves_it_loaded(self, nolog, tmp_path):
        at_save = nolog.tpm_state()
        save = tmp_path / "g.save"
        nolog.tool("save", GUEST, str(save))
        nolog.xl("destroy", f"vtpm-{GUEST}")                        # as after a host reboot
        assert f"vtpm-{GUEST}" not in nolog.domids()
        result = nolog.tool_json("restore", str(save))
        assert result["vtpm_restored"] is False and f"vtpm-{GUEST}" in nolog.domids()
        assert nolog.tpm_state() == at_save

    def test_doctor_passes_with_logging_off(self, nolog):
        checks = _doctor(nolog, 0)
        assert checks["console"]["passed"] and "logging" in checks["console"]["detail"]
        persists = checks["manager-persists"]
        assert persists["passed"] and "host TPM 2.0" in persists["detail"] and "nv-counter" in persists["detail"]
        status = nolog.tool_json("status")
        assert status["real_host"] == f"{len(checks)} of {len(checks)} checks pass"

    def test_without_xenconsoled_a_restart_is_refused(self, nolog):
        """Last on this host: it stops the simulated xenconsoled."""
        nolog.snapshot("s2")
        pid = int((nolog.dir / "run" / "xenconsoled.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        assert domains.wait_until(lambda: not domains.is_alive(pid), 10)
        state = _untouched(nolog)
        line = nolog.fails(4, "rollback", GUEST, "s2", "--yes")
        assert "xenconsoled" in line, line
        assert _untouched(nolog) == state
        checks = _doctor(nolog, 4)
        assert not checks["console"]["passed"] and "xenconsoled" in checks["console"]["fix"]


# --- the release race ----------------------------------------------------------------------------------
RELEASE_DELAY = 4.0   # longer than a stub domain's restart, so the tool meets the race


race = _trap_host("race", release_delay=RELEASE_DELAY)


class TestReleaseRace:
    def test_a_restart_right_after_the_release_is_refused_as_open_twice(self, race, lab_of):
        lab = lab_of(race)
        dom, ek = _tpm12_populated(lab, "vtpm-r1")  # auto-created at the manager: bound, never marked OPEN
        lab.destroy(dom)
        # The manager's late release of that first connection would clear the OPEN flag of whoever holds the
        # entry by then (free_opaque clears the entry's flag, docs/xen-internals.md §3.4): let it pass first.
        time.sleep(RELEASE_DELAY + 0.5)
        loaded = lab.create("vtpm-r1", dom.uuid, version="1.2")
        assert loaded.status.loaded                 # a successful LOADHASHKEY marks the entry OPEN
        lab.destroy(loaded)                         # its backend dir is gone: the tool's cue that it was released
        early = lab.create("vtpm-r1", dom.uuid, version="1.2")
        assert early.status.fresh and early.status.manager_rc == 7, early.status
        assert "Attempted to open vTPM twice!" in lab.manager_log(wait_for="Attempted to open vTPM twice!")
        lab.destroy(early)                          # destroyed before any command: nothing was overwritten
        time.sleep(RELEASE_DELAY + 0.5)
        late = lab.create("vtpm-r1", dom.uuid, version="1.2")
        assert late.status.loaded and tpm12.pubek_digest(lab.tcti(late)) == ek
        lab.destroy(late)

    def test_rollback_retries_until_the_manager_has_let_go(self, race, lab_of, tmp_path):
        # guest1's vTPM must run from a loaded state (OPEN at the manager) that no late release clears: its
        # first stub domain (auto-created, never OPEN) is stopped and released for good first, then the
        # restore starts the one that loads.
        save = tmp_path / "g.save"
        race.tool("save", GUEST, str(save))
        race.xl("destroy", f"vtpm-{GUEST}")
        time.sleep(RELEASE_DELAY + 0.5)
        race.tool("restore", str(save))
        at_snapshot = race.tpm_state()
        race.snapshot("s1")
        race.advance_tpm(b"after s1")
        lab = lab_of(race)
        boots_before = len(_lab_boots(lab, f"vtpm-{GUEST}"))
        race.tool("rollback", GUEST, "s1", "--yes", "--no-safety-checkpoint")
        assert race.tpm_state() == at_snapshot
        boots = _lab_boots(lab, f"vtpm-{GUEST}")[boots_before:]
        assert len(boots) >= 2 and boots[0].manager_rc == 7, boots    # refused as open twice, destroyed ...
        assert all(b.fresh for b in boots[:-1]) and boots[-1].loaded   # ... retried until it loaded
        race.tool("verify", "--all")


# --- a correctly configured host: disks, a busy host TPM, doctor ------------------------------------------
good = _trap_host("good")


@pytest.fixture
def loop_device(tmp_path):
    backing = tmp_path / "vtpm-phy.img"
    with open(backing, "wb") as fh:
        fh.truncate(2 << 20)
    dev = subprocess.run(["losetup", "--find", "--show", str(backing)], capture_output=True, text=True,
                         check=True, timeout=30).stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], capture_output=True, timeout=30)


class _RetryProxy:
    """Between the tool and its host TPM (swtpm's data and control ports): answers the next ``retries``
    TPM commands with TPM_RC_RETRY, as a TPM busy with another locality does, then forwards."""

    def __init__(self, upstream_port: int, retries: int) -> None:
        self.upstream, self.retries, self.lock = upstream_port, retries, threading.Lock()
        self.answered = 0
        for _ in range(100):
            self.data, self.ctrl = socket.socket(), socket.socket()
            self.data.bind(("127.0.0.1", 0))
            self.port = self.data.getsockname()[1]
            try:
                self.ctrl.bind(("127.0.0.1", self.port + 1))
                break
            except OSError:
                self.data.close()
                self.ctrl.close()
        for listener, kind in ((self.data, "data"), (self.ctrl, "ctrl")):
            listener.listen(4)
            threading.Thread(target=self._accept, args=(listener, kind), daemon=True).start()

    @property
    def tcti(self) -> str:
        return f"swtpm:host=127.0.0.1,port={self.port}"

    def _accept(self, listener: socket.socket, kind: str) -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            up = socket.create_connection(("127.0.0.1", self.upstream + (kind == "ctrl")))
            target = self._commands if kind == "data" else self._pipe
            threading.Thread(target=target, args=(conn, up), daemon=True).start()
            if kind == "ctrl":
                threading.Thread(target=self._pipe, args=(up, conn), daemon=True).start()

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                dst.sendall(data)
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)      # swtpm serves one control connection at a time: pass the close on

    def _commands(self, conn: socket.socket, up: socket.socket) -> None:
        with conn, up:
            while head := conn.recv(10, socket.MSG_WAITALL):
                body = conn.recv(struct.unpack(">I", head[2:6])[0] - 10, socket.MSG_WAITALL)
                with self.lock:
                    busy = self.answered < self.retries
                    self.answered += busy
                if busy:
                    conn.sendall(struct.pack(">HII", 0x8001, 10, 0x922))        # TPM_RC_RETRY
                    continue
                up.sendall(head + body)
                rsp = up.recv(10, socket.MSG_WAITALL)
                conn.sendall(rsp + up.recv(struct.unpack(">I", rsp[2:6])[0] - 10, socket.MSG_WAITALL))

    def close(self) -> None:
        self.data.close()
        self.ctrl.close()


class TestCorrectlyConfiguredHost:
    def test_doctor_passes_every_check_and_status_says_so(self, good):
        checks = _doctor(good, 0)
        assert {"xsm", "manager", "checkpoint-extension", "provisioned", "manager-locality", "console", "host-tpm",
                "state-dir", f"startup:vtpm-{GUEST}", f"disk:vtpm-{GUEST}"} <= set(checks)
        assert all(c["passed"] for c in checks.values())
        text = good.tool("doctor").stdout
        assert text.splitlines()[-1] == f"{len(checks)} of {len(checks)} checks pass"

    def test_a_phy_disk_is_written_in_place_not_replaced_by_a_file(self, good, loop_device, tmp_path):
        """Like an LVM volume: the cfg names a symlink to the block device."""
        link = tmp_path / "vg" / "vtpm-gphy"
        link.parent.mkdir()
        link.symlink_to(loop_device)
        good.tool("sim", "create", "gphy", "--memory", "16", "--tpm-version", "1.2", "--vtpm-disk", f"phy:{link}")
        tcti = good.tcti("gphy")
        at_snapshot = good.provision_tpm(tcti)
        good.snapshot("p1", guest="gphy")
        good.advance_tpm(b"after p1", tcti)
        good.tool("rollback", "gphy", "p1", "--yes", "--no-safety-checkpoint")
        assert link.is_symlink() and Path(os.path.realpath(link)).is_block_device()
        assert good.tpm_state(good.tcti("gphy")) == at_snapshot
        good.xl("destroy", "gphy")
        good.xl("destroy", "vtpm-gphy")

    def test_a_qcow2_disk_is_refused_before_anything_moves(self, good, tmp_path):
        image = tmp_path / "vtpm-gq.qcow2"
        with open(image, "wb") as fh:
            fh.truncate(2 << 20)        # the simulated qdisk reads it raw; only the format xl was told matters
        good.tool("sim", "create", "gq", "--memory", "16", "--tpm-version", "1.2", "--vtpm-disk", f"qcow2:{image}")
        ids = good.checkpoint_ids()
        line = good.fails(4, "snapshot", "gq", "--name", "q1")
        assert "qcow2" in line and "qemu-img convert" in line, line
        assert good.checkpoint_ids() == ids and not good.is_paused("gq")
        checks = _doctor(good, 4)
        assert not checks["disk:vtpm-gq"]["passed"] and checks[f"disk:vtpm-{GUEST}"]["passed"]
        good.xl("destroy", "gq")
        good.xl("destroy", "vtpm-gq")

    def test_startup_clear_is_refused_for_a_rollback(self, good):
        good.tool("sim", "create", "gclr", "--memory", "16", "--tpm-version", "1.2", "--startup", "clear")
        tcti = good.tcti("gclr")
        good.provision_tpm(tcti)
        good.snapshot("c1", guest="gclr")
        good.advance_tpm(b"after c1", tcti)
        before = good.domids()
        line = good.fails(4, "rollback", "gclr", "c1", "--yes")
        assert 'extra="save"' in line or "add save to extra=" in line, line
        assert good.domids() == before
        assert not _doctor(good, 4)["startup:vtpm-gclr"]["passed"]
        good.xl("destroy", "gclr")
        good.xl("destroy", "vtpm-gclr")

    def test_a_busy_host_tpm_is_retried_with_backoff(self, good):
        conf = configparser.ConfigParser()
        conf.read(good.sim.config)
        upstream = int(conf["xen-vtpm"]["tcti"].rsplit("port=", 1)[1])
        proxy = _RetryProxy(upstream, retries=6)      # ESAPI alone resends a RETRY only 5 times
        try:
            busy = good.with_config(good.dir / "run", tcti=proxy.tcti)
            busy.snapshot("b1")
            assert proxy.answered == 6
            proxy.retries = 10 ** 6                   # busy for good: a clear error, exit 8, nothing changed
            ids = good.checkpoint_ids()
            line = busy.fails(8, "snapshot", GUEST, "--name", "b2")
            assert "busy" in line, line
            assert good.checkpoint_ids() == ids
        finally:
            proxy.close()
