"""The per-command handle on the host TPM: unseal the host key once, use the TPM in short sessions.

One unseal per process (it costs a policy session plus a load): ``open_host`` caches the
derived keys.  The TPM itself is used in short ``tpm_session``s under the host lock, so
concurrent commands take turns on it instead of flushing each other's objects.

State dir files owned here: ``sealed/hostkey.json`` (the host key sealed to the PCR policy) and
``sealed/rollback.json`` (the optional rollback authorization object).
"""
from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.durable import check_private_dir
from xen_vtpm.errors import AuthorizationDenied, PreconditionFailed, UsageError

from . import audit, head
from .catalogdb import DB_NAME, guarded, opened
from .keys import SubKeys, derive_keys
from .lock import HostLock
from .tpm import HostTpm, SealedBlob, auth_value

HOSTKEY = Path("sealed") / "hostkey.json"
ROLLBACK = Path("sealed") / "rollback.json"


class Host:
    """The unsealed host: sub-keys plus the TPM counter, for one command."""

    def __init__(self, cfg: Config, keys: SubKeys) -> None:
        self.cfg = cfg
        self.keys = keys
        self.state_dir = Path(cfg.state_dir)
        self.proven: tuple[int, bytes] | None = None     # the audit tip this process last proved

    def prove_log(self, conn: sqlite3.Connection, *anchors: head.Head | None) -> tuple[int, bytes]:
        """``head.prove_log``, walking again only the records this process has not proved yet (one
        command proves the log several times; the first proof walks all of it)."""
        self.proven = head.prove_log(conn, self.keys, *anchors, since=self.proven)
        return self.proven

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
        with tpm_session(self.cfg), opened(self.state_dir, "reading the catalog head") as conn:
            current, pending = head.read(conn, self.keys)
            return head.check_fresh(current, self.counter_read(), pending)

    def advance(self, catalog_digest: bytes | None = None) -> head.Head:
        with tpm_session(self.cfg):
            return head.advance(self, catalog_digest)

    def recover_head(self) -> head.Head:
        with tpm_session(self.cfg), opened(self.state_dir, "finishing an interrupted head advance") as conn:
            return head.settle(self, conn)

    def audit(self, action: str, *, vm: str | None = None, checkpoint: str | None = None, result: str = "ok",
              detail: str = "", conn: sqlite3.Connection | None = None) -> dict[str, Any]:
        """Append an audit record; do it *before* advance() to anchor it under the counter."""
        if conn is None:
            with opened(self.state_dir, "appending to the audit log") as own:
                return self.audit(action, vm=vm, checkpoint=checkpoint, result=result, detail=detail, conn=own)
        with guarded(self.state_dir, "appending to the audit log"):
            if not conn.in_transaction:
                conn.execute("BEGIN IMMEDIATE")  # the head read and the append see one state
            current, pending = head.read(conn, self.keys)
            # A record chained onto a cut or rewritten log would hide the damage it follows.
            self.prove_log(conn, current, pending)
            counter = current.counter if current else self.counter_read()
            record = audit.append(conn, self.keys, counter=counter, action=action, vm=vm, checkpoint=checkpoint,
                                  result=result, detail=detail)
            self.proven = (record["seq"], bytes.fromhex(record["hash"]))
            return record

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
    """The host TPM for a short sequence of commands, under the host lock (see lock.HostLock).

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
    check_private_dir(Path(cfg.state_dir))
    return unseal_host(cfg, path)


def unseal_host(cfg: Config, blob_path: Path) -> Host:
    key = (str(cfg.state_dir), cfg.tcti, cfg.pcrs, cfg.counter_index)
    if key not in _hosts:
        with tpm_session(cfg) as tpm:
            _hosts[key] = Host(cfg, derive_keys(tpm.unseal(SealedBlob.load(blob_path), "host key")))
    return _hosts[key]


SECRET_MAX = 4096     # bytes: a passphrase or a key file, never more


def read_secret(path: str, option: str) -> bytes:
    """The rollback secret in file ``path``, read with a bound and refused if empty (whitespace
    only) or larger than SECRET_MAX — before the TPM is asked, so a wrong file never costs a
    dictionary-attack try, and /dev/zero or an endless pipe cannot keep the tool reading."""
    try:
        with open(path, "rb") as fh:
            secret = fh.read(SECRET_MAX + 1)
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the rollback secret ({exc.strerror}); check {option}") from None
    if len(secret) > SECRET_MAX:
        raise UsageError(f"{path}: longer than {SECRET_MAX} bytes, so not a rollback secret file; check {option}")
    if not secret.strip():
        raise UsageError(f"{path}: the rollback secret file is empty; put a passphrase or random bytes in it")
    return secret


def authorize_rollback(cfg: Config, secret: bytes | None) -> str:
    return open_host(cfg).authorize_rollback(secret)




def _catalog(cfg: Config, action: str) -> contextlib.AbstractContextManager[sqlite3.Connection]:
    if not (Path(cfg.state_dir) / DB_NAME).exists():
        raise PreconditionFailed(f"{cfg.state_dir}: no catalog (host not provisioned); run `xen-vtpm init`")
    check_private_dir(Path(cfg.state_dir))
    return opened(cfg.state_dir, action)


def audit_records(cfg: Config) -> list[dict[str, Any]]:
    """All audit records, oldest first (no TPM access: reading the log needs no key)."""
    with _catalog(cfg, "reading the audit log") as conn:
        return audit.records(conn)


def audit_verify(cfg: Config) -> dict[str, Any]:
    """Check every record, the chain, its MACs and its binding to the TPM counter."""
    with _catalog(cfg, "verifying the audit log") as conn:
        return head.verify_audit(open_host(cfg), conn)
