"""`xen-vtpm init` and `status`: provision the state dir, the host key, the counter and the head.

State dir layout owned here: ``sealed/hostkey.json``, ``sealed/rollback.json`` (see ``session``),
and the ``head``/``audit`` tables of ``catalog.sqlite`` (see ``catalogdb``).
"""
from __future__ import annotations

import configparser
import os
import shutil
from pathlib import Path
from typing import Any

from xen_vtpm.config import DEFAULT_CONFIG_PATH, SECTION, Config, write_ini
from xen_vtpm.durable import fsync_dir, publish
from xen_vtpm.errors import IntegrityError, XenVtpmError

from . import audit, head
from .catalogdb import connect
from .session import HOSTKEY, ROLLBACK, open_host, read_secret, tpm_session, unseal_host
from .tpm import HostTpm, SealedBlob, auth_value

# The keys `init` writes: everything that must stay the same for the sealed state to open again.
_CONFIG_KEYS = ("state_dir", "tcti", "pcrs", "counter_index", "primary_handle")


def init(cfg: Config, rollback_auth_file: str | None = None) -> dict[str, Any]:
    """Provision the state dir, host key, counter and head; idempotent."""
    secret = read_secret(rollback_auth_file, "--rollback-auth-file") if rollback_auth_file else None
    state_dir = Path(cfg.state_dir)
    created = not state_dir.exists()
    try:
        with tpm_session(cfg) as tpm:  # TpmUnreachable here, before anything but the lock file exists
            return _init(cfg, tpm, secret, created)
    except XenVtpmError:
        if created:  # leave no half-made state dir behind
            shutil.rmtree(state_dir, ignore_errors=True)
        raise


def _init(cfg: Config, tpm: HostTpm, secret: bytes | None, created: bool) -> dict[str, Any]:
    state_dir = Path(cfg.state_dir)
    actions: list[str] = [f"created state dir {state_dir}"] if created else []
    state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(state_dir, 0o700)
    if created:   # everything init publishes inside it is lost if its own entry is
        fsync_dir(state_dir.parent)

    # The sealed key gets its final name only after the head exists, so "key present, head
    # missing" always means tampering: `init` then refuses instead of re-binding an old
    # catalog to today's counter.
    hostkey, staged = state_dir / HOSTKEY, state_dir / (str(HOSTKEY) + ".new")
    conn = connect(state_dir)
    try:
        has_head = conn.execute("SELECT COUNT(*) FROM head").fetchone()[0] > 0
        if not hostkey.exists() and not staged.exists():
            if has_head:
                raise IntegrityError(f"{hostkey}: sealed host key missing but the catalog exists; restore it "
                                     "from a backup (a new key could not open the checkpoints)")
            tpm.seal(tpm.get_random(32)).save(staged)
            actions.append("sealed a new host key to PCRs " + tpm.pcr_spec)
        if not tpm.counter_exists(cfg.counter_index):
            tpm.counter_define(cfg.counter_index)
            actions.append(f"defined NV counter {cfg.counter_index:#010x}")
        host = unseal_host(cfg, hostkey if hostkey.exists() else staged)
        counter = host.counter_read()
        current, pending = head.read(conn, host.keys)
        if current is None:
            if hostkey.exists() or audit.tip(conn)[0]:
                raise IntegrityError(f"{state_dir}: catalog head missing although the host was provisioned "
                                     "(deleted?); restore the state dir from a backup")
            host.audit("init", detail=f"counter {cfg.counter_index:#010x}", conn=conn)
            head.initial(conn, host.keys, counter)
            actions.append(f"wrote the catalog head at counter {counter}")
        else:
            head.check_fresh(current, counter, pending)
            head.prove_log(conn, host.keys, current, pending)   # before sealing: a re-provision advances the head
        if not hostkey.exists():
            publish(staged, hostkey)   # durable before anything relies on "key only after head"
            if not actions:
                actions.append("finished an interrupted init")
        if secret is not None:
            replaced = (state_dir / ROLLBACK).exists()
            tpm.seal(tpm.get_random(32), auth=auth_value(secret)).save(state_dir / ROLLBACK)
            action = "replaced" if replaced else "set"
            host.audit("rollback-auth", result="ok", detail=f"rollback authorization {action}", conn=conn)
            counter = head.advance(host, conn=conn).counter
            actions.append(f"rollback authorization {action} (TPM-checked, dictionary-attack protected)")
    finally:
        conn.close()

    config_path = Path(cfg.path or DEFAULT_CONFIG_PATH)
    if _write_config(cfg, config_path):
        actions.append(f"wrote {config_path}")
    return {
        "status": "provisioned" if actions else "already provisioned",
        "config_file": str(config_path), "state_dir": str(state_dir), "counter": counter,
        "rollback_auth": "set" if (state_dir / ROLLBACK).exists() else "not set",
        "actions": "; ".join(actions) or "none",
    }


def _write_config(cfg: Config, path: Path) -> bool:
    """Set our keys in the config file, keeping every other key and section; False if already there."""
    parser = configparser.ConfigParser(interpolation=None)
    if path.exists():
        parser.read(path, encoding="utf-8")
    if not parser.has_section(SECTION):
        parser.add_section(SECTION)
    wanted = {k: v for k, v in cfg.to_mapping().items() if k in _CONFIG_KEYS}
    if all(parser.get(SECTION, k, fallback=None) == v for k, v in wanted.items()):
        return False
    for k, v in wanted.items():
        parser.set(SECTION, k, v)
    write_ini(path, parser)
    return True


def status(cfg: Config) -> dict[str, Any]:
    """Report; never raises for the states it describes (that is its job)."""
    config_path = Path(cfg.path or DEFAULT_CONFIG_PATH)
    state_dir = Path(cfg.state_dir)
    out: dict[str, Any] = {
        "config_file": str(config_path) + ("" if config_path.exists() else " (missing: defaults in use)"),
        "state_dir": str(state_dir) + ("" if state_dir.exists() else " (missing)"),
        "provisioned": (state_dir / HOSTKEY).exists(),
        "rollback_auth": "set" if (state_dir / ROLLBACK).exists() else "not set",
        "tpm": f"unknown ({cfg.tcti})", "pcr_policy": "n/a", "counter": None,
        "catalog_head": "none", "audit_chain": "n/a",
    }
    # The host lock lives in the state dir; without one there is no xen-vtpm state to guard,
    # and status must not create the directory.
    try:
        with (tpm_session(cfg) if state_dir.exists() else HostTpm(cfg.tcti, cfg.pcrs, cfg.primary_handle)) as tpm:
            return _status(cfg, tpm, out)
    except XenVtpmError as exc:
        out["tpm"] = f"unreachable: {exc}"
        return out


def _status(cfg: Config, tpm: HostTpm, out: dict[str, Any]) -> dict[str, Any]:
    state_dir = Path(cfg.state_dir)
    out["tpm"] = f"reachable ({cfg.tcti})"
    try:
        exists = tpm.counter_exists(cfg.counter_index)
        out["counter"] = tpm.counter_read(cfg.counter_index) if exists else "not defined"
    except XenVtpmError as exc:
        out["counter"] = f"error: {exc}"
    if not out["provisioned"]:
        return out
    out["catalog_head"] = out["audit_chain"] = "unknown (needs the host key)"
    try:
        blob = SealedBlob.load(state_dir / HOSTKEY)
        now = tpm.pcr_values()
        moved = [f"{tpm.bank}:{p}" for p in tpm.pcr_list if now.get(p) != blob.pcr_values.get(p)]
        if moved:
            out["pcr_policy"] = f"not satisfied (changed since sealing: {', '.join(moved)})"
            return out
        out["pcr_policy"] = "satisfied"
        host = open_host(cfg)
    except XenVtpmError as exc:
        out["pcr_policy"] = f"error: {exc}"
        return out
    conn = connect(state_dir)
    try:
        state, detail = head.state(host, conn)
        out["catalog_head"] = f"{state} ({detail})"
        try:
            result = head.verify_audit(host, conn)
            out["audit_chain"] = (f"ok ({result['records']} records, {result['unanchored']} not yet anchored "
                                  "to the counter)")
        except XenVtpmError as exc:
            out["audit_chain"] = f"broken: {exc}"
    finally:
        conn.close()
    return out
