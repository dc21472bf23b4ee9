"""Checkpoints as the coordinator sees them: typed records over the checkpoint store.

The store (``xen_vtpm.store``) keeps streams, blobs and one opaque metadata blob per
checkpoint and knows nothing of guests or vTPMs; this module gives that blob its meaning
(``model.CheckpointMeta``) and turns catalog rows and manifests into ``model`` values.
Identity always comes from the MAC'd manifest, never from a catalog row alone.
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from xen_vtpm.errors import IntegrityError, UsageError
from xen_vtpm.model import CatalogEntry, Checkpoint, CheckpointMeta, VtpmCapture
from xen_vtpm.store import CheckpointWriter, Repository, Sink

VTPM_IMAGE = "vtpm-image"
MEMORY = "memory"


class Draft:
    """A checkpoint being written: streams now, the vTPM capture and metadata at commit."""

    def __init__(self, writer: CheckpointWriter, kind: str, vtpm_uuid: str, vtpm_backend: str) -> None:
        self._w = writer
        self._kind, self._vtpm_uuid, self._vtpm_backend = kind, vtpm_uuid, vtpm_backend
        self._capture: VtpmCapture | None = None

    def add_stream(self, name: str, source: Any, progress: Callable[[int], Any] | None = None) -> Any:
        return self._w.add_stream(name, source, progress=progress)

    def set_vtpm(self, capture: VtpmCapture) -> None:
        self._w.add_blob(VTPM_IMAGE, capture.image)
        self._capture = capture

    def commit(self, **details: Any) -> dict[str, Any]:
        """``details``: the CheckpointMeta fields that are not the vTPM's (save file, pause window...)."""
        if self._capture is None:
            raise UsageError(f"checkpoint {self._w.checkpoint_id}: no vTPM capture to commit")
        meta = CheckpointMeta(kind=self._kind, vtpm_uuid=self._vtpm_uuid, vtpm_backend=self._vtpm_backend,
                              manager_checkpoint=self._capture.manager_checkpoint,
                              manager_hash=self._capture.manager_hash,
                              slot_hashes=self._capture.slot_hashes, backend_kind=self._capture.backend_kind,
                              **details)
        self._w.set_metadata(meta.encode())
        manifest = self._w.commit()
        return {"size": manifest.size, "stored_bytes": self._w.stored_bytes}

    def abort(self) -> None:
        self._w.abort()


class Checkpoints:
    """The coordinator's checkpoint store."""

    def __init__(self, repo: Repository) -> None:
        self.repo = repo

    def close(self) -> None:
        self.repo.close()

    # --- writing --------------------------------------------------------------------------
    def check_writable(self) -> None:
        self.repo.check_writable()

    def check_name_free(self, vm_uuid: str, name: str) -> None:
        if any(c["name"] == name for c in self.repo.list_checkpoints(vm_uuid)):
            raise UsageError(f"checkpoint name {name!r} is already used for this VM; choose another --name")

    def begin(self, checkpoint_id: str, *, name: str, vm_uuid: str, vm_name: str, vtpm_uuid: str,
              vtpm_backend: str, kind: str) -> Draft:
        writer = self.repo.begin_checkpoint(vm_uuid, vm_name, name=name, checkpoint_id=checkpoint_id)
        return Draft(writer, kind, vtpm_uuid, vtpm_backend)

    # --- reading ----------------------------------------------------------------------------
    def entry(self, ref: str, vm_uuid: str | None = None) -> CatalogEntry:
        """A catalog row by id or name, without opening (and so checking) its manifest."""
        return CatalogEntry(**self.repo.resolve(ref, vm_uuid=vm_uuid))

    def entries(self, vm_uuid: str | None = None) -> list[CatalogEntry]:
        return [CatalogEntry(**row) for row in self.repo.list_checkpoints(vm_uuid)]

    def get(self, ref: str, vm_uuid: str | None = None) -> Checkpoint:
        """A checkpoint with its manifest MAC checked; identity from the manifest."""
        return self._describe(self.entry(ref, vm_uuid))

    def _describe(self, entry: CatalogEntry) -> Checkpoint:
        with self.repo.open_checkpoint(entry.id) as reader:
            m = reader.manifest
        return Checkpoint(id=m.checkpoint_id, name=m.name, vm_uuid=m.vm_uuid, vm_name=m.vm_name, time=entry.time,
                          size=entry.size, stored_bytes=entry.stored_bytes,
                          meta=CheckpointMeta.decode(m.metadata, entry.id))

    def vm_uuid_of(self, vm_name: str) -> str | None:
        """Checkpoints outlive their domain: find a VM by the name its checkpoints recorded."""
        return next((e.vm_uuid for e in self.entries() if e.vm_name == vm_name), None)

    def described(self, vm_uuid: str | None) -> list[tuple[CatalogEntry, Checkpoint | IntegrityError]]:
        """Every entry with its checked checkpoint, or the integrity error opening it gave."""
        out: list[tuple[CatalogEntry, Checkpoint | IntegrityError]] = []
        for entry in self.entries(vm_uuid):
            try:
                out.append((entry, self._describe(entry)))
            except IntegrityError as exc:
                out.append((entry, exc))
        return out

    def vtpm_capture(self, checkpoint: Checkpoint) -> VtpmCapture:
        with self.repo.open_checkpoint(checkpoint.id) as reader:
            image = reader.read_blob(VTPM_IMAGE)
        meta = checkpoint.meta
        return VtpmCapture(image=image, manager_checkpoint=meta.manager_checkpoint, manager_hash=meta.manager_hash,
                           slot_hashes=meta.slot_hashes, backend_kind=meta.backend_kind)

    def memory_blocks(self, checkpoint_id: str, progress: Callable[[int], Any] | None = None) -> Iterator[bytes]:
        """The guest memory of a checkpoint ``verify`` checked, block by block (GCM tags only); a move
        sends it.  A generator: the store is opened on the first ``next`` in the thread that consumes it."""
        with self.repo.open_checkpoint(checkpoint_id) as reader:
            yield from reader.stream(MEMORY, progress=progress, full_check=False)

    def _save_bindings(self) -> Iterator[Checkpoint]:
        """Checked `save` checkpoints; a damaged manifest is raised only after the intact ones,
        so one tampered checkpoint does not hide every other binding (nor pass for a miss)."""
        damaged: IntegrityError | None = None
        for _, ckpt in self.described(None):
            if isinstance(ckpt, IntegrityError):
                damaged = damaged or ckpt
            elif ckpt.kind == "save":
                yield ckpt
        if damaged is not None:
            raise damaged

    def find_by_save_digest(self, digest: str) -> Checkpoint | None:
        return next((c for c in self._save_bindings() if c.meta.save_file_digest == digest), None)

    def has_save_bindings(self, vm_uuid: str | None, vm_name: str | None) -> bool:
        """Whether `xen-vtpm save` bound any file for this VM (by UUID or name)."""
        return any(c.vm_uuid == vm_uuid or c.vm_name == vm_name for c in self._save_bindings())

    # --- checking and removing -------------------------------------------------------------------
    def verify(self, checkpoint_id: str, memory_into: Any = None) -> dict[str, Any]:
        """Check everything; ``memory_into`` (an image spool: ``fd``, ``ctr``) receives the guest memory
        it checked, which a rollback restores from."""
        sinks = {MEMORY: Sink(memory_into.fd, memory_into.ctr)} if memory_into is not None else None
        return self.repo.verify(checkpoint_id, sinks)

    def delete(self, checkpoint_id: str, missing_ok: bool = False) -> int:
        return self.repo.delete(checkpoint_id, missing_ok=missing_ok)

    def holds(self) -> set[str]:
        """Checkpoints marked with `keep` (the catalog digest covers the marks)."""
        return self.repo.holds()

    def set_hold(self, checkpoint_id: str, held: bool) -> None:
        self.repo.set_hold(checkpoint_id, held)

    def recover(self) -> dict[str, Any]:
        return self.repo.recover()

    def is_committed(self, checkpoint_id: str) -> bool:
        return self.repo.is_committed(checkpoint_id)

    def catalog_digest(self) -> bytes:
        return self.repo.catalog_digest()

    def is_empty(self) -> bool:
        return not self.repo.list_checkpoints()
