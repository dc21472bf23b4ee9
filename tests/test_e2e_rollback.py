"""End to end on the simulated host: snapshot + rollback bring back the guest's memory and its vTPM.

The guest side is a real TPM client talking to the guest's vTPM: every test runs with Xen's vTPM stub
domain carrying the simulator's TPM 2.0 stand-in (tpm2-pytss ESAPI) and Xen's own TPM 1.2 (raw TPM 1.2
commands), and with swtpm in dom0 behind an HVM guest's device model; the tool is the `xen-vtpm` command.  The
memory the tool captured is known exactly from the recording `xl`
(e2e_helpers), so "memory at the snapshot" is a byte-for-byte fact, not an assumption.
"""
from __future__ import annotations

import os
import signal
import time

import pytest
from e2e_helpers import GUEST, VTPMS, e2e_host, saved_memory_digest

from xen_vtpm_sim import domains


@pytest.fixture(scope="module", params=list(VTPMS.values()), ids=list(VTPMS))
def host(request, tmp_path_factory):
    backend, tpm_version = request.param
    with e2e_host(tmp_path_factory.mktemp("rb"), backend=backend, tpm_version=tpm_version) as h:
        h.provision_tpm()
        yield h


@pytest.fixture(autouse=True)
def guest_running_after(request):
    """A failed test must not leave guest1 paused for the next one (a paused guest cannot be snapshotted)."""
    yield
    if "host" not in request.fixturenames:
        return                          # a test with a host of its own
    host = request.getfixturevalue("host")
    if GUEST in host.domids() and host.is_paused(GUEST):
        host.xl("unpause", GUEST)


def _changed_memory(host, than: str) -> str:
    """The guest's memory once it differs from `than` (the running guest keeps rewriting pages; paused
    for each reading so the digest is of one consistent image).  A bounded wait, not a timing claim."""
    deadline = time.monotonic() + 30
    while True:
        host.xl("pause", GUEST)
        try:
            now = host.memdigest()
        finally:
            host.xl("unpause", GUEST)
        if now != than:
            return now
        assert time.monotonic() < deadline, "guest memory never changed after the snapshot"
        time.sleep(0.1)


def test_rollback_restores_memory_and_vtpm_and_keeps_a_safety_checkpoint(host):
    at_snapshot = host.tpm_state()
    snap = host.snapshot("rb-s1")
    mem_at_snapshot = saved_memory_digest(host.last_save_record())
    assert host.last_save_target().startswith("/proc/"), "a small guest is spooled in RAM"

    # The guest moves on: memory and every observed vTPM object change.
    advanced = host.advance_tpm(b"after rb-s1")
    _changed_memory(host, mem_at_snapshot)
    before, vtpm_before = host.domids(), host.vtpm_instance()

    result = host.tool_json("rollback", GUEST, "rb-s1", "--yes", "--paused")
    assert result["rolled_back_to"] == snap["id"]
    mem_before_rollback = saved_memory_digest(host.last_save_record())  # the safety checkpoint's capture
    assert mem_before_rollback != mem_at_snapshot

    after = host.domids()
    assert after[GUEST] != before[GUEST] and host.vtpm_instance() not in (None, vtpm_before), \
        "rollback must re-create the guest and its vTPM (stub domain or swtpm)"
    assert host.is_paused(GUEST)
    assert host.memdigest() == mem_at_snapshot
    assert host.tpm_state() == at_snapshot

    # The safety checkpoint holds the state the rollback discarded; rolling back to it returns there.
    safety = result["safety_checkpoint"]
    assert safety, result
    listed = {c["id"]: c for c in host.tool_json("checkpoints", GUEST)}
    assert listed[safety]["kind"] == "pre-rollback"
    host.xl("unpause", GUEST)  # a paused guest cannot suspend for the next safety checkpoint
    host.tool_json("rollback", GUEST, safety, "--yes", "--paused")
    assert host.is_paused(GUEST)
    assert host.memdigest() == mem_before_rollback
    assert host.tpm_state() == advanced
    host.xl("unpause", GUEST)

    host.tool("verify", "--all")
    host.tool("audit", "--verify")


def test_a_guest_over_the_ram_budget_goes_through_the_encrypted_disk_spool(host, tmp_path):
    disk = host.with_config(tmp_path, spool_ram_mib=0)
    at_snapshot = host.tpm_state()
    disk.snapshot("rb-disk")
    assert disk.last_save_target().endswith(".fifo")
    mem_at_snapshot = saved_memory_digest(host.last_save_record())
    host.advance_tpm(b"after rb-disk")
    _changed_memory(host, mem_at_snapshot)

    disk.tool_json("rollback", GUEST, "rb-disk", "--yes", "--paused", "--no-safety-checkpoint")
    assert host.memdigest() == mem_at_snapshot
    assert host.tpm_state() == at_snapshot
    host.xl("unpause", GUEST)
    disk.tool("delete", "rb-disk")


def test_rollback_without_safety_checkpoint_leaves_the_guest_running(host):
    at_snapshot = host.tpm_state()
    host.snapshot("rb-s2")
    host.advance_tpm(b"after rb-s2")
    ids = host.checkpoint_ids()

    host.tool("rollback", GUEST, "rb-s2", "--yes", "--no-safety-checkpoint")
    assert not host.is_paused(GUEST)
    assert host.tpm_state() == at_snapshot
    assert host.checkpoint_ids() == ids, "--no-safety-checkpoint must not store a checkpoint"


def _untouched(host):
    """Domain ids (nothing re-created), vTPM image slots (any TPM command or put-back rewrites them)
    and the stored checkpoints (nothing added)."""
    fingerprints = host.slot_fingerprints()
    return host.domids(), host.vtpm_instance(), fingerprints, host.checkpoint_ids()


@pytest.mark.parametrize("argv, code, words", [
    (["rollback", "nosuch", "rb-s1", "--yes"], 3, "nosuch"),
    (["snapshot", "nosuch"], 3, "nosuch"),
    (["save", "nosuch", "/nonexistent/f"], 3, "nosuch"),
    (["rollback", GUEST, "no-such-checkpoint", "--yes"], 3, "no-such-checkpoint"),
    (["verify", "no-such-checkpoint"], 3, "no-such-checkpoint"),
    (["delete", "no-such-checkpoint"], 3, "no-such-checkpoint"),
    (["rollback", GUEST, "rb-s1"], 2, "--yes"),
    (["rollback", GUEST], 2, "rollback"),
    (["snapshot", GUEST, "--name", "rb-s1"], 2, "rb-s1"),   # names are unique within a domain
])
def test_bad_input_is_refused_and_changes_nothing(host, argv, code, words):
    if not any(c["name"] == "rb-s1" for c in host.tool_json("checkpoints", GUEST)):
        host.snapshot("rb-s1")
    before = _untouched(host)
    line = host.fails(code, *argv)
    assert words in line
    assert _untouched(host) == before


def test_paused_guest_cannot_be_snapshotted(host):
    """It could not answer the suspend request."""
    host.xl("pause", GUEST)
    try:
        before = _untouched(host)
        line = host.fails(4, "snapshot", GUEST, "--name", "rb-paused")
        assert "paused" in line, line
        assert _untouched(host) == before and host.is_paused(GUEST)
    finally:
        host.xl("unpause", GUEST)


@pytest.mark.parametrize("backend", ["stubdom", "swtpm"])
def test_xenstore_down_gives_exit_9(backend, tmp_path):
    """On a host of its own (xenstored is killed)."""
    with e2e_host(tmp_path, backend=backend) as h:
        h.snapshot("x1")
        pid = int((h.dir / "run" / "xenstored.pid").read_text())
        os.kill(pid, signal.SIGTERM)
        assert domains.wait_until(lambda: not domains.is_alive(pid), 10), "xenstored did not stop"
        for argv in (["snapshot", GUEST, "--name", "x2"], ["rollback", GUEST, "x1", "--yes"], ["list"]):
            line = h.fails(9, *argv)
            assert "xenstore" in line.lower(), line

