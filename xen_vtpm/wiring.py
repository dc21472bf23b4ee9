"""The composition root: the real adapters for one command, built from the config.

This is the only module that knows which class implements each port of the coordinator
(``core.interfaces``); the CLI asks it for a coordinator and closes it when the command ends.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xen_vtpm.checkpoints import Checkpoints
from xen_vtpm.config import Config
from xen_vtpm.core.coordinator import Coordinator
from xen_vtpm.core.journal import Journal
from xen_vtpm.core.locks import VmLock
from xen_vtpm.durable import check_private_dir
from xen_vtpm.errors import XlError
from xen_vtpm.host.session import open_host
from xen_vtpm.host.trust import AuditTrail, HostTrust
from xen_vtpm.store import Repository
from xen_vtpm.vtpm.stubdom import StubdomBackend
from xen_vtpm.xen.domains import Guests
from xen_vtpm.xen.streams import XlStreams
from xen_vtpm.xen.wrapper import real_xl
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xl import Xl

Progress = Callable[[str, "int | None"], Any]


@dataclass
class Ports:
    """Every adapter of one command (satisfies ``core.interfaces.Ports``)."""
    cfg: Config
    xs: XenStore
    xl: Xl
    guests: Guests
    vtpm: StubdomBackend
    store: Checkpoints
    host: HostTrust
    audit: AuditTrail
    journal: Journal
    streams: XlStreams

    def lock(self, vm_uuid: str, label: str) -> VmLock:
        return VmLock(Path(self.cfg.state_dir), vm_uuid, label)

    def close(self) -> None:
        self.journal.close()
        self.store.close()
        self.xs.close()


def open_ports(cfg: Config, progress: Progress | None = None) -> Ports:
    state = Path(cfg.state_dir)
    check_private_dir(state)
    with contextlib.suppress(XlError):  # no xl at all: commands that need it say so when they run it
        cfg.xl = real_xl(cfg.xl)
    xs = XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout)
    xl = Xl(cfg)
    store: Checkpoints | None = None
    try:
        store = Checkpoints(Repository(state, open_host(cfg).keys))
        host = HostTrust(cfg, store.catalog_digest, lambda: [e.id for e in store.entries()])
        journal = Journal(state / "catalog.sqlite", host.keys.journal_mac)
    except BaseException:
        if store is not None:
            store.close()
        xs.close()
        raise
    return Ports(cfg=cfg, xs=xs, xl=xl, guests=Guests(xs, xl), vtpm=StubdomBackend(cfg, xs, xl), store=store,
                 host=host, audit=AuditTrail(cfg, host), journal=journal, streams=XlStreams(cfg, xl, progress))


@contextlib.contextmanager
def coordinator(cfg: Config, progress: Progress | None = None) -> Iterator[Coordinator]:
    """A coordinator over the real adapters, closed when the block ends."""
    ports = open_ports(cfg, progress)
    try:
        yield Coordinator(ports)
    finally:
        ports.close()
