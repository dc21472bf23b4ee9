"""The synchronized sequences: snapshot, rollback, save, restore, delete, recover.

This module decides *what* happens and in which order; it never talks to a socket, a process
or a file itself.  Everything with I/O is a port (``interfaces``), built by ``wiring``, so the
sequences read as the design says and run against the simulated host or a real dom0 alike.

Rules that shape every sequence (docs/xen-internals.md §16):
- I1  never start a vTPM on an inconsistent pair; never let a guest attach to a vTPM that came
      up fresh (the backend's ``start_verified`` destroys it first);
- I2  one consumer per vTPM (``check_single_consumer``, wait for release);
- I3  quiesce before capture: the guest is suspended by `xl save -p` before the vTPM's state
      is copied;
- every step is journaled before its side effect (``steps``), and ``recover`` finishes or
  undoes what a crash interrupted.
"""
from __future__ import annotations

import contextlib
import time
import uuid as uuidlib
from collections.abc import Callable
from typing import Any

from xen_vtpm.errors import (
    CheckpointNotFound,
    FreshnessError,
    IntegrityError,
    Locked,
    NoCheckpointFeature,
    PreconditionFailed,
    UsageError,
    XenVtpmError,
)
from xen_vtpm.model import (
    CatalogEntry,
    Checkpoint,
    Guest,
    PruneResult,
    RetentionPolicy,
    VtpmCapture,
    VtpmRef,
)

from . import retention
from . import steps as S
from .base import Sequences, changed_ids
from .interfaces import Draft, ImageSpool, IncomingMove, Ports
from .journal import Operation, OpParams
from .migration import COMMITTED, Migration


def _default_name(kind: str, ckpt_id: str) -> str:
    # The id suffix keeps two checkpoints taken within one second apart.
    return f"{kind}-{time.strftime('%Y%m%d-%H%M%S')}-{ckpt_id[:6]}"


class Coordinator(Sequences):
    def __init__(self, ports: Ports) -> None:
        super().__init__(ports)
        self.moves = Migration(ports, self.recover)

    # --- snapshot ----------------------------------------------------------------
    def snapshot(self, domain: str, name: str | None = None) -> dict[str, Any]:
        self.recover()
        guest = self.p.guests.find(domain)
        with self.p.lock(guest.uuid, guest.name):
            self._check_fresh("snapshot", guest.name)
            return self._snapshot_locked(guest, name, kind=S.SNAPSHOT)

    def _snapshot_locked(self, guest: Guest, name: str | None, kind: str) -> dict[str, Any]:
        vt = guest.vtpm
        if not self.p.vtpm.supports_checkpoints(vt):
            raise NoCheckpointFeature(
                f"{vt.backend}: the vTPM manager has no checkpoint support (stock vtpmmgr), so a per-VM "
                "snapshot cannot be rolled back; use `xen-vtpm save` (guarded), or see docs/protocol.md")
        self.p.vtpm.check_can_capture(vt)
        self._check_can_suspend(guest)
        self.p.vtpm.check_single_consumer(vt)
        self.p.store.check_writable()
        ckpt_id = str(uuidlib.uuid4())
        name = name or _default_name(kind, ckpt_id)
        self.p.store.check_name_free(guest.uuid, name)
        op = self.p.journal.begin(kind, guest.uuid, OpParams(guest=guest.name, checkpoint=ckpt_id, name=name,
                                                             vtpm=vt.backend, vtpm_kind=vt.backend_kind,
                                                             guest_was_paused=guest.paused))
        draft = self.p.store.begin(ckpt_id, name=name, vm_uuid=guest.uuid, vm_name=guest.name,
                                   vtpm_uuid=vt.uuid, vtpm_backend=vt.backend, kind=kind)
        t0 = time.monotonic()
        try:
            self.p.journal.step(op, S.GUEST_SAVE)
            # Returns once `xl save` has finished; the store keeps ingesting from the spool.
            ingest = self.p.streams.start_save(guest.name, draft, leave_paused=True,
                                               expected_bytes=guest.mem_mib << 20)
            try:
                capture = self._capture_vtpm(op, vt, ckpt_id)
                self.p.xl.unpause(guest.name)
                pause_window = time.monotonic() - t0
                save_info = ingest.wait()   # the guest runs; every byte must be in the draft before commit
            except BaseException:
                ingest.cancel()             # stops ingestion and frees the spool before the draft is aborted
                raise
        except BaseException:
            self._undo_snapshot(op, draft)
            raise
        self.p.journal.step(op, S.COMMIT)
        draft.set_vtpm(capture)
        summary = self._commit(op, lambda: draft.commit(save_info=save_info, pause_window_s=pause_window),
                               action=kind, vm=guest.name, checkpoint=ckpt_id)
        return {"id": ckpt_id, "name": name, "domain": guest.name, "vm_uuid": guest.uuid,
                "vtpm_uuid": vt.uuid, "pause_window_s": round(pause_window, 4), **summary}

    def _capture_vtpm(self, op: Operation, vt: VtpmRef, ckpt_id: str) -> VtpmCapture:
        """I3: capture the vTPM while its guest is suspended.

        The stub domain is not paused as well: its only consumer (checked before the save) is the
        suspended guest, so nothing can move the pair; ``capture`` still checks that the manager's
        copy names a slot of the image it read.  Pausing it would cost two `xl` calls inside the
        guest's pause window."""
        self.p.journal.step(op, S.MANAGER_CHECKPOINT, manager_checkpoint=ckpt_id)
        return (self.p.vtpm.capture(vt, ckpt_id) if self.p.vtpm.supports_checkpoints(vt)
                else self.p.vtpm.capture_fingerprint(vt))  # stock manager: forward-only fingerprint

    def _undo_snapshot(self, op: Operation, draft: Draft | None) -> bool:
        """Every action idempotent: used right after a failure and by recover.  If any action
        fails (a component is down), the op stays unfinished, so recover — which every later
        command runs first — retries it once the component is back; False then."""
        params = op.params
        ckpt_id = params.checkpoint or ""

        def unpause_guest() -> None:
            if (not params.guest_was_paused and self.p.guests.exists(params.guest)
                    and self.p.guests.is_paused(params.guest)):
                self.p.xl.unpause(params.guest)

        def discard_manager_copy() -> None:
            if op.reached(S.MANAGER_CHECKPOINT):
                self.p.vtpm.discard(self._vtpm_of(op), ckpt_id)

        def abort_draft() -> None:
            # Without a live draft the store's own recover() already removed the partial write.
            if draft is not None:
                draft.abort()

        # Journaled like a step so that a crash in the middle of an undo is recovered (and tested) as one.
        # Best effort: on a full disk this write fails until abort_draft frees the partial pack, and
        # that must neither keep the guest paused nor leave the undo unfinished.
        if not op.reached(S.UNDO):
            with contextlib.suppress(XenVtpmError):
                self.p.journal.step(op, S.UNDO)

        errors: list[XenVtpmError] = []
        for action, point in ((unpause_guest, S.UNPAUSED),
                              (discard_manager_copy, S.DISCARDED), (abort_draft, None)):
            try:
                action()
            except XenVtpmError as exc:  # keep undoing the rest; report the first problem
                errors.append(exc)
            if point:
                self.p.journal.passed(op, S.UNDO, point)
        if not errors:
            self.p.journal.finish(op, "undone")
        result = "failed; undone" if not errors else f"failed; undo incomplete: {errors[0]}"[:500]
        with contextlib.suppress(XenVtpmError):  # the failure being undone is what the caller must see
            self.p.audit.append(action=op.kind, vm=params.guest, checkpoint=ckpt_id, result=result,
                                detail=f"op {op.op_id}" if not errors else "")
        return not errors

    # --- rollback ----------------------------------------------------------------
    def rollback(self, domain: str, checkpoint: str, *, auth_secret: bytes | None,
                 safety_checkpoint: bool = True, paused: bool = False) -> dict[str, Any]:
        self.recover()
        guest = self.p.guests.find(domain)
        with self.p.lock(guest.uuid, guest.name):
            self._check_fresh("rollback", guest.name, checkpoint)
            # Everything is verified before anything running is touched.  The catalog's vm_uuid
            # column is not authenticated, so an id that does not resolve for this VM is still
            # verified; the verified manifest then says whose it is.
            try:
                entry = self.p.store.entry(checkpoint, vm_uuid=guest.uuid)
            except CheckpointNotFound:
                entry = self.p.store.entry(checkpoint)
            # The check writes the guest memory it checked into a spool, and the restore reads that
            # copy: the checkpoint is read once, and only bytes checked before the first step are restored.
            with self.p.streams.image_spool(entry.size) as image:
                self._verify_logged(entry, "rollback", image)
                ckpt = self.p.store.get(entry.id)
                if ckpt.vm_uuid != guest.uuid:
                    raise PreconditionFailed(f"checkpoint {ckpt.name}: belongs to VM {ckpt.vm_name} ({ckpt.vm_uuid}), "
                                             f"not to {guest.name}; name a checkpoint of {guest.name}")
                if ckpt.meta.vtpm_uuid != guest.vtpm.uuid:
                    raise IntegrityError(f"checkpoint {ckpt.name}: belongs to vTPM {ckpt.meta.vtpm_uuid}, "
                                         f"but {guest.name} now uses {guest.vtpm.uuid}; refusing to mix them")
                if not self.p.vtpm.supports_checkpoints(guest.vtpm):
                    raise NoCheckpointFeature(
                        f"{guest.vtpm.backend}: the vTPM manager has no checkpoint support (stock vtpmmgr), "
                        "so the vTPM cannot be rolled back with the guest; see docs/protocol.md")
                self.p.vtpm.check_can_restart(guest.vtpm)
                self.p.host.authorize_rollback(auth_secret)
                safety = (self._snapshot_locked(guest, None, kind=S.PRE_ROLLBACK)["id"]
                          if safety_checkpoint else None)
                op = self.p.journal.begin(S.ROLLBACK, guest.uuid, OpParams(guest=guest.name, checkpoint=ckpt.id,
                                                                          vtpm=guest.vtpm.backend,
                                                                          vtpm_kind=guest.vtpm.backend_kind,
                                                                          safety=safety, paused=paused))
                downtime = self._rollback_forward(op, ckpt, image)
            return {"domain": guest.name, "rolled_back_to": ckpt.id, "name": ckpt.name, "safety_checkpoint": safety,
                    "downtime_s": round(downtime, 4)}

    def _rollback_forward(self, op: Operation, ckpt: Checkpoint, image: ImageSpool) -> float:
        """Run (or, from recover, resume) a rollback past its point of no return; returns the seconds
        from the guest's destruction to the new guest running (its downtime).

        Once the guest is destroyed the only way is forward: the checkpoint was verified, into
        ``image``, before the first step, and the safety checkpoint holds the state we left.  Each
        step is idempotent, so recover re-runs from the last journaled one."""
        guest = op.params.guest
        t0 = time.monotonic()
        vt = ckpt.vtpm_ref()
        capture = self.p.store.vtpm_capture(ckpt)
        self._step_once(op, S.DESTROY_GUEST, lambda: self._destroy_if_present(guest))
        self._step_once(op, S.STOP_VTPM, lambda: self.p.vtpm.stop(vt))
        self._step_once(op, S.PUT_BACK_VTPM, lambda: self.p.vtpm.put_back(vt, capture))
        self._step_once(op, S.START_VTPM, lambda: self.p.vtpm.start_verified(vt))

        def restore_guest() -> None:
            self._destroy_if_present(guest)  # a restore a crash cut short: start it over
            self.p.vtpm.start_verified(vt)  # its backend must be up (it may have died since start-vtpm)
            self.p.streams.restore_image(guest, image, paused=True)

        self._step_once(op, S.RESTORE_GUEST, restore_guest)
        if not op.params.paused:
            self._step_once(op, S.UNPAUSE_GUEST, lambda: self.p.xl.unpause(guest))
        downtime = time.monotonic() - t0
        self._finish(op, action=S.ROLLBACK, vm=guest, checkpoint=ckpt.id)
        return downtime

    # --- save / restore ----------------------------------------------------------
    def save(self, domain: str, path: str) -> dict[str, Any]:
        """`xl save` semantics (the domain is gone afterwards, FILE is a plain xl save image)
        plus a vTPM checkpoint bound to FILE's digest."""
        self.recover()
        guest = self.p.guests.find(domain)
        with self.p.lock(guest.uuid, guest.name):
            self._check_fresh("save", guest.name)
            vt = guest.vtpm
            self._check_can_suspend(guest)
            self.p.vtpm.check_single_consumer(vt)
            self.p.store.check_writable()
            ckpt_id = str(uuidlib.uuid4())
            name = _default_name(S.SAVE, ckpt_id)
            op = self.p.journal.begin(S.SAVE, guest.uuid, OpParams(guest=guest.name, checkpoint=ckpt_id, name=name,
                                                                  vtpm=vt.backend, vtpm_kind=vt.backend_kind, path=path,
                                                                  guest_was_paused=guest.paused))
            draft = self.p.store.begin(ckpt_id, name=name, vm_uuid=guest.uuid, vm_name=guest.name,
                                       vtpm_uuid=vt.uuid, vtpm_backend=vt.backend, kind=S.SAVE)
            try:
                self.p.journal.step(op, S.GUEST_SAVE)
                digest = self.p.streams.save_to_file(guest.name, path)
                capture = self._capture_vtpm(op, vt, ckpt_id)
                self.p.journal.step(op, S.COMMIT)
                draft.set_vtpm(capture)
            except BaseException:
                self._undo_snapshot(op, draft)
                raise
            # Once committed, the save image and the vTPM capture are a pair: end the guest as xl save does.
            with self.p.host.exclusive():
                self._check_fresh("save", guest.name, ckpt_id)  # again, in the hold that binds the commit
                summary = draft.commit(save_file=path, save_file_digest=digest)
                self._finish_save(op)
            return {"id": ckpt_id, "name": name, "domain": guest.name, "file": path, **summary}

    def _finish_save(self, op: Operation) -> None:
        guest = op.params.guest
        if not op.reached(S.DESTROY_GUEST):
            self.p.journal.step(op, S.DESTROY_GUEST)
        self._destroy_if_present(guest)
        self._finish(op, action=S.SAVE, vm=guest, checkpoint=op.params.checkpoint)

    def restore(self, path: str, *, paused: bool = False) -> dict[str, Any]:
        self.recover()
        self._check_fresh("restore", None, path)  # before the binding lookup: a hidden binding is tampering
        header = self.p.streams.read_header(path)
        if not header.vtpms and not header.emulator_tpms:
            raise PreconditionFailed(f"{path}: the saved guest has no vTPM; use `xl restore` directly")
        digest = self.p.streams.digest(path)
        found = self.p.store.find_by_save_digest(digest)
        if found is None:
            c_info = header.config.get("c_info") or {}
            if self.p.store.has_save_bindings(c_info.get("uuid"), c_info.get("name")):
                raise IntegrityError(f"{path}: differs from every file `xen-vtpm save` wrote for this VM (truncated "
                                     "or modified since); restore an intact copy of the save file")
            raise CheckpointNotFound(
                f"{path}: no xen-vtpm save binding for this file (digest {digest[:16]}…); it was not saved "
                "by `xen-vtpm save` or was modified; `xl restore` it directly if you accept the vTPM's current state")
        ckpt = found
        with self.p.lock(ckpt.vm_uuid, ckpt.vm_name):
            self._check_fresh("restore", ckpt.vm_name, ckpt.id)
            self._verify_logged(ckpt, "restore")
            if self.p.guests.exists(ckpt.vm_name):
                raise PreconditionFailed(f"{ckpt.vm_name}: a domain with this name is running; "
                                         "destroy or rename it before restoring its save file")
            vt = ckpt.vtpm_ref()
            current = self.p.vtpm.fingerprint(vt)
            # Every vTPM write replaces one slot, so any change of either slot means it moved on
            # (the captured H may survive in the other slot for one more write).
            moved = tuple(current) != tuple(ckpt.meta.slot_hashes)
            if moved and ckpt.manager_checkpoint is None:
                raise PreconditionFailed(
                    f"{vt.backend}: the vTPM advanced since {path} was saved and the stock manager cannot "
                    "roll it back; restoring would give the guest a vTPM that does not match its memory")
            if moved or not self.p.vtpm.is_running(vt):     # e.g. after a host reboot: it must be started
                self.p.vtpm.check_can_restart(vt)
            op = self.p.journal.begin(S.RESTORE, ckpt.vm_uuid, OpParams(guest=ckpt.vm_name, checkpoint=ckpt.id,
                                                                       vtpm=vt.backend, vtpm_kind=vt.backend_kind,
                                                                       path=path, moved=moved,
                                                                       paused=paused))
            self._restore_forward(op, ckpt)
            return {"domain": ckpt.vm_name, "checkpoint": ckpt.id, "vtpm_restored": moved, "paused": paused}

    def _restore_forward(self, op: Operation, ckpt: Checkpoint) -> None:
        """Put the vTPM pair back if it moved on, then `xl restore`; idempotent for recover."""
        guest, path, vt = op.params.guest, op.params.path or "", ckpt.vtpm_ref()
        if op.params.moved:
            capture = self.p.store.vtpm_capture(ckpt)
            self._step_once(op, S.STOP_VTPM, lambda: self.p.vtpm.stop(vt))
            self._step_once(op, S.PUT_BACK_VTPM, lambda: self.p.vtpm.put_back(vt, capture))
            self._step_once(op, S.START_VTPM, lambda: self.p.vtpm.start_verified(vt))
        elif op.reached(S.START_VTPM) or not self.p.vtpm.is_running(vt):   # not running: e.g. a host reboot
            self._step_once(op, S.START_VTPM, lambda: self.p.vtpm.start_verified(vt))

        def restore_guest() -> None:
            if not self.p.guests.exists(guest):   # a restore that completed before a crash stays
                # Its vTPM must serve before `xl restore` attaches it (an swtpm ends with its device model).
                if not self.p.vtpm.is_running(ckpt.vtpm_ref()):
                    self.p.vtpm.start_verified(ckpt.vtpm_ref())
                self.p.xl.restore(path, paused=op.params.paused)

        self._step_once(op, S.RESTORE_GUEST, restore_guest)
        self._finish(op, action=S.RESTORE, vm=guest, checkpoint=ckpt.id)

    # --- delete / verify ---------------------------------------------------------
    def delete(self, checkpoint: str) -> dict[str, Any]:
        self.recover()
        ckpt = self.p.store.get(checkpoint)
        with self.p.lock(ckpt.vm_uuid, ckpt.vm_name):
            self._check_fresh("delete", ckpt.vm_name, ckpt.id)
            if ckpt.id in self.p.store.holds():
                raise PreconditionFailed(f"checkpoint {ckpt.name}: marked with `keep`; "
                                         f"`xen-vtpm unkeep {ckpt.id}` first if it may go")
            op = self.p.journal.begin(S.DELETE, ckpt.vm_uuid, OpParams(guest=ckpt.vm_name, checkpoint=ckpt.id,
                                                                      vtpm=ckpt.meta.vtpm_backend,
                                                                      vtpm_kind=ckpt.meta.backend_kind,
                                                                      manager_checkpoint=ckpt.manager_checkpoint))
            freed = self._remove(op)
            self._finish(op, action=S.DELETE, vm=ckpt.vm_name, checkpoint=ckpt.id)
            return {"deleted": ckpt.id, "name": ckpt.name, "freed_bytes": freed}

    # --- moves to and from other hosts (core/migration.py) -------------------------------
    def migrate(self, domain: str, host: str, ssh: str, *, with_checkpoints: bool = False,
                auth_secret: bytes | None = None, paused: bool = False) -> dict[str, Any]:
        self.recover()
        return self.moves.migrate(domain, host, ssh, with_checkpoints=with_checkpoints, auth_secret=auth_secret,
                                  paused=paused)

    def receive(self, link: IncomingMove) -> dict[str, Any]:
        """The destination's side, once the handshake passed (run ``recover`` before it)."""
        return self.moves.receive(link)

    def outcome_of(self, transfer: str) -> str:
        return self.moves.outcome_of(transfer)

    def _remove(self, op: Operation) -> int:
        """The steps of delete and prune, resumable by recover: the checkpoints leave the store
        (bound to the head at once), then the manager discards their entries."""
        params = op.params
        ids = params.removes or (params.checkpoint or "",)
        managers = params.manager_checkpoints or tuple(filter(None, (params.manager_checkpoint,)))
        freed = 0

        def delete_store() -> None:
            nonlocal freed
            freed = self._delete_and_bind(op, ids)

        def discard_manager() -> None:
            for manager_checkpoint in managers:
                self.p.vtpm.discard(self._vtpm_of(op), manager_checkpoint)

        self._step_once(op, S.DELETE_STORE, delete_store)
        if managers:
            self._step_once(op, S.DISCARD_MANAGER, discard_manager)
        return freed

    # --- prune / keep ------------------------------------------------------------
    def prune(self, domain: str | None, policy_for: Callable[[str], RetentionPolicy], *,
              dry_run: bool = False) -> list[PruneResult]:
        """Apply the retention rules (``retention``; ``policy_for(vm_name)``) to one VM's checkpoints,
        or every VM's with ``domain`` None; each VM is one journaled operation, a delete of many."""
        if not dry_run:
            self.recover()
        if domain is None:
            vms = list({e.vm_uuid: e.vm_name for e in self.p.store.entries()}.items())
        elif vm_uuid := self.p.store.vm_uuid_of(domain):   # checkpoints outlive their domain
            vms = [(vm_uuid, domain)]
        else:
            guest = self.p.guests.find(domain)
            vms = [(guest.uuid, guest.name)]
        policies = {name: policy_for(name) for _, name in vms}
        for name, policy in policies.items():   # before anything changes
            if policy.empty:
                raise UsageError(f"prune {name}: no rule given, so every checkpoint would stay; pass at least one "
                                 "--keep-last/--keep-daily/... N, or set keep_* in the [retention] config section")
        return [self._prune_vm(vm_uuid, name, policies[name], dry_run) for vm_uuid, name in vms]

    def _prune_vm(self, vm_uuid: str, vm_name: str, policy: RetentionPolicy, dry_run: bool) -> PruneResult:
        with self.p.lock(vm_uuid, vm_name):
            # The rules read times, kinds and marks: only from a catalog the head vouches for.
            if dry_run:
                self._check_fresh_readonly("prune", vm_name)
            else:
                self._check_fresh("prune", vm_name)
            ckpts = []
            for entry, ckpt in self.p.store.described(vm_uuid):
                if isinstance(ckpt, IntegrityError):   # logged like a failed verify: a security event
                    with contextlib.suppress(XenVtpmError):
                        self.p.audit.append(action=S.PRUNE, vm=vm_name, checkpoint=entry.id,
                                            result=f"refused: {ckpt}"[:500])
                    raise IntegrityError(f"{ckpt}; {vm_name} was not pruned — see `xen-vtpm verify --all`, "
                                         "then delete the damaged checkpoint")
                ckpts.append(ckpt)
            entries = retention.plan(ckpts, self.p.store.holds(), policy)
            removed = {e.id for e in entries if not e.rules}
            gone = [c for c in ckpts if c.id in removed]
            freed = 0
            if gone and not dry_run:
                op = self.p.journal.begin(S.PRUNE, vm_uuid, OpParams(
                    guest=vm_name, removes=tuple(c.id for c in gone),
                    # One guest's checkpoints share its vTPM; the backend routes the discards.
                    vtpm=gone[0].meta.vtpm_backend, vtpm_kind=gone[0].meta.backend_kind,
                    manager_checkpoints=tuple(c.manager_checkpoint for c in gone if c.manager_checkpoint)))
                freed = self._remove(op)
                self._finish(op, action=S.PRUNE, vm=vm_name, checkpoint=" ".join(op.params.removes))
            return PruneResult(domain=vm_name, vm_uuid=vm_uuid, dry_run=dry_run,
                               kept=tuple(e for e in entries if e.rules),
                               removed=tuple(e for e in entries if not e.rules), freed_bytes=freed)

    def keep(self, checkpoint: str, keep: bool = True) -> dict[str, Any]:
        """Set (or clear) the mark that keeps a checkpoint from `prune` and `delete`.  The mark is a
        catalog row the head binds, so one added or removed behind the tool's back is tampering."""
        self.recover()
        ckpt = self.p.store.get(checkpoint)
        kind = S.KEEP if keep else S.UNKEEP
        with self.p.lock(ckpt.vm_uuid, ckpt.vm_name):
            self._check_fresh(kind, ckpt.vm_name, ckpt.id)
            if (ckpt.id in self.p.store.holds()) != keep:
                op = self.p.journal.begin(kind, ckpt.vm_uuid, OpParams(guest=ckpt.vm_name, checkpoint=ckpt.id))
                self._mark(op)
            return {"id": ckpt.id, "name": ckpt.name, "domain": ckpt.vm_name, "kept": keep}

    def _mark(self, op: Operation) -> None:
        """The mark and the head that binds it change in one hold of the host lock, as a commit does."""
        ckpt_id = op.params.checkpoint or ""
        first_run = not op.reached(S.MARK)
        if first_run:
            self.p.journal.step(op, S.MARK)
        with self.p.host.exclusive():
            if first_run:   # the advance below accepts any edited row, so prove none was edited before
                self.p.host.check_fresh()
            self.p.store.set_hold(ckpt_id, op.kind == S.KEEP)
            self._finish(op, action=op.kind, vm=op.params.guest, checkpoint=ckpt_id)

    def checkpoints(self, domain: str | None) -> list[tuple[CatalogEntry, Checkpoint | IntegrityError]]:
        vm_uuid = None
        if domain is not None:
            vm_uuid = self.p.store.vm_uuid_of(domain) or self.p.guests.find(domain).uuid
        return self.p.store.described(vm_uuid)

    def verify(self, checkpoint: str | None) -> list[dict[str, Any]]:
        self._check_fresh_readonly("verify", None, checkpoint)
        # Catalog entries only: opening a manifest already checks its MAC, which must be logged too.
        entries = [self.p.store.entry(checkpoint)] if checkpoint else self.p.store.entries()
        return [self._verify_logged(entry, "verify") for entry in entries]

    def _check_fresh_readonly(self, action: str, vm: str | None, checkpoint: str | None = None) -> None:
        """Freshness for a command that changes nothing and so does not recover: say so if an
        interrupted change explains a mismatch."""
        try:
            self._check_fresh(action, vm, checkpoint)
        except (IntegrityError, FreshnessError):
            pending = self.p.journal.unfinished()
            if pending:
                op = pending[0]
                raise PreconditionFailed(f"{op.params.guest}: an interrupted {op.kind} (journal operation "
                                         f"{op.op_id}, at {op.last_step}) must be finished first; "
                                         "run `xen-vtpm recover`") from None
            raise

    # --- recover -----------------------------------------------------------------
    def recover(self, ask_peers: bool = False) -> list[dict[str, Any]]:
        """Finish or undo every operation a crash interrupted (idempotent).

        ``ask_peers``: also ask the other host what it decided about a move whose stream went out
        (the `recover` command does; the recover at the start of every other command does not, so
        an unreachable host never holds up commands on other guests)."""
        report = []
        self.p.store.recover()
        self.p.streams.sweep_spools()  # a snapshot killed mid-ingest on a file system without O_TMPFILE
        unfinished = self.p.journal.unfinished()
        closed = self.p.audit.closed_ops() if unfinished else set()
        for op in unfinished:
            if op.op_id in closed:
                # Its end is in the audit log.  That is written only after the "advance-head"
                # step, so a crash can leave exactly that; anything else was re-opened by hand.
                if op.last_step != S.ADVANCE_HEAD:
                    raise IntegrityError(f"journal operation {op.op_id} ({op.kind} of {op.params.guest}): "
                                         "the audit log records its end but the journal was re-opened before "
                                         "it; recover will not run it again — inspect the catalog")
                self.p.host.advance(changed_ids(op))  # the head may still have to bind what it committed
                # A destination's end is its commit (an undone move was finished before it logged):
                # the source reads this outcome.
                self.p.journal.finish(op, COMMITTED if op.kind == S.MIGRATE_IN
                                      else "closed (the audit log records its end)")
                continue
            lock = self.p.lock(op.vm, op.params.guest)
            try:
                lock.__enter__()
            except Locked:
                continue  # its command is alive and holds the lock: not ours to touch
            try:
                if op.op_id in {o.op_id for o in self.p.journal.unfinished()}:  # it may have finished meanwhile
                    report.append(self._recover_one(op, ask_peers))
            finally:
                lock.__exit__(None, None, None)
        self.p.host.recover_head()
        return report

    def _recover_one(self, op: Operation, ask_peers: bool) -> dict[str, Any]:
        """Decide per operation kind: before its point of no return undo, after it finish."""
        last, vm, ckpt_id = op.last_step, op.params.guest, op.params.checkpoint or ""
        committed = op.kind in S.CAPTURING and self.p.store.is_committed(ckpt_id)
        if op.kind in (S.SNAPSHOT, S.PRE_ROLLBACK) or (op.kind == S.SAVE and not committed):
            if committed:
                self._finish(op, action=op.kind, vm=vm, checkpoint=ckpt_id, outcome="done (recovered)")
                outcome = "finished"
            else:
                outcome = "undone" if self._undo_snapshot(op, None) else "undo incomplete (retried by the next recover)"
        elif op.kind == S.SAVE:
            self._finish_save(op)
            outcome = "finished"
        elif op.kind == S.ROLLBACK and not op.reached(S.DESTROY_GUEST):
            # Interrupted before its point of no return: nothing running was touched yet.
            self.p.journal.finish(op, "undone (interrupted before destroy-guest)")
            outcome = "undone"
        elif op.kind == S.ROLLBACK:
            entry = self.p.store.entry(ckpt_id)
            with self.p.streams.image_spool(entry.size) as image:
                self._verify_logged(entry, "recover rollback", image)  # again: the store may have changed
                self._rollback_forward(op, self.p.store.get(ckpt_id), image)
            outcome = "finished"
        elif op.kind == S.RESTORE:
            self._restore_forward(op, self.p.store.get(ckpt_id))
            outcome = "finished"
        elif op.kind == S.MIGRATE:
            outcome = self.moves.recover_source(op, ask_peers)
        elif op.kind == S.MIGRATE_IN:
            outcome = self.moves.recover_destination(op)
        elif op.kind in (S.DELETE, S.PRUNE):
            self._remove(op)
            ckpt_id = " ".join(op.params.removes) or ckpt_id
            self._finish(op, action=op.kind, vm=vm, checkpoint=ckpt_id, outcome="done (recovered)")
            outcome = "finished"
        elif op.kind in (S.KEEP, S.UNKEEP):
            self._mark(op)
            outcome = "finished"
        else:
            self.p.journal.finish(op, f"abandoned (unknown kind {op.kind})")
            outcome = "abandoned"
        self.p.audit.append(action=f"recover {op.kind}", vm=vm, checkpoint=ckpt_id, result=f"{outcome} at {last}")
        return {"op": op.op_id, "kind": op.kind, "vm": vm, "last_step": last, "outcome": outcome}
