"""The composition root: the real adapters for one command, built from the config.

This is the only module that knows which class implements each port of the coordinator
(``core.interfaces``); the CLI asks it for a coordinator and closes it when the command ends.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from xen_vtpm.checkpoints import Checkpoints
from xen_vtpm.config import Config
from xen_vtpm.core.coordinator import Coordinator
from xen_vtpm.core.journal import Journal
from xen_vtpm.core.locks import VmLock
from xen_vtpm.durable import check_private_dir
from xen_vtpm.errors import PreconditionFailed, XenVtpmError, XlError
from xen_vtpm.host import preflight as host_preflight
from xen_vtpm.host.identity import TpmIdentity
from xen_vtpm.host.peers import HostPeers
from xen_vtpm.host.session import open_host
from xen_vtpm.host.trust import AuditTrail, HostTrust
from xen_vtpm.host.trusted import TrustStore
from xen_vtpm.model import BACKEND_KINDS, Check, VtpmCapture, VtpmExport, VtpmRef
from xen_vtpm.store import Repository
from xen_vtpm.vtpm import preflight as vtpm_preflight
from xen_vtpm.vtpm.manager import ManagerClient
from xen_vtpm.vtpm.stubdom import StubdomBackend
from xen_vtpm.vtpm.swtpm import SwtpmBackend
from xen_vtpm.xen.domains import Guests
from xen_vtpm.xen.streams import XlStreams
from xen_vtpm.xen.wrapper import real_xl
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xl import Xl

Progress = Callable[[str, "int | None"], Any]


class VtpmBackends:
    """The coordinator's one vTPM port over every backend: each call goes to the backend of the vTPM
    it names (``VtpmRef.backend_kind``, which ``Guests.find`` read from the guest: a Xen vtpm device
    means a stub domain, an emulator TPM in its device model an swtpm)."""

    def __init__(self, stubdom: StubdomBackend, swtpm: SwtpmBackend) -> None:
        self.stubdom, self.swtpm = stubdom, swtpm

    def of(self, ref: VtpmRef) -> StubdomBackend | SwtpmBackend:
        return self.swtpm if ref.backend_kind == "swtpm" else self.stubdom

    def supports_checkpoints(self, ref: VtpmRef) -> bool:
        return self.of(ref).supports_checkpoints(ref)

    def check_can_restart(self, ref: VtpmRef) -> None:
        self.of(ref).check_can_restart(ref)

    def check_can_capture(self, ref: VtpmRef) -> None:
        self.of(ref).check_can_capture(ref)

    def check_single_consumer(self, ref: VtpmRef) -> None:
        self.of(ref).check_single_consumer(ref)

    def capture(self, ref: VtpmRef, checkpoint_id: str) -> VtpmCapture:
        return self.of(ref).capture(ref, checkpoint_id)

    def capture_fingerprint(self, ref: VtpmRef) -> VtpmCapture:
        return self.of(ref).capture_fingerprint(ref)

    def fingerprint(self, ref: VtpmRef) -> tuple[str, str]:
        return self.of(ref).fingerprint(ref)

    def stop(self, ref: VtpmRef) -> None:
        self.of(ref).stop(ref)

    def put_back(self, ref: VtpmRef, capture: VtpmCapture) -> None:
        self.of(ref).put_back(ref, capture)

    def start_verified(self, ref: VtpmRef) -> None:
        self.of(ref).start_verified(ref)

    def is_running(self, ref: VtpmRef) -> bool:
        return self.of(ref).is_running(ref)

    def discard(self, ref: VtpmRef, manager_checkpoint: str) -> None:
        self.of(ref).discard(ref, manager_checkpoint)

    # Moves: each vTPM goes to its own backend, an incoming one to the backend of the kind it came as.
    def _kind(self, kind: str) -> StubdomBackend | SwtpmBackend:
        if kind not in BACKEND_KINDS:
            raise PreconditionFailed(f"a vTPM of kind {kind!r}, which no backend of this host can take; install the "
                                     "same xen-vtpm on both hosts (nothing was changed)")
        return self.swtpm if kind == "swtpm" else self.stubdom

    def move_keys(self) -> dict[str, bytes]:
        """Per vTPM backend kind that can take a vTPM in here, the key its secret is sealed to."""
        keys = {"stubdom": self.stubdom.move_key(), "swtpm": self.swtpm.move_key()}
        return {kind: key for kind, key in keys.items() if key is not None}

    def check_can_move(self, ref: VtpmRef) -> None:
        self.of(ref).check_can_move(ref)

    def export_for(self, ref: VtpmRef, transfer: str, recipient: bytes) -> VtpmExport:
        return self.of(ref).export_for(ref, transfer, recipient)

    def export_checkpoint(self, ref: VtpmRef, manager_checkpoint: str, transfer: str, recipient: bytes) -> bytes:
        return self.of(ref).export_checkpoint(ref, manager_checkpoint, transfer, recipient)

    def unexport(self, ref: VtpmRef) -> None:
        self.of(ref).unexport(ref)

    def check_importable(self, export: VtpmExport) -> None:
        self._kind(export.kind).check_importable(export)

    def import_from(self, export: VtpmExport, transfer: str) -> None:
        self._kind(export.kind).import_from(export, transfer)

    def import_checkpoint(self, ref: VtpmRef, capture: VtpmCapture, transfer: str, envelope: bytes) -> VtpmCapture:
        return self.of(ref).import_checkpoint(ref, capture, transfer, envelope)

    def incoming_stream(self, ref: VtpmRef, blocks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        return self.of(ref).incoming_stream(ref, blocks)

    def adopt(self, ref: VtpmRef) -> None:
        self.of(ref).adopt(ref)

    def remove(self, ref: VtpmRef) -> None:
        self.of(ref).remove(ref)


@dataclass
class Ports:
    """Every adapter of one command (satisfies ``core.interfaces.Ports``)."""
    cfg: Config
    xs: XenStore
    xl: Xl
    guests: Guests
    vtpm: VtpmBackends
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
    # The identity asks the backends for their keys, and the swtpm backend seals to the identity's.
    identity = TpmIdentity(cfg, lambda: vtpm.move_keys())
    vtpm = VtpmBackends(StubdomBackend(cfg, xs, xl), SwtpmBackend(cfg, xs, host.keys.swtpm, identity))
    return Ports(cfg=cfg, xs=xs, xl=xl, guests=Guests(xs, xl, Path(cfg.swtpm_run_dir)), vtpm=vtpm, store=store,
                 host=host, audit=AuditTrail(cfg, host), journal=journal, streams=XlStreams(cfg, xl, progress),
                 peers=HostPeers(cfg, identity, TrustStore(cfg)))


@contextlib.contextmanager
def session(cfg: Config, progress: Progress | None = None) -> Iterator[tuple[Coordinator, Ports]]:
    """A coordinator over the real adapters, and the adapters, closed when the block ends."""
    ports = open_ports(cfg, progress)
    try:
        yield Coordinator(ports), ports
    finally:
        ports.close()


@contextlib.contextmanager
def swtpm_backend(cfg: Config) -> Iterator[SwtpmBackend]:
    """The swtpm backend alone (its keys need the unsealed host key), for `xen-vtpm vtpm ...`."""
    check_private_dir(Path(cfg.state_dir))
    keys = open_host(cfg).keys
    xs = XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout)
    try:
        yield SwtpmBackend(cfg, xs, keys.swtpm)
    finally:
        xs.close()


@contextlib.contextmanager
def coordinator(cfg: Config, progress: Progress | None = None) -> Iterator[Coordinator]:
    """A coordinator over the real adapters, closed when the block ends."""
    with session(cfg, progress) as (coord, _):
        yield coord


def doctor_checks(cfg: Config) -> list[Check]:
    """`xen-vtpm doctor`: the vTPM stack's checks (they need XenStore) and the host's."""
    checks = host_preflight.host_checks(cfg)
    try:
        xs = XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout)
    except XenVtpmError as exc:
        return [Check("xenstore", False, str(exc), "run xen-vtpm in dom0 with xenstored running"), *checks]
    with xs:
        return vtpm_preflight.vtpm_checks(cfg, xs, Xl(cfg), ManagerClient(cfg, xs)) + checks
