"""The composition root: the real adapters for one command, built from the config.

This is the only module that knows which class implements each port of the coordinator
(``core.interfaces``); the CLI asks it for a coordinator and closes it when the command ends.
"""
from __future__ import annotations

import contextlib
import stat
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xen_vtpm.checkpoints import Checkpoints
from xen_vtpm.config import Config
from xen_vtpm.core.coordinator import Coordinator
from xen_vtpm.core.journal import Journal
from xen_vtpm.core.locks import VmLock
from xen_vtpm.errors import PreconditionFailed, StorageError, XlError
from xen_vtpm.host.identity import TpmIdentity
from xen_vtpm.host.peers import HostPeers
from xen_vtpm.host.session import open_host
from xen_vtpm.host.trust import AuditTrail, HostTrust
from xen_vtpm.host.trusted import TrustStore
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
    peers: HostPeers

    def lock(self, vm_uuid: str, label: str) -> VmLock:
        return VmLock(Path(self.cfg.state_dir), vm_uuid, label)

    def close(self) -> None:
        self.journal.close()
        self.store.close()
        self.xs.close()


def _check_state_dir(state: Path) -> None:
    if not state.is_dir():
        raise PreconditionFailed(f"{state}: state dir missing; run `xen-vtpm init` first")
    if stat.S_IMODE(state.stat().st_mode) & 0o077:
        raise StorageError(f"{state}: state dir is accessible to other users; `chmod 700 {state}`")


def open_ports(cfg: Config, progress: Progress | None = None) -> Ports:
    state = Path(cfg.state_dir)
    _check_state_dir(state)
    with contextlib.suppress(XlError):  # no xl at all: commands that need it say so when they run it
        cfg.xl = real_xl(cfg.xl)
    xs = XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout)
    xl = Xl(cfg)
    store: Checkpoints | None = None
    try:
        store = Checkpoints(Repository(state, open_host(cfg).keys))
        host = HostTrust(cfg, store.catalog_digest, store.is_empty)
        journal = Journal(state / "catalog.sqlite", host.keys.journal_mac)
    except BaseException:
        if store is not None:
            store.close()
        xs.close()
        raise
    vtpm = StubdomBackend(cfg, xs, xl)
    return Ports(cfg=cfg, xs=xs, xl=xl, guests=Guests(xs, xl), vtpm=vtpm, store=store, host=host,
                 audit=AuditTrail(cfg, host), journal=journal, streams=XlStreams(cfg, xl, progress),
                 peers=HostPeers(cfg, TpmIdentity(cfg, lambda: _move_keys(vtpm)), TrustStore(cfg)))


def _move_keys(vtpm: StubdomBackend) -> dict[str, bytes]:
    """Per vTPM backend kind, the key a vTPM moving to this host is wrapped for."""
    key = vtpm.move_key()
    return {vtpm.move_kind(): key} if key is not None else {}


@contextlib.contextmanager
def session(cfg: Config, progress: Progress | None = None) -> Iterator[tuple[Coordinator, Ports]]:
    """A coordinator over the real adapters, and the adapters, closed when the block ends."""
    ports = open_ports(cfg, progress)
    try:
        yield Coordinator(ports), ports
    finally:
        ports.close()


@contextlib.contextmanager
def coordinator(cfg: Config, progress: Progress | None = None) -> Iterator[Coordinator]:
    """A coordinator over the real adapters, closed when the block ends."""
    with session(cfg, progress) as (coord, _):
        yield coord
