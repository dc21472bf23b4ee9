"""`xen-vtpm init` / `status` / rollback authorization, in-process and through the CLI."""
from __future__ import annotations

import configparser
import hashlib
import os
import shutil
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from tpm_fixture import _free_port_pair, fresh_cache, host_cfg, make_cfg, swtpm, swtpm_session  # noqa: F401

from xen_vtpm.config import Config
from xen_vtpm.errors import AuthorizationDenied, IntegrityError, PcrPolicyMismatch, UsageError
from xen_vtpm.host import audit, provision, session
from xen_vtpm.host import head as catalog_head
from xen_vtpm.host.tpm import HostTpm


def _snapshot(state_dir: Path) -> dict[str, str]:
    return {str(p.relative_to(state_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(state_dir.rglob("*")) if p.is_file()}


def _cli(cfg: Config, *args: str) -> subprocess.CompletedProcess:
    session.close_all()  # the swtpm socket serves one client at a time
    return subprocess.run([sys.executable, "-m", "xen_vtpm", "--config", str(cfg.path), *args],
                          capture_output=True, text=True, timeout=60)


def test_init_provisions_then_is_idempotent(host_cfg):
    first = provision.init(host_cfg)
    assert first["status"] == "provisioned" and first["rollback_auth"] == "not set"
    state = host_cfg.state_dir
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    assert stat.S_IMODE((state / "sealed" / "hostkey.json").stat().st_mode) == 0o600
    before = _snapshot(state)
    session.close_all()
    second = provision.init(host_cfg)
    assert second["status"] == "already provisioned" and second["actions"] == "none"
    assert second["counter"] == first["counter"]
    assert _snapshot(state) == before
    assert len(session.audit_records(host_cfg)) == 1


def test_init_keeps_unrelated_config_keys(host_cfg):
    host_cfg.path.write_text(f"[xen-vtpm]\nstate_dir = {host_cfg.state_dir}\ntcti = {host_cfg.tcti}\n"
                             f"counter_index = {host_cfg.counter_index:#x}\nxl = /opt/xen/bin/xl\n\n"
                             "[site]\nowner = ops\n")
    cfg = Config.load(host_cfg.path)
    provision.init(cfg)
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(cfg.path)
    assert parser["xen-vtpm"]["xl"] == "/opt/xen/bin/xl" and parser["site"]["owner"] == "ops"
    assert int(parser["xen-vtpm"]["counter_index"], 0) == cfg.counter_index
    assert parser["xen-vtpm"]["pcrs"] == cfg.pcrs and "manager" not in parser["xen-vtpm"]


def test_rollback_authorization_set_checked_and_replaced(swtpm, tmp_path):
    cfg = make_cfg(tmp_path, swtpm.tcti)
    assert provision.init(cfg)["rollback_auth"] == "not set"
    assert session.authorize_rollback(cfg, None) == "not-required"
    secret = tmp_path / "secret"
    secret.write_bytes(b"first secret\n")
    result = provision.init(cfg, rollback_auth_file=str(secret))
    assert result["rollback_auth"] == "set" and "rollback authorization set" in result["actions"]
    assert session.authorize_rollback(cfg, b"first secret\n") == "authorized"
    with pytest.raises(AuthorizationDenied, match="2 tries left"):
        session.authorize_rollback(cfg, b"wrong")
    with pytest.raises(AuthorizationDenied, match="--auth-file"):
        session.authorize_rollback(cfg, None)
    secret.write_bytes(b"second secret")
    assert "replaced" in provision.init(cfg, rollback_auth_file=str(secret))["actions"]
    assert session.authorize_rollback(cfg, b"second secret") == "authorized"
    actions = [r["action"] for r in session.audit_records(cfg)]
    assert actions == ["init", "rollback-auth", "rollback-auth"]
    assert session.audit_verify(cfg)["unanchored"] == 0


def test_init_rejects_an_unreadable_secret_file_before_changing_anything(host_cfg, tmp_path):
    with pytest.raises(UsageError, match="cannot read the rollback secret"):
        provision.init(host_cfg, rollback_auth_file=str(tmp_path / "nope"))
    assert not host_cfg.state_dir.exists()


def test_status_reports_each_part(host_cfg):
    before = provision.status(host_cfg)
    assert before["provisioned"] is False and before["tpm"].startswith("reachable")
    assert before["counter"] == "not defined"
    provision.init(host_cfg)
    session.close_all()
    after = provision.status(host_cfg)
    assert after["config_file"] == str(host_cfg.path) and after["state_dir"] == str(host_cfg.state_dir)
    assert after["provisioned"] is True and after["pcr_policy"] == "satisfied"
    assert isinstance(after["counter"], int) and after["catalog_head"].startswith("fresh")
    assert after["audit_chain"].startswith("ok (1 records")


def test_status_and_open_host_after_a_pcr_change(swtpm, tmp_path):
    cfg = make_cfg(tmp_path, swtpm.tcti)
    provision.init(cfg)
    session.close_all()
    with HostTpm(cfg.tcti, cfg.pcrs) as tpm:
        tpm.extend_pcr(4, b"new boot loader")
    assert provision.status(cfg)["pcr_policy"] == "not satisfied (changed since sealing: sha256:4)"
    with pytest.raises(PcrPolicyMismatch, match="PCRs changed since sealing: sha256:4;"):
        session.open_host(cfg)


def test_status_with_the_tpm_unreachable(tmp_path):
    cfg = make_cfg(tmp_path, f"swtpm:host=127.0.0.1,port={_free_port_pair()}")
    result = provision.status(cfg)
    assert result["tpm"].startswith("unreachable: host TPM at") and result["counter"] is None


def test_cli_init_status_audit_and_errors(host_cfg, tmp_path):
    init = _cli(host_cfg, "init")
    assert init.returncode == 0, init.stderr
    assert "provisioned" in init.stdout
    again = _cli(host_cfg, "--json", "init")
    assert again.returncode == 0 and '"already provisioned"' in again.stdout
    status = _cli(host_cfg, "status")
    assert status.returncode == 0 and "satisfied" in status.stdout and "fresh" in status.stdout
    assert _cli(host_cfg, "audit", "--verify").returncode == 0

    dead = make_cfg(tmp_path / "dead", f"swtpm:host=127.0.0.1,port={_free_port_pair()}")
    failed = _cli(dead, "init")
    assert failed.returncode == 8 and failed.stderr.count("\n") == 1 and "Traceback" not in failed.stderr
    assert dead.tcti in failed.stderr and not dead.state_dir.exists()
    missing = _cli(host_cfg, "init", "--rollback-auth-file", str(tmp_path / "absent"))
    assert missing.returncode == 2 and missing.stderr.count("\n") == 1


def test_cli_replayed_state_dir_exits_6(host_cfg, tmp_path):
    provision.init(host_cfg)
    shutil.copytree(host_cfg.state_dir, tmp_path / "copy")
    catalog_head.advance(session.open_host(host_cfg))
    shutil.rmtree(host_cfg.state_dir)
    shutil.copytree(tmp_path / "copy", host_cfg.state_dir)
    replay = _cli(host_cfg, "audit", "--verify")
    assert replay.returncode == 6 and "older copy of the state dir" in replay.stderr
    status = _cli(host_cfg, "status")
    assert status.returncode == 0 and "replayed" in status.stdout
    assert os.path.exists(host_cfg.state_dir / "catalog.sqlite")


def test_init_refuses_to_rebind_a_catalog_whose_head_was_deleted(host_cfg):
    provision.init(host_cfg)
    db = sqlite3.connect(host_cfg.state_dir / "catalog.sqlite")
    db.execute("DELETE FROM head")
    db.execute("DELETE FROM audit")
    db.commit()
    db.close()
    session.close_all()
    with pytest.raises(IntegrityError, match="catalog head missing although the host was provisioned"):
        provision.init(host_cfg)


def test_init_finishes_after_a_crash_between_sealing_and_the_head(host_cfg):
    provision.init(host_cfg)
    hostkey = host_cfg.state_dir / session.HOSTKEY
    hostkey.rename(str(hostkey) + ".new")  # as if the crash came before the final rename
    session.close_all()
    assert provision.init(host_cfg)["actions"] == "finished an interrupted init"
    assert hostkey.exists() and session.audit_verify(host_cfg)["status"] == "ok"
