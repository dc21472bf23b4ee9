"""What every sequence shares: journaled steps, the end of an operation, freshness, logged checks.

``Coordinator`` (snapshot, rollback, save, restore, delete, prune, keep, recover) and ``Migration``
(moving a guest to another host) are both built on these.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from xen_vtpm.errors import IntegrityError, PreconditionFailed, XenVtpmError
from xen_vtpm.model import CatalogEntry, Checkpoint, Guest, VtpmRef

from . import steps as S
from .interfaces import ImageSpool, Ports
from .journal import Operation


def changed_ids(op: Operation) -> tuple[str, ...] | None:
    """The checkpoints an operation adds to or removes from the catalog: the head advance that
    binds the operation accepts exactly that difference in the id set from the catalog it bound
    before.  A keep mark changes a row but no id (the empty tuple); None accepts no change."""
    if op.kind in S.CAPTURING or op.kind == S.DELETE:
        return (op.params.checkpoint or "",)
    if op.kind == S.PRUNE:
        return op.params.removes
    if op.kind in (S.KEEP, S.UNKEEP):
        return ()
    if op.kind in S.MOVES:   # --with-checkpoints: removed from the source, added to the destination
        return op.params.checkpoints
    return None


class Sequences:
    def __init__(self, ports: Ports) -> None:
        self.p = ports

    def _step_once(self, op: Operation, name: str, action: Callable[[], Any]) -> None:
        """Journal and run a step; when recover resumes an op, skip the steps that completed.

        A step is journaled only after the previous one's action returned, so every step before
        the resume point is done; the resume point itself may not be, and is re-run (actions are
        idempotent).  Steps after it run as new."""
        if op.reached(name):
            if name != op.resume_point:
                return
        else:
            self.p.journal.step(op, name)
        action()

    @staticmethod
    def _vtpm_of(op: Operation) -> VtpmRef:
        """The vTPM an operation was journaled with, enough to route a call to its backend."""
        return VtpmRef(guest=op.params.guest, devid=0, backend=op.params.vtpm or "", uuid=op.params.vtpm_uuid or "",
                       backend_kind=op.params.vtpm_kind)

    def _destroy_if_present(self, name: str) -> None:
        if self.p.guests.exists(name):
            self.p.xl.destroy(name)

    @staticmethod
    def _check_can_suspend(guest: Guest) -> None:
        """I3 needs the guest to suspend itself; a paused guest cannot answer the request and
        `xl save` would only time out."""
        if guest.paused:
            raise PreconditionFailed(f"{guest.name}: the guest is paused and cannot suspend itself; "
                                     f"`xl unpause {guest.name}` first")

    def _commit(self, op: Operation, commit: Callable[[], dict[str, Any]], *, action: str, vm: str,
                checkpoint: str) -> dict[str, Any]:
        """Commit the checkpoint and bind it to the head in one hold of the host lock.

        A crash in between leaves a committed checkpoint that `recover` binds (roll forward);
        no freshness check ever sees the catalog without its head.  Freshness is proved again
        inside that hold: the catalog or the log may have been changed while the guest was saved."""
        with self.p.host.exclusive():
            self._check_fresh(action, vm, checkpoint)
            summary = commit()
            self._finish(op, action=action, vm=vm, checkpoint=checkpoint)
        return summary

    def _finish(self, op: Operation, *, action: str, vm: str, checkpoint: str | None,
                outcome: str = "done") -> None:
        """Log, then move the counter-bound head: the increment anchors the audit record too."""
        if not op.reached(S.ADVANCE_HEAD):
            self.p.journal.step(op, S.ADVANCE_HEAD)
        # "op N" marks the operation ended in the anchored log: recover never runs it again.
        self.p.audit.append(action=action, vm=vm, checkpoint=checkpoint, result="ok", detail=f"op {op.op_id}")
        self.p.journal.passed(op, S.ADVANCE_HEAD, S.AUDITED)
        self.p.host.advance(changed_ids(op))
        self.p.journal.passed(op, S.ADVANCE_HEAD, S.ADVANCED)
        self.p.journal.finish(op, outcome)

    def _delete_and_bind(self, op: Operation, checkpoint_ids: tuple[str, ...]) -> int:
        """Delete from the store and bind the smaller catalog to the head at once, so a manager
        that is down for the discard that follows leaves nothing that reads as tampering."""
        with self.p.host.exclusive():
            freed = sum(self.p.store.delete(checkpoint_id, missing_ok=True) for checkpoint_id in checkpoint_ids)
            if S.DELETE_STORE in S.SEQUENCES[op.kind]:   # a move deletes inside its own steps
                self.p.journal.passed(op, S.DELETE_STORE, S.DELETED)
            self.p.host.advance(changing=checkpoint_ids)
        return freed

    def _check_fresh(self, action: str, vm: str | None, checkpoint: str | None = None) -> None:
        """Freshness against the TPM counter and the bound catalog; damage found here is a
        security event like a failed verify, so it is logged (best effort, as there)."""
        try:
            self.p.host.check_fresh()
        except IntegrityError as exc:
            with contextlib.suppress(XenVtpmError):
                self.p.audit.append(action=action, vm=vm, checkpoint=checkpoint, result=f"refused: {exc}"[:500])
            raise

    def _verify_logged(self, ckpt: CatalogEntry | Checkpoint, action: str,
                       memory_into: ImageSpool | None = None) -> dict[str, Any]:
        """Verify a checkpoint (its guest memory into ``memory_into``, if given); a failed integrity
        check is a security event, so it is logged (best effort: the audit table may be what was
        tampered with)."""
        try:
            return self.p.store.verify(ckpt.id, memory_into)
        except IntegrityError as exc:
            with contextlib.suppress(XenVtpmError):
                self.p.audit.append(action=action, vm=ckpt.vm_name, checkpoint=ckpt.id, result=f"refused: {exc}"[:500])
            raise
