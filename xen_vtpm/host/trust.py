"""What the coordinator asks of the host: freshness, head advances, authorization, the audit trail.

The catalog head binds the checkpoint catalog and the audit log to the TPM counter.  This module
does not know the catalog: it is handed a function that computes the store's digest of it and one
that lists its checkpoint ids, so the host layer stays below the checkpoint store.

Every head advance first proves that the log and the catalog are exactly what the head vouches
for (``_prove``), so a cut log or an edited catalog is refused (exit 5), never re-anchored.  The
head binds the catalog as ``store digest ‖ digest of the id set``: the first covers every column
of every row; the second lets the recovery of an interrupted commit or delete prove that the
catalog differs from the bound one by exactly that checkpoint.
"""
from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import IntegrityError

from . import head, session
from .catalogdb import GENESIS, opened
from .keys import SubKeys


def _ids_digest(ids: Iterable[str]) -> bytes:
    return hashlib.sha256(b"xen-vtpm catalog ids v1\0" + "\n".join(sorted(ids)).encode()).digest()


def _ids_part(bound: bytes) -> bytes | None:
    """The id-set half of a bound catalog digest (``init`` binds GENESIS: the empty catalog)."""
    if bound == GENESIS:
        return _ids_digest(())
    return bound[32:] if len(bound) == 64 else None


class HostTrust:
    def __init__(self, cfg: Config, catalog_digest: Callable[[], bytes],
                 catalog_ids: Callable[[], Iterable[str]]) -> None:
        self.cfg = cfg
        self.host = session.open_host(cfg)
        self._store_digest, self._ids = catalog_digest, catalog_ids

    @property
    def keys(self) -> SubKeys:
        return self.host.keys

    def exclusive(self) -> AbstractContextManager[Any]:
        """The host lock: a catalog change and the head advance that binds it happen inside it,
        so no freshness check ever sees one without the other."""
        return session.tpm_session(self.cfg)

    def _prove(self, changing: Iterable[str] | None) -> bytes:
        """Under the host lock: the log holds every record the head anchors, and the catalog is the
        one the head binds — or, with ``changing``, differs from it by exactly those checkpoints
        (added or removed by the operation being bound; none for a keep mark, which edits a row).
        Returns the catalog's digest now."""
        with opened(self.host.state_dir, "reading the catalog head") as conn:
            current, pending = head.read(conn, self.host.keys)
            self.host.prove_log(conn, current, pending)
        ids = set(self._ids())
        digest = self._store_digest() + _ids_digest(ids)
        bound = [h.catalog_digest for h in (current, pending) if h is not None]
        if digest in bound or (GENESIS in bound and not ids):
            return digest
        if changing is not None and _ids_digest(ids ^ set(changing)) in [_ids_part(b) for b in bound]:
            return digest
        raise IntegrityError("catalog: its checkpoint rows differ from the ones the TPM-bound head records "
                             "(rows added, removed, edited or put back); if a command was interrupted run "
                             "`xen-vtpm recover`, otherwise restore the newest state dir")

    def check_fresh(self) -> None:
        """The head matches the TPM counter (no replay), the audit log (nothing cut or rewritten)
        and the catalog (no checkpoint row added, removed, edited or put back)."""
        with self.exclusive():
            self.host.check_fresh()
            self._prove(None)

    def advance(self, changing: Iterable[str] | None = None) -> None:
        """Bind the catalog as it is now; ``changing`` names the checkpoints the operation being
        bound added or removed (a recover binds it long after the command that changed it)."""
        with self.exclusive():
            self.host.advance(self._prove(changing))

    def recover_head(self) -> None:
        """Finish an interrupted advance; then the log must prove, or the recover refuses."""
        with self.exclusive():
            self.host.recover_head()
            with opened(self.host.state_dir, "verifying the audit log") as conn:
                self.host.prove_log(conn, *head.read(conn, self.host.keys))

    def authorize_rollback(self, secret: bytes | None) -> None:
        self.host.authorize_rollback(secret)


class AuditTrail:
    def __init__(self, cfg: Config, host: HostTrust) -> None:
        self.cfg, self._host = cfg, host

    def append(self, *, action: str, vm: str | None, checkpoint: str | None, result: str, detail: str = "") -> None:
        self._host.host.audit(action, vm=vm, checkpoint=checkpoint, result=result, detail=detail)

    def closed_ops(self) -> set[int]:
        """Journal operations the (verified, MAC'd, counter-anchored) log records as ended."""
        session.audit_verify(self.cfg)
        return {int(m.group(1)) for r in session.audit_records(self.cfg)
                if (m := re.fullmatch(r"op (\d+)", r.get("detail") or ""))}
