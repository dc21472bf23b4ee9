"""The vTPM backend for Xen's stub domains: a vtpm-stubdom per guest, secrets held by vtpmmgr.

A vTPM's state is a pair: its disk image (``vtpmblk``) and the ``H‖K`` entry the manager keeps
for its UUID, where H names one of the image's two slots.  A capture copies both while the guest
is suspended; a put-back restores both (image first, durably, then the manager entry); a start
proves from the console that the vTPM loaded that state before anything can attach to it.

A restart is refused up front (``check_can_restart``) wherever Xen would bring the vTPM up fresh
or give the guest a vTPM that does not match its memory (docs/real-xen.md): a hypervisor without
XSM, an unprovisioned manager, no console to read the verdict from, startup mode ``clear``, an
image that is not raw.
"""
from __future__ import annotations

import contextlib
import os
import stat
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from xen_vtpm.config import Config
from xen_vtpm.durable import fsync_dir, storage_error, write_all, write_atomic
from xen_vtpm.errors import (
    DomainNotFound,
    IntegrityError,
    NoCheckpointFeature,
    PreconditionFailed,
    StorageError,
    TransferError,
    VtpmBusy,
    XenStoreTimeout,
    XenVtpmError,
    XlConfigError,
)
from xen_vtpm.model import VtpmCapture, VtpmExport, VtpmRef
from xen_vtpm.xen.consoles import LogTail, PtyReader, console_tty, log_path, tty_node
from xen_vtpm.xen.disks import vbds
from xen_vtpm.xen.domains import domid_of
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xl import Xl
from xen_vtpm.xen.xlcfg import disk_target, format_cfg, load_cfg, parse_cfg, parse_disk, parse_vtpm

from . import preflight
from .console import TPM_DISABLED, TPM_FAIL, BootVerdict, watch_boot
from .manager import ManagerClient
from .vtpmblk import slot_fingerprints

# The release race (docs/xen-internals.md §9.5): the manager may clear OPEN a while after the old stub
# domain's backend directory is gone, and a new stub that asks before then is refused as "open twice".
RELEASE_RETRIES = 5
RELEASE_BACKOFF = 0.5          # seconds before the second attempt, doubled for each later one
CONSOLE_TIMEOUT = 10.0         # xenconsoled publishes a new domain's pty within moments of its creation


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


@dataclass(frozen=True)
class StubDisk:
    """The vTPM's ``hda``: a raw image file, or a block device written in place."""
    path: Path
    block: bool


def read_image(disk: StubDisk) -> bytes:
    """The whole image.  blkback writes a block device with bios that bypass dom0's page cache, so cached
    pages of the device are dropped first (docs/xen-internals.md §5.6)."""
    try:
        fd = os.open(disk.path, os.O_RDONLY)
    except OSError as exc:
        raise storage_error(exc, disk.path, "reading the vTPM image") from None
    try:
        if disk.block:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        size = os.lseek(fd, 0, os.SEEK_END)
        data = os.pread(fd, size, 0)
    except OSError as exc:
        raise storage_error(exc, disk.path, "reading the vTPM image") from None
    finally:
        os.close(fd)
    if len(data) != size:
        raise IntegrityError(f"{disk.path}: read {len(data)} of {size} bytes of the vTPM image; check the disk")
    return data


def write_device(disk: StubDisk, image: bytes) -> None:
    """Put an image back onto a block device in place: replacing the device node (os.replace) would leave a
    regular file where the backend expects the device.  Not atomic, but the put-back step is journaled
    and redone whole by recover."""
    try:
        fd = os.open(disk.path, os.O_WRONLY)
    except OSError as exc:
        raise storage_error(exc, disk.path, "writing the vTPM image") from None
    try:
        size = os.lseek(fd, 0, os.SEEK_END)
        if size != len(image):
            raise PreconditionFailed(f"{disk.path}: the device holds {size} bytes but the vTPM image has "
                                     f"{len(image)}; it was resized since the checkpoint — restore its size")
        os.lseek(fd, 0, os.SEEK_SET)
        write_all(fd, image)
        os.fsync(fd)
    except OSError as exc:
        raise storage_error(exc, disk.path, "writing the vTPM image") from None
    finally:
        os.close(fd)


class StubdomBackend:
    """VtpmBackend for Xen's vTPM stub domains and a vtpmmgr with the checkpoint extension."""

    def __init__(self, cfg: Config, xs: XenStore, xl: Xl) -> None:
        self.cfg, self.xs, self.xl = cfg, xs, xl
        self.mgr = ManagerClient(cfg, xs)
        self._verified: dict[str, int] = {}     # stub name -> the domid this process saw load its state

    def _cfg_file(self, ref: VtpmRef) -> Path:
        path = Path(self.cfg.domain_cfg_dir) / f"{ref.backend}.cfg"
        if not path.is_file():
            raise PreconditionFailed(f"{ref.backend}: its xl cfg {path} is missing; xen-vtpm needs it to "
                                     "re-create the vTPM stub domain (set domain_cfg_dir in the config)")
        return path

    def _disk(self, ref: VtpmRef) -> StubDisk:
        """Where the vTPM's image is: the running stub's vbd backend (what Xen really serves), else the
        first disk of its cfg; only a raw image on a regular file or a block device will do."""
        domid = domid_of(self.xs, ref.backend)
        disks = vbds(self.xs, domid) if domid is not None else []
        if disks:
            fmt, target, origin = disks[0].format, disks[0].path, f"its vbd backend ({disks[0].vdev})"
        else:
            disk = parse_disk(str((load_cfg(str(self._cfg_file(ref))).get("disk") or [""])[0]))
            fmt, target, origin = disk["format"], disk["target"], f"its cfg {self._cfg_file(ref)}"
        if fmt != "raw":
            raise PreconditionFailed(f"{ref.backend}: its disk {target} is a {fmt} image (from {origin}); xen-vtpm "
                                     "reads and writes the vTPM's raw slots — convert it with `qemu-img convert -O "
                                     "raw` and use the raw image as hda")
        try:
            mode = os.stat(target).st_mode
        except OSError as exc:
            raise PreconditionFailed(f"{ref.backend}: its disk {target} (from {origin}) cannot be read "
                                     f"({exc.strerror}); fix the vTPM's disk= line") from None
        if not (stat.S_ISREG(mode) or stat.S_ISBLK(mode)):
            raise PreconditionFailed(f"{ref.backend}: its disk {target} is neither a file nor a block device; "
                                     "fix the vTPM's disk= line")
        return StubDisk(Path(target), stat.S_ISBLK(mode))

    def supports_checkpoints(self, ref: VtpmRef) -> bool:
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

    def check_can_capture(self, ref: VtpmRef) -> None:
        """An unprovisioned manager refuses to keep a checkpoint entry (it could never write it to its
        disk, nor reload the vTPM from it): say so, with the fix, before the guest is suspended."""
        check = preflight.provisioned(self.xs, self.mgr, strict=False)
        if not check.passed:
            raise PreconditionFailed(f"{ref.backend}: no checkpoint can be taken: {check.detail}; fix: {check.fix}")

    def check_can_restart(self, ref: VtpmRef) -> None:
        """Refuse, before anything is touched, a restart of the vTPM that Xen would answer with a fresh
        vTPM or with one that does not match its guest's memory; the message names the missing piece."""
        failed = next((c for c in preflight.restart_checks(self.cfg, self.xs, self.xl, self.mgr, ref.backend,
                                                          self._cfg_file(ref)) if not c.passed), None)
        if failed is not None:
            raise PreconditionFailed(f"{ref.backend}: cannot restart the vTPM without it coming up "
                                     f"{'fresh' if failed.name != 'vtpm-startup' else 'with reset PCRs'}: "
                                     f"{failed.detail}; fix: {failed.fix}")
        self._disk(ref)

    def _xl_state(self, ref: VtpmRef) -> str | None:
        """`xl list`'s state flags for the stub domain, None if the toolstack does not list it."""
        return next((row["state"] for row in self.xl.list() if row["name"] == ref.backend), None)

    def is_running(self, ref: VtpmRef) -> bool:
        """Exists and has not crashed or begun dying (a crashed stub domain serves nothing)."""
        if domid_of(self.xs, ref.backend) is None:
            return False
        return not ({"c", "d"} & set(self._xl_state(ref) or ""))

    def fingerprint(self, ref: VtpmRef) -> tuple[str, str]:
        return self._slot_hashes(read_image(self._disk(ref)))

    def capture(self, ref: VtpmRef, checkpoint_id: str) -> VtpmCapture:
        """Manager copy + image copy while the vTPM is quiescent; they must name the same slot."""
        disk = self._disk(ref)
        manager_hash = self.mgr.checkpoint(ref.uuid, checkpoint_id).lower()
        image = read_image(disk)
        slots = self._slot_hashes(image)
        if manager_hash not in slots:
            self.mgr.discard(checkpoint_id)
            raise IntegrityError(f"{ref.backend}: the manager's hash {manager_hash[:12]}… matches neither slot of "
                                 "the vTPM image; the vTPM was not quiescent — retry the snapshot")
        return VtpmCapture(image=image, manager_checkpoint=checkpoint_id, manager_hash=manager_hash,
                           slot_hashes=slots)

    def capture_fingerprint(self, ref: VtpmRef) -> VtpmCapture:
        """Stock manager: only the image and its slot fingerprints (forward-only vTPM)."""
        image = read_image(self._disk(ref))
        return VtpmCapture(image=image, manager_checkpoint=None, manager_hash=None,
                           slot_hashes=self._slot_hashes(image))

    def _slot_hashes(self, image: bytes) -> tuple[str, str]:
        slots = slot_fingerprints(image)
        return (slots[0] or "", slots[1] or "")

    def stop(self, ref: VtpmRef) -> None:
        domid = domid_of(self.xs, ref.backend)
        if domid is None:
            if self._xl_state(ref) is not None:   # an `xl create` killed before the domain had its XenStore name
                self.xl.destroy(ref.backend)
            return
        self._verified.pop(ref.backend, None)
        self.xl.destroy(ref.backend)
        mgr_domid = self.mgr.info().domid
        wait_released(self.xs, domid, mgr_domid, self.cfg.manager_timeout)

    def put_back(self, ref: VtpmRef, capture: VtpmCapture) -> None:
        if capture.manager_checkpoint is None:
            raise PreconditionFailed(f"{ref.backend}: the stock manager cannot restore a vTPM entry")
        if self.is_running(ref):
            raise PreconditionFailed(f"{ref.backend}: still running; it must be stopped before its image is replaced")
        # The image must be on disk before the manager entry that names one of its slots.
        disk = self._disk(ref)
        if disk.block:
            write_device(disk, capture.image)
        else:
            try:
                mode = stat.S_IMODE(disk.path.stat().st_mode)
            except FileNotFoundError:
                mode = 0o600
            write_atomic(disk.path, capture.image, mode=mode)
        self.mgr.restore(ref.uuid, capture.manager_checkpoint)

    def start_verified(self, ref: VtpmRef) -> None:
        """Create the vTPM stub domain and prove it loaded its state before anything attaches (I1).

        A stub this process did not see load is restarted: nothing can attach to it meanwhile (its
        guest is down), and a fresh vTPM that received no command has destroyed nothing yet."""
        domid = domid_of(self.xs, ref.backend)
        if domid is not None and self._verified.get(ref.backend) == domid and self.is_running(ref):
            return
        self.check_can_restart(ref)
        for attempt in range(RELEASE_RETRIES):
            self.stop(ref)          # a crashed, dying or unproven one is destroyed and made again
            verdict = self._boot(ref)
            if verdict.loaded:
                return
            self.stop(ref)
            if verdict.manager_rc != TPM_DISABLED or attempt == RELEASE_RETRIES - 1:
                break
            time.sleep(RELEASE_BACKOFF * 2 ** attempt)   # the manager has not released the old stub yet
        raise self._start_error(ref, verdict)

    def _boot(self, ref: VtpmRef) -> BootVerdict:
        """One boot, watched on the console from its first line: created paused, the pty opened, unpaused."""
        log = LogTail(log_path(self.cfg.log_dir, ref.backend))
        self.xl.create(str(self._cfg_file(ref)), paused=True)
        try:
            domid = domid_of(self.xs, ref.backend)
            if domid is None:
                raise XenStoreTimeout(f"{ref.backend}: `xl create` returned but the domain is not in XenStore")
            tty: list[str] = []

            def published() -> bool:
                found = console_tty(self.xs, domid)
                tty[:] = [found] if found else []
                return bool(found)
            if not self.xs.wait_for(published, [tty_node(domid)], CONSOLE_TIMEOUT):
                raise PreconditionFailed(f"{ref.backend}: xenconsoled published no console for domain {domid} "
                                         f"within {CONSOLE_TIMEOUT:g} s, so its load cannot be verified; start "
                                         "xenconsoled (docs/real-xen.md), then run `xen-vtpm recover`")
            with PtyReader(tty[0]) as pty:
                self.xl.unpause(ref.backend)
                verdict = watch_boot(pty, log, self.cfg.manager_timeout, lambda: self.is_running(ref))
        except BaseException:
            with contextlib.suppress(XenVtpmError):
                self.xl.destroy(ref.backend)   # never leave an unproven vTPM behind
            raise
        if verdict.loaded:
            self._verified[ref.backend] = domid
        return verdict

    def _start_error(self, ref: VtpmRef, verdict: BootVerdict) -> XenVtpmError:
        where = "destroyed before any guest attached, the checkpoint is intact"
        if verdict.kind == "pending":
            return XenStoreTimeout(f"{ref.backend}: {verdict.reason}; {where} — check the stub domain, then run "
                                   "`xen-vtpm recover`")
        refusal = {TPM_DISABLED: "another stub domain still holds it open, or its XSM label's hash is not in the "
                                 "manager's kernel list",
                   TPM_FAIL: "the manager cannot read its XSM label (no XSM/FLASK)"}.get(verdict.manager_rc or 0)
        if refusal:
            return PreconditionFailed(f"{ref.backend}: came up without its state ({verdict.reason}); {where}. The "
                                      f"manager refuses to open it: {refusal} (docs/real-xen.md) — fix that, then run "
                                      "`xen-vtpm recover`")
        return IntegrityError(f"{ref.backend}: came up without its state ({verdict.reason}); {where} — run "
                              "`xen-vtpm recover`")

    def discard(self, ref: VtpmRef, manager_checkpoint: str) -> None:
        self.mgr.discard(manager_checkpoint)

    # --- moves (docs/migration.md): H‖K travels between managers, wrapped for the receiving
    # manager's TPM-resident transfer key, and never reaches dom0 in clear -------------------------
    def move_key(self) -> bytes | None:
        try:
            return self.mgr.info().transfer_key
        except DomainNotFound:
            return None

    def check_can_move(self, ref: VtpmRef) -> None:
        if self.move_key() is None:
            raise NoCheckpointFeature(f"{ref.backend}: this host's vTPM manager cannot move vTPMs (no transfer "
                                      "support); start it with transfer=1 (docs/protocol.md §9)")

    def export_for(self, ref: VtpmRef, transfer: str, recipient: bytes) -> VtpmExport:
        """Park the vTPM's entry at the manager (no vTPM stub domain can load or save it until
        ``unexport``) and take its image, which the parked entry's H must name."""
        manager_hash, envelope = self.mgr.export(ref.uuid, transfer, recipient)
        config = self._cfg_file(ref).read_text(encoding="utf-8")
        image = read_image(self._disk(ref))
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

    def import_checkpoint(self, ref: VtpmRef, capture: VtpmCapture, transfer: str, envelope: bytes) -> VtpmCapture:
        self.mgr.import_entry(ref.uuid, transfer, envelope, checkpoint=capture.manager_checkpoint or "")
        return capture

    def incoming_stream(self, ref: VtpmRef, blocks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        """The guest's cfg names the stub domain, which keeps its name here: the stream as it came."""
        return iter(blocks)

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
            image = Path(disk_target(load_cfg(str(cfg))))
            if not image.is_block_device():     # a device stays, as the operator set it up
                image.unlink(missing_ok=True)
            cfg.unlink()
            fsync_dir(cfg.parent)
        except OSError as exc:
            raise StorageError(f"{cfg}: cannot remove the moved vTPM's files ({exc.strerror})") from None
