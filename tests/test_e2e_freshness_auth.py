"""End to end: a replayed state dir is refused (exit 6), and a provisioned rollback secret is enforced (exit 7).

The host is initialised with `init --rollback-auth-file F`, as an administrator who wants rollbacks
authorised would do on a fresh host.
"""
from __future__ import annotations

import shutil

import pytest
from e2e_helpers import BACKENDS, GUEST, advance_guest_tpm, e2e_host, provision_guest_tpm, tpm_state


@pytest.fixture(scope="module")
def secret(tmp_path_factory):
    path = tmp_path_factory.mktemp("secret") / "rollback.secret"
    path.write_bytes(b"correct horse battery staple\n")
    path.chmod(0o600)
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def host(tmp_path_factory, secret, request):
    with e2e_host(tmp_path_factory.mktemp("fa"), auth_file=secret, backend=request.param) as h:
        provision_guest_tpm(h.tcti())
        yield h


def _observe(host) -> tuple:
    """Nothing re-created, nothing suspended (the guest's suspend writes its vTPM), no checkpoint added."""
    return (host.domids(), host.vtpm_instance(), host.slot_fingerprints(), host.checkpoint_ids(),
            host.is_paused(GUEST))


def test_status_shows_the_secret_is_provisioned(host):
    assert host.tool_json("status")["rollback_auth"] != "not set"


def test_rollback_needs_the_right_secret(host, secret, tmp_path):
    at_snapshot = tpm_state(host.tcti())
    host.snapshot("a1")
    advanced = advance_guest_tpm(host.tcti(), b"after a1")
    wrong = tmp_path / "wrong.secret"
    wrong.write_bytes(b"correct horse battery stapler\n")
    wrong.chmod(0o600)

    before = _observe(host)
    for extra in ([], ["--auth-file", str(wrong)]):
        host.fails(7, "rollback", GUEST, "a1", "--yes", *extra)
        assert _observe(host) == before
    assert tpm_state(host.tcti()) == advanced

    host.tool("rollback", GUEST, "a1", "--yes", "--auth-file", str(secret))
    assert tpm_state(host.tcti()) == at_snapshot
    host.tool("audit", "--verify")


def test_replayed_state_dir_is_refused(host, secret, tmp_path):
    state = host.state_dir
    host.snapshot("r1")
    old = tmp_path / "state-after-r1"
    shutil.copytree(state, old, symlinks=True)
    host.snapshot("r2")
    newest = tmp_path / "state-after-r2"
    shutil.copytree(state, newest, symlinks=True)

    shutil.rmtree(state)
    shutil.copytree(old, state, symlinks=True)   # the attacker puts the older state dir back
    try:
        before = _observe(host)
        for argv in (["rollback", GUEST, "r1", "--yes", "--auth-file", str(secret)], ["verify", "--all"],
                     ["verify", "r1"], ["snapshot", GUEST, "--name", "r3"]):
            line = host.fails(6, *argv)
            assert "counter" in line, line
            assert _observe(host) == before, f"`xen-vtpm {' '.join(argv)}` changed something"
    finally:
        shutil.rmtree(state)
        shutil.copytree(newest, state, symlinks=True)
    # With the newest state dir back, everything is accepted again.
    host.tool("verify", "--all")
    host.snapshot("r3")
