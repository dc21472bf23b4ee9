"""The vTPM backend for Xen's stub domains: a vtpm-stubdom per guest, secrets held by vtpmmgr.

A vTPM's state is a pair: its disk image (``vtpmblk``) and the ``H‖K`` entry the manager keeps
for its UUID, where H names one of the image's two slots.  A capture copies both while the guest
is suspended; a put-back restores both (image first, durably, then the manager entry); a start
proves from the console that the vTPM loaded that state before anything can attach to it.
"""
from __future__ import annotations

import stat
from pathlib import Path

from xen_vtpm.config import Config
from xen_vtpm.durable import fsync_dir, write_atomic
from xen_vtpm.errors import (
    DomainNotFound,
    IntegrityError,
    PreconditionFailed,
    StorageError,
    TransferError,
    VtpmBusy,
    XenStoreTimeout,
    XlConfigError,
)
from xen_vtpm.model import VtpmCapture, VtpmExport, VtpmRef
from xen_vtpm.xen.domains import domid_of
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xl import Xl
from xen_vtpm.xen.xlcfg import disk_target, format_cfg, load_cfg, parse_cfg, parse_disk, parse_vtpm

from .console import console_status, log_offset, wait_console_status
from .manager import ManagerClient
from .vtpmblk import slot_fingerprints


def wait_released(xs: XenStore, vtpm_domid: int, manager_domid: int, timeout: float) -> None:
    """Until the domain is gone (@releaseDomain) AND the manager dropped its backend dir (OPEN cleared;
    docs/xen-internals.md §9.5, §16)."""
    be = f"/local/domain/{manager_domid}/backend/vtpm/{vtpm_domid}"

    def released() -> bool:
        return not xs.is_introduced(vtpm_domid) and not xs.exists(be)
    if not xs.wait_for(released, ["@releaseDomain", be], timeout):
        raise XenStoreTimeout(f"domain {vtpm_domid}: vTPM stub domain not released by the manager within "
                              f"{timeout:g} s ({be} still present); do not start another vTPM with its UUID")


KIND = "stubdom"


class StubdomBackend:
    """VtpmBackend for Xen's vTPM stub domains and a vtpmmgr with the checkpoint extension."""

    def __init__(self, cfg: Config, xs: XenStore, xl: Xl) -> None:
        self.cfg, self.xs, self.xl = cfg, xs, xl
        self.mgr = ManagerClient(cfg, xs)

    def _cfg_file(self, ref: VtpmRef) -> Path:
        path = Path(self.cfg.domain_cfg_dir) / f"{ref.backend}.cfg"
        if not path.is_file():
            raise PreconditionFailed(f"{ref.backend}: its xl cfg {path} is missing; xen-vtpm needs it to "
                                     "re-create the vTPM stub domain (set domain_cfg_dir in the config)")
        return path

    def _image(self, ref: VtpmRef) -> Path:
        return Path(disk_target(load_cfg(str(self._cfg_file(ref)))))

    def supports_checkpoints(self) -> bool:
        return self.mgr.supports_checkpoints()

    def check_single_consumer(self, ref: VtpmRef) -> None:
        domid = domid_of(self.xs, ref.backend)
        if domid is None:
            raise PreconditionFailed(f"{ref.backend}: the vTPM stub domain is not running")
        frontends = self.xs.ls(f"/local/domain/{domid}/backend/vtpm") if self.xs.exists(
            f"/local/domain/{domid}/backend/vtpm") else []
        if len(frontends) != 1:
            raise VtpmBusy(f"{ref.backend}: serves {len(frontends)} frontends ({', '.join(frontends) or 'none'}); "
                           "a checkpoint needs exactly one consumer — detach the others first")

    def is_running(self, ref: VtpmRef) -> bool:
        """Exists and has not crashed or begun dying (a crashed stub domain serves nothing)."""
        if domid_of(self.xs, ref.backend) is None:
            return False
        state = next((row["state"] for row in self.xl.list() if row["name"] == ref.backend), "")
        return not ({"c", "d"} & set(state))

    def fingerprint(self, ref: VtpmRef) -> tuple[str, str]:
        return self._slot_hashes(self._image(ref).read_bytes())

    def capture(self, ref: VtpmRef, checkpoint_id: str) -> VtpmCapture:
        """Manager copy + image copy while the vTPM is paused; they must name the same slot."""
        manager_hash = self.mgr.checkpoint(ref.uuid, checkpoint_id).lower()
        image = self._image(ref).read_bytes()
        slots = self._slot_hashes(image)
        if manager_hash not in slots:
            self.mgr.discard(checkpoint_id)
            raise IntegrityError(f"{ref.backend}: the manager's hash {manager_hash[:12]}… matches neither slot of "
                                 "the vTPM image; the vTPM was not quiescent — retry the snapshot")
        return VtpmCapture(image=image, manager_checkpoint=checkpoint_id, manager_hash=manager_hash,
                           slot_hashes=slots)

    def capture_fingerprint(self, ref: VtpmRef) -> VtpmCapture:
        """Stock manager: only the image and its slot fingerprints (forward-only vTPM)."""
        image = self._image(ref).read_bytes()
        return VtpmCapture(image=image, manager_checkpoint=None, manager_hash=None,
                           slot_hashes=self._slot_hashes(image))

    def _slot_hashes(self, image: bytes) -> tuple[str, str]:
        slots = slot_fingerprints(image)
        return (slots[0] or "", slots[1] or "")

    def stop(self, ref: VtpmRef) -> None:
        domid = domid_of(self.xs, ref.backend)
        if domid is None:
            return
        self.xl.destroy(ref.backend)
        mgr_domid = self.mgr.info().domid
        wait_released(self.xs, domid, mgr_domid, self.cfg.manager_timeout)

    def put_back(self, ref: VtpmRef, capture: VtpmCapture) -> None:
        if capture.manager_checkpoint is None:
            raise PreconditionFailed(f"{ref.backend}: the stock manager cannot restore a vTPM entry")
        if self.is_running(ref):
            raise PreconditionFailed(f"{ref.backend}: still running; it must be stopped before its image is replaced")
        # The image must be on disk before the manager entry that names one of its slots.
        image = self._image(ref)
        try:
            mode = stat.S_IMODE(image.stat().st_mode)
        except FileNotFoundError:
            mode = 0o600
        write_atomic(image, capture.image, mode=mode)
        self.mgr.restore(ref.uuid, capture.manager_checkpoint)

    def start_verified(self, ref: VtpmRef) -> None:
        """Create the vTPM stub domain and prove it loaded its state before anything attaches (I1)."""
        if self.is_running(ref) and console_status(self.cfg, ref.backend).loaded:
            return
        self.stop(ref)  # a crashed, dying or unproven one is destroyed and made again
        offset = log_offset(self.cfg, ref.backend)
        self.xl.create(str(self._cfg_file(ref)))
        status = wait_console_status(self.cfg, ref.backend, offset, self.cfg.manager_timeout)
        if not status.loaded:
            self.xl.destroy(ref.backend)
            raise IntegrityError(f"{ref.backend}: came up without its state ({status.reason}); destroyed before "
                                 "any guest attached, the checkpoint is intact — run `xen-vtpm recover`")

    def discard(self, manager_checkpoint: str) -> None:
        self.mgr.discard(manager_checkpoint)

    # --- moves (docs/migration.md): H‖K travels between managers, wrapped for the receiving
    # manager's TPM-resident transfer key, and never reaches dom0 in clear -------------------------
    def move_kind(self) -> str:
        return KIND

    def move_key(self) -> bytes | None:
        try:
            return self.mgr.info().transfer_key
        except DomainNotFound:
            return None

    def export_for(self, ref: VtpmRef, transfer: str, recipient: bytes) -> VtpmExport:
        """Park the vTPM's entry at the manager (no vTPM stub domain can load or save it until
        ``unexport``) and take its image, which the parked entry's H must name."""
        manager_hash, envelope = self.mgr.export(ref.uuid, transfer, recipient)
        config = self._cfg_file(ref).read_text(encoding="utf-8")
        image = self._image(ref).read_bytes()
        slots = self._slot_hashes(image)
        if manager_hash not in slots:
            self.mgr.unexport(ref.uuid)
            raise IntegrityError(f"{ref.backend}: the manager's hash {manager_hash[:12]}… matches neither slot of "
                                 "the vTPM image; the vTPM was not quiescent — retry the move")
        return VtpmExport(kind=KIND, ref=ref, envelope=envelope, state=image, state_hash=manager_hash,
                          slot_hashes=slots, config=config)

    def export_checkpoint(self, ref: VtpmRef, manager_checkpoint: str, transfer: str, recipient: bytes) -> bytes:
        return self.mgr.export(ref.uuid, transfer, recipient, checkpoint=manager_checkpoint)[1]

    def unexport(self, ref: VtpmRef) -> None:
        self.mgr.unexport(ref.uuid)

    def _incoming_image(self, ref: VtpmRef) -> Path:
        return Path(self.cfg.vtpm_image_dir) / f"{ref.backend}.img"

    def _incoming_cfg(self, export: VtpmExport) -> str:
        """The source's cfg for this host: its image here, this host's manager as its backend."""
        ref = export.ref
        try:
            cfg = parse_cfg(export.config, f"{ref.backend}.cfg from the source")
            disks = list(cfg.get("disk") or [])
            first = parse_disk(disks[0]) if disks else None
            links = [parse_vtpm(str(v)) for v in cfg.get("vtpm") or []]
        except XlConfigError as exc:
            raise TransferError(f"{ref.backend}: the source's cfg of the vTPM stub domain does not parse ({exc})") \
                from None
        if cfg.get("name") != ref.backend or first is None or len(links) != 1 or links[0]["uuid"] != ref.uuid:
            raise TransferError(f"{ref.backend}: the source's cfg names another domain, disk or vTPM UUID than the "
                                "moving vTPM (altered)")
        disks[0] = f"file:{self._incoming_image(ref)},{first['vdev']},{'w' if first['access'] == 'rw' else 'r'}"
        cfg["disk"] = disks
        cfg["vtpm"] = [f"backend={self.cfg.manager},uuid={ref.uuid}"]
        return format_cfg(cfg)

    def check_importable(self, export: VtpmExport) -> None:
        """Refuse before anything is written if the vTPM would overwrite anything of this host's."""
        ref = export.ref
        if self.move_key() is None:
            raise PreconditionFailed(f"{self.cfg.manager}: this host's vTPM manager cannot take vTPMs in (no "
                                     "transfer support); start it with transfer=1 (docs/protocol.md §9)")
        if domid_of(self.xs, ref.backend) is not None:
            raise PreconditionFailed(f"{ref.backend}: a domain of that name runs on this host; nothing was changed")
        for path in (Path(self.cfg.domain_cfg_dir) / f"{ref.backend}.cfg", self._incoming_image(ref)):
            if path.exists():
                raise PreconditionFailed(f"{path}: exists on this host; move it away to take {ref.backend} in "
                                         "(nothing was changed)")
        self._incoming_cfg(export)
        if export.state_hash not in self._slot_hashes(export.state):
            raise TransferError(f"{ref.backend}: the moving image has no slot that its secret names (altered)")

    def import_from(self, export: VtpmExport, transfer: str) -> None:
        """The image and the cfg that names it (durably, in that order), then the manager entry
        (provisional until ``adopt``).  Idempotent: recover may run it again."""
        ref = export.ref
        image = self._incoming_image(ref)
        write_atomic(image, export.state, mode=0o600)
        write_atomic(Path(self.cfg.domain_cfg_dir) / f"{ref.backend}.cfg", self._incoming_cfg(export).encode(),
                     mode=0o600)
        imported = self.mgr.import_entry(ref.uuid, transfer, export.envelope)
        if imported != export.state_hash:
            raise IntegrityError(f"{ref.backend}: the manager imported H {imported[:12]}…, the transfer announced "
                                 f"{export.state_hash[:12]}…; refusing to start it")

    def import_checkpoint(self, ref: VtpmRef, manager_checkpoint: str, transfer: str, envelope: bytes) -> None:
        self.mgr.import_entry(ref.uuid, transfer, envelope, checkpoint=manager_checkpoint)

    def adopt(self, ref: VtpmRef) -> None:
        self.mgr.adopt(ref.uuid)

    def remove(self, ref: VtpmRef) -> None:
        """This host's copy of the vTPM goes: its stub domain, its manager entry (a parked or
        provisional one only), its image and cfg.  Idempotent."""
        self.stop(ref)
        self.mgr.remove(ref.uuid)
        cfg = Path(self.cfg.domain_cfg_dir) / f"{ref.backend}.cfg"
        if not cfg.exists():
            return
        try:
            Path(disk_target(load_cfg(str(cfg)))).unlink(missing_ok=True)
            cfg.unlink()
            fsync_dir(cfg.parent)
        except OSError as exc:
            raise StorageError(f"{cfg}: cannot remove the moved vTPM's files ({exc.strerror})") from None
