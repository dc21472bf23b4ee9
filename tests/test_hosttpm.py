"""Host TPM over a real swtpm: sealing, PCR policy, rollback authorization, DA lockout, NV counter."""
from __future__ import annotations

import os
import stat

import pytest
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC
from tpm_fixture import _free_port_pair, fresh_cache, make_cfg, swtpm, swtpm_session  # noqa: F401

from xen_vtpm.errors import (
    AuthorizationDenied,
    ConfigError,
    NvIndexError,
    PcrPolicyMismatch,
    TpmLockout,
    TpmUnreachable,
)
from xen_vtpm.host import provision, session
from xen_vtpm.host import tpm as hosttpm
from xen_vtpm.host.tpm import HostTpm, SealedBlob, auth_value, parse_pcrs

PCRS = "sha256:0,2,4,7"


def test_seal_unseal_round_trip_never_stores_the_secret(swtpm_session, tmp_path):
    secret = os.urandom(32)
    with HostTpm(swtpm_session.tcti, PCRS) as tpm:
        blob = tpm.seal(secret)
        path = tmp_path / "sealed" / "k.json"
        blob.save(path)
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        raw = path.read_bytes()
        assert secret not in raw and secret.hex().encode() not in raw
        assert tpm.unseal(SealedBlob.load(path), "test key") == secret
        assert set(blob.pcr_values) == {0, 2, 4, 7}


def test_extending_a_policy_pcr_breaks_unseal_and_names_the_pcr(swtpm):
    with HostTpm(swtpm.tcti, PCRS) as tpm:
        blob = tpm.seal(b"k" * 32)
        tpm.extend_pcr(7, b"new secure-boot policy")
        with pytest.raises(PcrPolicyMismatch) as exc:
            tpm.unseal(blob, "host key")
    msg = str(exc.value)
    assert "sha256:7" in msg and "sha256:4" not in msg and "sha256:0" not in msg
    assert exc.value.exit_code == 8 and "\n" not in msg


def test_pcr_outside_the_policy_does_not_matter(swtpm):
    with HostTpm(swtpm.tcti, PCRS) as tpm:
        blob = tpm.seal(b"k" * 32)
        tpm.extend_pcr(10, b"runtime measurement")  # IMA-style runtime PCR, not sealed to
        assert tpm.unseal(blob, "host key") == b"k" * 32


def test_wrong_rollback_secret_is_refused_by_the_tpm_then_locks_out(swtpm):
    with HostTpm(swtpm.tcti, PCRS) as tpm:
        tpm.set_da_parameters(max_tries=3, recovery=600, lockout_recovery=600)
        host_key = tpm.seal(b"h" * 32)
        blob = tpm.seal(b"r" * 32, auth=auth_value(b"correct horse"))
        assert tpm.unseal(blob, "rollback authorization", auth=auth_value(b"correct horse")) == b"r" * 32
        for left in (2, 1, 0):
            with pytest.raises(AuthorizationDenied) as exc:
                tpm.unseal(blob, "rollback authorization", auth=auth_value(b"guess"))
            assert exc.value.exit_code == 7 and f"{left} tries left" in str(exc.value)
            assert tpm.lockout_info()["failures"] == 3 - left  # counted by the TPM itself
        with pytest.raises(TpmLockout) as exc:
            tpm.unseal(blob, "rollback authorization", auth=auth_value(b"guess"))
        assert str(exc.value).startswith("rollback authorization: ")
        assert "10 min" in str(exc.value) and "lockout" in str(exc.value)
        # Guessing cannot stop normal operation: the host key is not DA-protected.
        assert tpm.unseal(host_key, "host key") == b"h" * 32
        # Even the right secret is refused while locked out: the TPM enforces it, not the tool.
        with pytest.raises(TpmLockout):
            tpm.unseal(blob, "rollback authorization", auth=auth_value(b"correct horse"))


def test_counter_only_goes_up_even_across_redefinition(swtpm):
    index = 0x01500040
    with HostTpm(swtpm.tcti, PCRS) as tpm:
        first = tpm.counter_define(index)
        values = [tpm.counter_increment(index) for _ in range(5)]
        assert values == list(range(first + 1, first + 6))
        assert tpm.counter_read(index) == values[-1]
        assert tpm.counter_define(index) == values[-1]  # idempotent
        # Deleting and re-creating the index cannot roll it back (TPM_NT_COUNTER semantics).
        tpm.ctx.nv_undefine_space(tpm.ctx.tr_from_tpmpublic(index), ESYS_TR.RH_OWNER)
        tpm._nv.clear()
        assert not tpm.counter_exists(index)
        assert tpm.counter_define(index) >= values[-1]


def test_nv_index_missing_or_foreign(swtpm):
    with HostTpm(swtpm.tcti, PCRS) as tpm:
        with pytest.raises(NvIndexError, match="not defined"):
            tpm.counter_read(0x01500050)
        foreign = TPM2B_NV_PUBLIC(TPMS_NV_PUBLIC(
            nvIndex=0x01500051, nameAlg=TPM2_ALG.SHA256, dataSize=8,
            attributes=TPMA_NV.AUTHWRITE | TPMA_NV.AUTHREAD))  # ordinary index, not an owner counter
        tpm.ctx.nv_define_space(b"", foreign)
        with pytest.raises(NvIndexError, match="someone else owns it"):
            tpm.counter_read(0x01500051)


def test_unreachable_tpm_names_the_tcti():
    tcti = f"swtpm:host=127.0.0.1,port={_free_port_pair()}"
    with pytest.raises(TpmUnreachable) as exc:
        HostTpm(tcti, PCRS)
    assert tcti in str(exc.value) and exc.value.exit_code == 8


def test_pcr_spec_validation():
    assert parse_pcrs("sha256:7,0,2") == ("sha256", [0, 2, 7])
    for bad in ("sha1:0", "0,2", "sha256:", "sha256:24", "sha256:x"):
        with pytest.raises(ConfigError):
            parse_pcrs(bad)


def test_open_host_unseals_once_per_process(swtpm_session, tmp_path):
    cfg = make_cfg(tmp_path, swtpm_session.tcti)
    provision.init(cfg)
    session.close_all()
    unseals = hosttpm.OPS["Unseal"]
    host = session.open_host(cfg)
    assert session.open_host(cfg) is host
    assert hosttpm.OPS["Unseal"] == unseals + 1
    assert host.counter_increment() == host.counter_read()
