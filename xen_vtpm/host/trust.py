"""What the coordinator asks of the host: freshness, head advances, authorization, the audit trail.

The catalog head binds a digest of the checkpoint catalog to the TPM counter.  This module
does not know the catalog: it is handed a function that computes the digest (and one that says
whether the catalog is empty), so the host layer stays below the checkpoint store.
"""
from __future__ import annotations

import re
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import IntegrityError

from . import head, session
from .catalogdb import GENESIS, connect
from .keys import SubKeys


class HostTrust:
    def __init__(self, cfg: Config, catalog_digest: Callable[[], bytes], catalog_empty: Callable[[], bool]) -> None:
        self.cfg = cfg
        self.host = session.open_host(cfg)
        self._digest, self._empty = catalog_digest, catalog_empty

    @property
    def keys(self) -> SubKeys:
        return self.host.keys

    def exclusive(self) -> AbstractContextManager[Any]:
        """The host lock: a catalog change and the head advance that binds it happen inside it,
        so no freshness check ever sees one without the other."""
        return session.tpm_session(self.cfg)

    def check_fresh(self) -> None:
        """The head must match the TPM counter (no replay) and the catalog it was bound to
        (no checkpoint rows added, removed or put back)."""
        with self.exclusive():
            self.host.check_fresh()
            conn = connect(self.host.state_dir)
            try:
                current, pending = head.read(conn, self.host.keys)
            finally:
                conn.close()
            digest = self._digest()
            bound = {h.catalog_digest for h in (current, pending) if h is not None}
            if digest in bound or (bound == {GENESIS} and self._empty()):
                return
            raise IntegrityError("catalog: its checkpoint rows differ from the ones the TPM-bound head records "
                                 "(rows added, removed or put back); if a command was interrupted run "
                                 "`xen-vtpm recover`, otherwise restore the newest state dir")

    def advance(self) -> None:
        self.host.advance(self._digest())

    def recover_head(self) -> None:
        self.host.recover_head()

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

