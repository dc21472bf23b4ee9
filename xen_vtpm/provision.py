"""`xen-vtpm init` / `status`, and the per-command handle on the host TPM (`open_host`).

State dir layout owned here: ``sealed/hostkey.json`` (the host key sealed to the
PCR policy), ``sealed/rollback.json`` (optional rollback authorization object),
and the ``head``/``audit`` tables of ``catalog.sqlite``.

One unseal per process (it costs a policy session plus a load): ``open_host`` caches
the derived keys.  The TPM itself is used in short ``tpm_session``s under the host lock,
so concurrent commands take turns on it instead of flushing each other's objects.
"""
from __future__ import annotations

import configparser
import contextlib
import os
import shutil
from pathlib import Path
from typing import Any, Iterator

from . import audit, catalog_head
from .config import DEFAULT_CONFIG_PATH, SECTION, Config, write_ini
from .durable import fsync_dir, publish
from .errors import (
    AuthorizationDenied, IntegrityError, PreconditionFailed, UsageError, XenVtpmError,
)
from .hosttpm import HostTpm, SealedBlob, auth_value
from .locks import HostLock
from .keys import SubKeys, derive_keys

HOSTKEY = Path("sealed") / "hostkey.json"
ROLLBACK = Path("sealed") / "rollback.json"
# The keys `init` writes: everything that must stay the same for the sealed state to open again.
_CONFIG_KEYS = ("state_dir", "tcti", "pcrs", "counter_index", "primary_handle")


class Host:
    """The unsealed host: sub-keys plus the TPM counter, for one command."""

    def __init__(self, cfg: Config, keys: SubKeys) -> None:
        self.cfg = cfg
        self.keys = keys
        self.state_dir = Path(cfg.state_dir)

    def counter_read(self) -> int:
        with tpm_session(self.cfg) as tpm:
            return tpm.counter_read(self.cfg.counter_index)

    def counter_increment(self) -> int:
        with tpm_session(self.cfg) as tpm:
            return tpm.counter_increment(self.cfg.counter_index)

    # Thin conveniences so the coordinator needs one object for freshness and the audit log.
    # Each holds the host lock, so no other command's head advance runs in between.
    def check_fresh(self) -> str:
        """'fresh' or 'pending' (a crash interrupted a change; advance/recover_head finish it)."""
        with tpm_session(self.cfg):
            conn = catalog_head.connect(self.state_dir)
            try:
                current, pending = catalog_head.read(conn, self.keys)
                return catalog_head.check_fresh(current, self.counter_read(), pending)
            finally:
                conn.close()

    def advance(self, catalog_digest: bytes | None = None) -> catalog_head.Head:
        with tpm_session(self.cfg):
            return catalog_head.advance(self, catalog_digest)

    def recover_head(self) -> catalog_head.Head:
        with tpm_session(self.cfg):
            conn = catalog_head.connect(self.state_dir)
            try:
                return catalog_head.settle(self, conn)
            finally:
                conn.close()

    def audit(self, action: str, **fields: Any) -> dict[str, Any]:
        """Append an audit record; do it *before* advance() to anchor it under the counter."""
        return audit.append(self, action, **fields)

    def authorize_rollback(self, secret: bytes | None) -> str:
        """'authorized' or 'not-required'; AuthorizationDenied / TpmLockout / PcrPolicyMismatch otherwise."""
        path = self.state_dir / ROLLBACK
        if not path.exists():
            return "not-required"
        if secret is None:
            raise AuthorizationDenied("rollback: this host requires the rollback secret; pass it with --auth-file")
        with tpm_session(self.cfg) as tpm:
            tpm.unseal(SealedBlob.load(path), "rollback authorization", auth=auth_value(secret))
        return "authorized"


_tpms: dict[tuple[str, str, int], HostTpm] = {}
_hosts: dict[tuple[str, str, str, int], Host] = {}


@contextlib.contextmanager
def tpm_session(cfg: Config) -> Iterator[HostTpm]:
    """The host TPM for a short sequence of commands, under the host lock (see locks.HostLock).

    Nested sessions share the outer connection; the outermost one closes it, flushing what it
    loaded, so no TPM object outlives the lock that protects it."""
    with HostLock(Path(cfg.state_dir)):
        key = (cfg.tcti, cfg.pcrs, cfg.primary_handle)
        outer = key not in _tpms
        if outer:
            _tpms[key] = HostTpm(cfg.tcti, cfg.pcrs, cfg.primary_handle)
        try:
            yield _tpms[key]
        finally:
            if outer:
                _tpms.pop(key).close()


def close_all() -> None:
    """Drop cached keys (the next open_host unseals again)."""
    _hosts.clear()


def open_host(cfg: Config) -> Host:
    """Unseal the host key once for this process (the TPM is held only while unsealing)."""
    path = Path(cfg.state_dir) / HOSTKEY
    if not path.exists():
        raise PreconditionFailed(f"{cfg.state_dir}: host not provisioned (no sealed host key); run `xen-vtpm init`")
    return _unsealed(cfg, path)


def _unsealed(cfg: Config, blob_path: Path) -> Host:
    key = (str(cfg.state_dir), cfg.tcti, cfg.pcrs, cfg.counter_index)
    if key not in _hosts:
        with tpm_session(cfg) as tpm:
            _hosts[key] = Host(cfg, derive_keys(tpm.unseal(SealedBlob.load(blob_path), "host key")))
    return _hosts[key]


def authorize_rollback(cfg: Config, secret: bytes | None) -> str:
    return open_host(cfg).authorize_rollback(secret)


def _read_secret(path: str) -> bytes:
    try:
        secret = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the rollback secret ({exc.strerror}); check --rollback-auth-file") from None
    if not secret.strip():
        raise UsageError(f"{path}: rollback secret file is empty; put a passphrase or random bytes in it")
    return secret


def init(cfg: Config, rollback_auth_file: str | None = None) -> dict[str, Any]:
    """Provision the state dir, host key, counter and head; idempotent."""
    secret = _read_secret(rollback_auth_file) if rollback_auth_file else None
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
    conn = catalog_head.connect(state_dir)
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
        host = _unsealed(cfg, hostkey if hostkey.exists() else staged)
        counter = host.counter_read()
        current, pending = catalog_head.read(conn, host.keys)
        if current is None:
            if hostkey.exists() or audit.tip(conn)[0]:
                raise IntegrityError(f"{state_dir}: catalog head missing although the host was provisioned "
                                     "(deleted?); restore the state dir from a backup")
            audit.append(host, "init", detail=f"counter {cfg.counter_index:#010x}", conn=conn)
            catalog_head.initial(conn, host.keys, counter)
            actions.append(f"wrote the catalog head at counter {counter}")
        else:
            catalog_head.check_fresh(current, counter, pending)
        if not hostkey.exists():
            publish(staged, hostkey)   # durable before anything relies on "key only after head"
            if not actions:
                actions.append("finished an interrupted init")
        if secret is not None:
            replaced = (state_dir / ROLLBACK).exists()
            tpm.seal(tpm.get_random(32), auth=auth_value(secret)).save(state_dir / ROLLBACK)
            action = "replaced" if replaced else "set"
            audit.append(host, "rollback-auth", result="ok", detail=f"rollback authorization {action}", conn=conn)
            counter = catalog_head.advance(host, conn=conn).counter
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
    conn = catalog_head.connect(state_dir)
    try:
        state, detail = catalog_head.state(host, conn)
        out["catalog_head"] = f"{state} ({detail})"
        try:
            result = audit.verify_with(host, conn)
            out["audit_chain"] = (f"ok ({result['records']} records, {result['unanchored']} not yet anchored "
                                  "to the counter)")
        except XenVtpmError as exc:
            out["audit_chain"] = f"broken: {exc}"
    finally:
        conn.close()
    return out
