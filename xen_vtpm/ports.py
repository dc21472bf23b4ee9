"""The coordinator's ports: every piece of I/O it needs, behind small objects.

`open_ports(cfg)` wires the real components (xl, XenStore, the vTPM backend,
the checkpoint store, the host TPM, the audit log, the journal) for one
command.  The coordinator only calls the methods here, so the sequences stay
free of sockets, processes and file formats.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

from .config import Config
from .durable import write_atomic
from .errors import DomainNotFound, IntegrityError, PreconditionFailed, StorageError, UsageError, XlError
from .journal import Journal
from .locks import VmLock
from .topology import vtpm_links
from .vtpm.base import VtpmCapture, VtpmRef
from .xenstore import XenStore
from .xl import Xl
from .xlstreams import XlStreams


def domid_of(xs: XenStore, name: str) -> int | None:
    for d in xs.ls("/local/domain"):
        if d.isdigit() and xs.read_or(f"/local/domain/{d}/name") == name:
            return int(d)
    return None


# --- guests --------------------------------------------------------------------------
class Guests:
    """Guest domains and their vTPM, read from XenStore's trusted copies."""

    def __init__(self, cfg: Config, xs: XenStore, xl: Xl) -> None:
        self.cfg, self.xs, self.xl = cfg, xs, xl

    def _domid(self, name: str) -> int | None:
        return domid_of(self.xs, name)

    def exists(self, name: str) -> bool:
        return self._domid(name) is not None

    def _row(self, name: str) -> dict:
        return next((row for row in self.xl.list() if row["name"] == name), {"state": "", "mem": 0})

    def is_paused(self, name: str) -> bool:
        return "p" in self._row(name)["state"]

    def find(self, domain: str) -> Any:
        from .coordinator import Guest
        domid = int(domain) if domain.isdigit() else self._domid(domain)
        if domid is None or not self.xs.exists(f"/local/domain/{domid}"):
            raise DomainNotFound(f"{domain}: no such domain; check `xen-vtpm list`")
        name = self.xs.read(f"/local/domain/{domid}/name")
        vm_path = self.xs.read_or(f"/local/domain/{domid}/vm") or ""
        vm_uuid = vm_path.rsplit("/", 1)[-1]
        if not vm_uuid:
            raise PreconditionFailed(f"{name}: domain has no /vm entry in XenStore; is it a fully created guest?")
        links = vtpm_links(self.xs, domid)
        if not links:
            raise PreconditionFailed(f"{name}: the guest has no vTPM; use `xl save`/`xl restore` directly")
        if len(links) > 1:
            raise PreconditionFailed(f"{name}: the guest has {len(links)} vTPMs; only one per guest is supported")
        link = links[0]
        if link["uuid_check"] != "ok":
            raise IntegrityError(f"{name}: vTPM {link['devid']} identity check failed ({link['uuid_check']}); "
                                 "the backend uuid disagrees with libxl's trusted copy — investigate before "
                                 "snapshotting")
        # The vTPM's identity at the manager is the UUID of the stub domain's own link to it,
        # not the guest's device uuid (facts §2.4).
        mgr_links = vtpm_links(self.xs, link["backend_domid"]) if link["backend_domid"] is not None else []
        if len(mgr_links) != 1 or mgr_links[0]["uuid_check"] != "ok":
            raise PreconditionFailed(f"{link['backend_name']}: the vTPM stub domain has no single verified link "
                                     "to the vTPM manager; check `xen-vtpm list`")
        ref = VtpmRef(guest=name, devid=link["devid"], backend=link["backend_name"], uuid=mgr_links[0]["uuid"])
        row = self._row(name)
        return Guest(name=name, domid=domid, uuid=vm_uuid, vtpm=ref, paused="p" in row["state"], mem_mib=row["mem"])

    def vtpm_by_backend(self, backend: str) -> VtpmRef | None:
        return VtpmRef(guest="", devid=0, backend=backend, uuid="") if backend else None

    def vtpm_ref_for(self, ckpt: dict) -> VtpmRef:
        return VtpmRef(guest=ckpt["vm_name"], devid=0, backend=ckpt["vtpm_backend"], uuid=ckpt["vtpm_uuid"])


# --- vTPM backend: Xen vtpmmgr + vTPM stub domains -----------------------------------
class StubdomBackend:
    """VtpmBackend for Xen's vTPM stub domains and a vtpmmgr with the checkpoint extension."""

    def __init__(self, cfg: Config, xs: XenStore, xl: Xl) -> None:
        from .vtpm import stubdom
        self.cfg, self.xs, self.xl, self.sd = cfg, xs, xl, stubdom
        self._mgr = None

    @property
    def mgr(self) -> Any:
        if self._mgr is None:
            self._mgr = self.sd.ManagerClient(self.cfg, self.xs)
        return self._mgr

    def _cfg_file(self, ref: VtpmRef) -> Path:
        path = Path(self.cfg.domain_cfg_dir) / f"{ref.backend}.cfg"
        if not path.is_file():
            raise PreconditionFailed(f"{ref.backend}: its xl cfg {path} is missing; xen-vtpm needs it to "
                                     "re-create the vTPM stub domain (set domain_cfg_dir in the config)")
        return path

    def _image(self, ref: VtpmRef) -> Path:
        from .xlcfg import disk_target, load_cfg
        return Path(disk_target(load_cfg(str(self._cfg_file(ref)))))

    def _domid(self, name: str) -> int | None:
        return domid_of(self.xs, name)

    def supports_checkpoints(self) -> bool:
        return self.mgr.supports_checkpoints()

    def check_single_consumer(self, ref: VtpmRef) -> None:
        domid = self._domid(ref.backend)
        if domid is None:
            raise PreconditionFailed(f"{ref.backend}: the vTPM stub domain is not running")
        frontends = self.xs.ls(f"/local/domain/{domid}/backend/vtpm") if self.xs.exists(
            f"/local/domain/{domid}/backend/vtpm") else []
        if len(frontends) != 1:
            from .errors import VtpmBusy
            raise VtpmBusy(f"{ref.backend}: serves {len(frontends)} frontends ({', '.join(frontends) or 'none'}); "
                           "a checkpoint needs exactly one consumer — detach the others first")

    def is_running(self, ref: VtpmRef) -> bool:
        """Exists and has not crashed or begun dying (a crashed stub domain serves nothing)."""
        if self._domid(ref.backend) is None:
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
        slots = self.sd.slot_fingerprints(image)
        return (slots[0] or "", slots[1] or "")

    def stop(self, ref: VtpmRef) -> None:
        domid = self._domid(ref.backend)
        if domid is None:
            return
        self.xl.destroy(ref.backend)
        mgr_domid = self.mgr.info().domid
        self.sd.wait_released(self.xs, domid, mgr_domid, self.cfg.manager_timeout)

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
        if self.is_running(ref) and self.sd.console_status(self.cfg, ref.backend).loaded:
            return
        self.stop(ref)  # a crashed, dying or unproven one is destroyed and made again
        offset = self.sd.log_offset(self.cfg, ref.backend)
        self.xl.create(str(self._cfg_file(ref)))
        status = self.sd.wait_console_status(self.cfg, ref.backend, offset, self.cfg.manager_timeout)
        if not status.loaded:
            self.xl.destroy(ref.backend)
            raise IntegrityError(f"{ref.backend}: came up without its state ({status.reason}); destroyed before "
                                 "any guest attached, the checkpoint is intact — run `xen-vtpm recover`")

    def discard(self, manager_checkpoint: str) -> None:
        self.mgr.discard(manager_checkpoint)


# --- store ---------------------------------------------------------------------------
def _metadata_blob(meta: dict[str, Any]) -> bytes:
    """Canonical JSON: the store MACs the blob, so equal metadata must give equal bytes."""
    return json.dumps(meta, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode("ascii")


def _metadata(manifest: Any) -> dict[str, Any]:
    """What ``CheckpointWriter.commit`` put in the (MAC-checked) manifest's metadata blob."""
    try:
        meta = json.loads(manifest.metadata)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise IntegrityError(f"checkpoint {manifest.checkpoint_id}: its metadata is not the JSON object "
                             "xen-vtpm writes; do not use this checkpoint")
    return meta


class CheckpointWriter:
    """Adapter from the coordinator's words to the store writer: what the store does not know
    (the vTPM, the kind of checkpoint, the save file) goes into its opaque metadata blob."""

    def __init__(self, writer: Any, meta: dict[str, Any]) -> None:
        self.w, self.meta = writer, dict(meta)

    def add_stream(self, name: str, source: Any, progress: Any = None) -> Any:
        return self.w.add_stream(name, source, progress=progress)

    def set_vtpm(self, capture: VtpmCapture) -> None:
        self.w.add_blob("vtpm-image", capture.image)
        self.meta.update(manager_checkpoint=capture.manager_checkpoint or "", slot_hashes=list(capture.slot_hashes),
                         manager_hash=capture.manager_hash)

    def set_meta(self, **extra: Any) -> None:
        self.meta.update(extra)

    def commit(self) -> dict:
        self.w.set_metadata(_metadata_blob(self.meta))
        manifest = self.w.commit()
        return {"size": manifest.size, "stored_bytes": self.w.stored_bytes}

    def abort(self) -> None:
        self.w.abort()


class Store:
    def __init__(self, cfg: Config, keys: Any) -> None:
        from .store import Repository
        self.repo = Repository(cfg.state_dir, keys)

    def check_writable(self) -> None:
        self.repo.check_writable()

    def check_name_free(self, vm_uuid: str, name: str) -> None:
        if any(c["name"] == name for c in self.repo.list_checkpoints(vm_uuid)):
            raise UsageError(f"checkpoint name {name!r} is already used for this VM; choose another --name")

    def begin(self, checkpoint_id: str, *, name: str, vm_uuid: str, vm_name: str, vtpm_uuid: str,
              vtpm_backend: str, kind: str) -> CheckpointWriter:
        w = self.repo.begin_checkpoint(vm_uuid, vm_name, name=name, checkpoint_id=checkpoint_id)
        return CheckpointWriter(w, {"vtpm_uuid": vtpm_uuid, "vtpm_backend": vtpm_backend, "kind": kind})

    def abort(self, checkpoint_id: str) -> None:
        """Nothing to do without a live writer: the store's own recover() removed the partial write."""

    def _describe(self, row: dict) -> dict:
        with self.repo.open_checkpoint(row["id"]) as reader:
            m = reader.manifest
        meta = _metadata(m)
        # Identity from the MAC'd manifest, never from the catalog row.
        return dict(row, id=m.checkpoint_id, name=m.name, vm_uuid=m.vm_uuid, vm_name=m.vm_name,
                    vtpm_uuid=meta.get("vtpm_uuid"), manager_checkpoint=meta.get("manager_checkpoint") or None,
                    kind=meta.get("kind"), vtpm_backend=meta.get("vtpm_backend"),
                    save_file_digest=meta.get("save_file_digest"))

    def row(self, ref: str, vm_uuid: str | None = None) -> dict:
        """The catalog row of a checkpoint, without opening (and so checking) its manifest."""
        return self.repo.resolve(ref, vm_uuid=vm_uuid)

    def resolve(self, ref: str, vm_uuid: str | None = None) -> dict:
        return self._describe(self.repo.resolve(ref, vm_uuid=vm_uuid))

    def list(self, vm_uuid: str | None = None) -> list[dict]:
        return self.repo.list_checkpoints(vm_uuid)

    def vm_uuid_of(self, vm_name: str) -> str | None:
        """Checkpoints outlive their domain: find a VM by the name its checkpoints recorded."""
        return next((c["vm_uuid"] for c in self.repo.list_checkpoints() if c["vm_name"] == vm_name), None)

    def list_described(self, vm_uuid: str | None) -> list[dict]:
        """Rows for `checkpoints`; `verified` checks the manifest MAC only (`verify` reads every chunk)."""
        rows = []
        for row in self.repo.list_checkpoints(vm_uuid):
            try:
                info = self._describe(row)
                state = "manifest ok"
            except IntegrityError as exc:
                info, state = dict(row, kind=None), f"FAILED: {exc}"
            rows.append({"id": info["id"], "name": info["name"], "domain": info["vm_name"], "kind": info["kind"],
                         "time": info["time"], "size": info["size"], "stored_bytes": info["stored_bytes"],
                         "verified": state})
        return rows

    def verify(self, checkpoint_id: str) -> dict:
        return self.repo.verify(checkpoint_id)

    def delete(self, checkpoint_id: str, missing_ok: bool = False) -> int:
        return self.repo.delete(checkpoint_id, missing_ok=missing_ok)

    def recover(self) -> dict:
        return self.repo.recover()

    def is_committed(self, checkpoint_id: str) -> bool:
        return self.repo.is_committed(checkpoint_id)

    def vtpm_capture(self, checkpoint_id: str) -> VtpmCapture:
        with self.repo.open_checkpoint(checkpoint_id) as reader:
            meta = _metadata(reader.manifest)
            image = reader.read_blob("vtpm-image")
        hashes = tuple(meta.get("slot_hashes", ())) + ("", "")
        return VtpmCapture(image=image, manager_checkpoint=meta.get("manager_checkpoint") or None,
                           manager_hash=meta.get("manager_hash"), slot_hashes=hashes[:2])

    def _save_bindings(self) -> Iterator[dict]:
        """Described `save` checkpoints; a damaged manifest is raised only after the intact ones,
        so one tampered checkpoint does not hide every other binding (nor pass for a miss)."""
        damaged: IntegrityError | None = None
        for row in self.repo.list_checkpoints():
            try:
                info = self._describe(row)
            except IntegrityError as exc:
                damaged = damaged or exc
                continue
            if info["kind"] == "save":
                yield info
        if damaged is not None:
            raise damaged

    def find_by_save_digest(self, digest: str) -> dict | None:
        return next((b for b in self._save_bindings() if b["save_file_digest"] == digest), None)

    def has_save_bindings(self, xl_config: dict) -> bool:
        """Whether `xen-vtpm save` bound any file for the VM an xl save header names."""
        c_info = xl_config.get("c_info") or {}
        return any(b["vm_uuid"] == c_info.get("uuid") or b["vm_name"] == c_info.get("name")
                   for b in self._save_bindings())

    def catalog_digest(self) -> bytes:
        return self.repo.catalog_digest()


# --- host TPM + audit ----------------------------------------------------------------
class HostPort:
    def __init__(self, cfg: Config, store: Store) -> None:
        from . import provision
        self.host = provision.open_host(cfg)
        self.store = store

    @property
    def keys(self) -> Any:
        return self.host.keys

    def exclusive(self) -> Any:
        """The host lock: a catalog change and the head advance that binds it happen inside it,
        so no freshness check ever sees one without the other."""
        from . import provision
        return provision.tpm_session(self.host.cfg)

    def check_fresh(self) -> None:
        """The head must match the TPM counter (no replay) and the catalog it was bound to
        (no checkpoint rows added, removed or put back)."""
        from . import catalog_head
        with self.exclusive():
            self.host.check_fresh()
            conn = catalog_head.connect(self.host.state_dir)
            try:
                current, pending = catalog_head.read(conn, self.host.keys)
            finally:
                conn.close()
            digest = self.store.catalog_digest()
            bound = {h.catalog_digest for h in (current, pending) if h is not None}
            if digest in bound or (bound == {catalog_head.GENESIS} and not self.store.list()):
                return
            raise IntegrityError("catalog: its checkpoint rows differ from the ones the TPM-bound head records "
                                 "(rows added, removed or put back); if a command was interrupted run "
                                 "`xen-vtpm recover`, otherwise restore the newest state dir")

    def advance(self) -> None:
        self.host.advance(self.store.catalog_digest())

    def recover_head(self) -> None:
        self.host.recover_head()

    def authorize_rollback(self, secret: bytes | None) -> None:
        self.host.authorize_rollback(secret)


class AuditPort:
    def __init__(self, host: HostPort) -> None:
        self.host = host

    def append(self, *, action: str, vm: str | None, checkpoint: str | None, result: str, detail: str = "") -> None:
        self.host.host.audit(action, vm=vm, checkpoint=checkpoint, result=result, detail=detail)

    def closed_ops(self) -> set[int]:
        """Journal operations the (verified, MAC'd, counter-anchored) log records as ended."""
        from . import audit
        cfg = self.host.host.cfg
        audit.verify(cfg)
        return {int(m.group(1)) for r in audit.records(cfg)
                if (m := re.fullmatch(r"op (\d+)", r.get("detail") or ""))}


@dataclass
class Ports:
    cfg: Config
    xs: XenStore
    xl: Xl
    guests: Guests
    vtpm: StubdomBackend
    store: Store
    host: HostPort
    audit: AuditPort
    journal: Journal
    xl_streams: XlStreams

    def lock(self, vm_uuid: str, label: str) -> VmLock:
        return VmLock(Path(self.cfg.state_dir), vm_uuid, label)

    def close(self) -> None:
        self.journal.close()
        self.store.repo.close()
        self.xs.close()


def open_ports(cfg: Config, progress: Callable[..., Any] | None = None) -> Ports:
    state = Path(cfg.state_dir)
    if not state.is_dir():
        raise PreconditionFailed(f"{state}: state dir missing; run `xen-vtpm init` first")
    if stat.S_IMODE(state.stat().st_mode) & 0o077:
        raise StorageError(f"{state}: state dir is accessible to other users; `chmod 700 {state}`")
    from .hooks import real_xl
    with contextlib.suppress(XlError):  # no xl at all: commands that need it say so when they run it
        cfg.xl = real_xl(cfg.xl)
    xs = XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout)
    xl = Xl(cfg)
    from . import provision
    keys = provision.open_host(cfg).keys
    store = Store(cfg, keys)
    host = HostPort(cfg, store)
    journal = Journal(state / "catalog.sqlite", keys.journal_mac)
    return Ports(cfg=cfg, xs=xs, xl=xl, guests=Guests(cfg, xs, xl), vtpm=StubdomBackend(cfg, xs, xl),
                 store=store, host=host, audit=AuditPort(host), journal=journal,
                 xl_streams=XlStreams(cfg, xl, store, progress))


checkpoints_table = ["id", "name", "domain", "kind", "time", "size", "stored_bytes", "verified"]
