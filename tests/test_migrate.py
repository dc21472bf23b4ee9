"""End to end: `xen-vtpm migrate` moves a guest and its vTPM between two simulated hosts.

A real TPM client, as the guest, sees the same PCR, NV counter, persistent object and EK on the
destination; the guest's memory arrives byte for byte; the source keeps no copy (no domain, no image,
no usable manager entry) and its checkpoints stay unless --with-checkpoints moves them, re-wrapped
for the destination, where they still roll the guest back.  Both audit logs record the move.  An HVM
guest whose TPM is an swtpm in dom0 moves the same way: its state re-encrypted under the destination's
key, its swtpm started there on that host's socket, nothing of it left on the source.
"""
from __future__ import annotations

import json

import pytest
from e2e_helpers import GUEST, advance_guest_tpm, provision_guest_tpm, saved_memory_digest, tpm_state
from move_helpers import SSH, ek_public, live_entries, manager_table, two_hosts, vtpm_uuid
from sim_fixture import swtpm_home, swtpm_pid

from xen_vtpm.vtpm.swtpmctl import PERMANENT, encrypted_at_rest
from xen_vtpm_sim.host import SWTPM_RUN

HVM = "hvm1"


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    with two_hosts(tmp_path_factory.mktemp("mv")) as p:
        yield p


def _observed(host, guest: str = GUEST) -> dict:
    tcti = host.tcti(guest)
    return {**tpm_state(tcti), "ek": ek_public(tcti).hex()}


def _audit_actions(host) -> list[tuple[str, str]]:
    return [(r["action"], r["result"]) for r in host.tool_json("audit")]


def test_a_move_keeps_the_vtpm_and_the_memory(pair):
    a, b = pair.a, pair.b
    provision_guest_tpm(a.tcti())
    a.snapshot("before-move")
    before = _observed(a)
    uuid = vtpm_uuid(a)
    assert uuid in live_entries(a)

    out = pair.migrate("-p").stdout
    assert "moved to" in out and "0 moved, 1 stay on this host (--with-checkpoints moves them)" in out

    # The destination: the guest paused, its memory exactly what `xl save` took on the source.
    assert GUEST in b.domids() and b.is_paused(GUEST)
    assert b.memdigest() == saved_memory_digest(a.last_save_record())
    assert _observed(b) == before
    flags, data = manager_table(b)[uuid]
    assert flags == 0, f"the moved entry should be an ordinary one, flags {flags:#x}"
    # The source: no guest, no vTPM stub domain, no image or cfg, no entry any vTPM could load.
    assert set(a.domids()) == {"Domain-0", "vtpmmgr"}
    assert not (a.dir / "images" / f"vtpm-{GUEST}.img").exists()
    assert not (a.dir / "images" / f"vtpm-{GUEST}.cfg").exists()
    assert uuid not in live_entries(a)
    assert [c["name"] for c in a.tool_json("checkpoints")] == ["before-move"]
    assert b.tool_json("checkpoints") == []
    assert ("migrate", "moved to hostB (" + str(b.dir) + ")") in _audit_actions(a)
    assert ("migrate-in", "moved in from hostA") in _audit_actions(b)
    for host in (a, b):
        host.tool("verify", "--all")
        host.tool("audit", "--verify")
    b.xl("unpause", GUEST)


def test_moving_back_with_checkpoints_rewraps_them(pair):
    a, b = pair.a, pair.b
    on_b = advance_guest_tpm(b.tcti(), b"on B")
    b.snapshot("on-b")
    later = advance_guest_tpm(b.tcti(), b"later on B")
    ckpt_manager_entries = set(live_entries(b)) - {vtpm_uuid(b)}
    assert len(ckpt_manager_entries) == 1

    result = b.tool_json("migrate", "-s", SSH, "--with-checkpoints", GUEST, str(a.dir))
    assert result["checkpoints_moved"] == 1 and result["checkpoints_kept"] == 0
    assert GUEST in a.domids() and not a.is_paused(GUEST)
    assert tpm_state(a.tcti()) == later
    # The checkpoint left B with its manager entry; on A it is whole, and rolls the guest back.
    assert b.tool_json("checkpoints") == [] and live_entries(b) == {}
    assert {c["name"] for c in a.tool_json("checkpoints")} == {"before-move", "on-b"}
    assert ckpt_manager_entries <= set(live_entries(a))
    a.tool("verify", "--all")
    a.tool("rollback", GUEST, "on-b", "--yes", "--no-safety-checkpoint")
    assert tpm_state(a.tcti()) == on_b
    for host in (a, b):
        host.tool("audit", "--verify")


def test_bad_moves_are_refused_in_one_line_with_nothing_changed(pair):
    """After the moves above guest1 runs on A.  Each refusal names its cause, exits with its code, and
    leaves the guest running on A as it was and B without it."""
    a, b = pair.a, pair.b
    before = tpm_state(a.tcti())
    assert "no such domain" in a.fails(3, "migrate", "-s", SSH, "nosuchguest", str(b.dir))
    line = a.fails(11, "migrate", "-s", "false", GUEST, str(b.dir))
    assert "no xen-vtpm answered through 'false'" in line
    line = a.fails(4, "sim", "ssh", str(b.dir) + "-gone", "true")
    assert "no simulated host runs in" in line
    b.tool("sim", "create", GUEST, "--memory", "16", "--no-vtpm")     # the name is taken there
    try:
        line = a.fails(11, "migrate", "-s", SSH, GUEST, str(b.dir))
        assert "a domain of that name runs on this host" in line and "runs on here" in line
    finally:
        b.xl("destroy", GUEST)
    assert GUEST in a.domids() and not a.is_paused(GUEST) and tpm_state(a.tcti()) == before
    assert set(b.domids()) == {"Domain-0", "vtpmmgr"} and b.tool_json("checkpoints") == []
    assert vtpm_uuid(a) not in live_entries(b)
    for host in (a, b):
        host.tool("audit", "--verify")


def _swtpm_homes(host) -> list[str]:
    base = host.state_dir / "swtpm"
    return sorted(p.name for p in base.iterdir()) if base.is_dir() else []


def test_a_guest_with_an_swtpm_vtpm_moves_with_its_checkpoint(pair):
    """An HVM guest whose TPM is an swtpm in dom0: its state and keys travel to B, where its swtpm
    runs on B's socket from its state re-encrypted under B's key; A keeps no swtpm, no state, no key.
    Its checkpoint moves too, re-encrypted for B, and rolls the guest back there."""
    a, b = pair.a, pair.b
    a.tool("sim", "create", HVM, "--memory", "16", "--vtpm", "swtpm")
    try:
        provision_guest_tpm(a.tcti(HVM))
        a.snapshot("hvm-before", guest=HVM)
        at_snapshot = tpm_state(a.tcti(HVM))
        home = swtpm_home(a.sim, HVM)
        encrypted_on_a = (home / "state" / PERMANENT).read_bytes()
        advance_guest_tpm(a.tcti(HVM), b"after the snapshot")
        before = _observed(a, HVM)

        result = a.tool_json("migrate", "-s", SSH, "-p", "--with-checkpoints", HVM, str(b.dir))
        assert result["checkpoints_moved"] == 1

        # B: the guest (left paused) with its TPM as it was (PCR, NV counter, persistent object, EK), its
        # memory exactly what `xl save` took on A, its swtpm on B's socket from a state under B's key.
        assert HVM in b.domids() and b.is_paused(HVM)
        assert b.memdigest(HVM) == saved_memory_digest(a.last_save_record())
        b.xl("unpause", HVM)
        assert _observed(b, HVM) == before
        b_home = swtpm_home(b.sim, HVM)
        assert b_home.name == home.name and swtpm_pid(b.sim, HVM) is not None
        on_b = (b_home / "state" / PERMANENT).read_bytes()
        assert on_b != encrypted_on_a and encrypted_at_rest(on_b)
        assert json.loads((b_home / "vtpm.json").read_text()).get("incoming") is None
        # A: no guest, no swtpm, no state or key of the vTPM; its checkpoint left with it.
        assert HVM not in a.domids() and not home.exists()
        assert not [p for p in (a.dir / SWTPM_RUN).iterdir() if p.name.startswith(home.name)]
        assert "hvm-before" not in {c["name"] for c in a.tool_json("checkpoints")}
        assert ("migrate", f"moved to hostB ({b.dir})") in _audit_actions(a)
        for h in (a, b):
            h.tool("verify", "--all")
            h.tool("audit", "--verify")
        # The moved checkpoint, re-encrypted for B, rolls the guest back there.
        b.tool("rollback", HVM, "hvm-before", "--yes", "--no-safety-checkpoint")
        assert tpm_state(b.tcti(HVM)) == at_snapshot
        assert ek_public(b.tcti(HVM)).hex() == before["ek"]
    finally:
        for h in (a, b):
            if HVM in h.domids():
                h.xl("destroy", HVM)
