"""Moving a guest and its vTPM to another host: `migrate` here, `migrate-receive` there.

A cold move in two journals, one per host (docs/migration.md):

* source: suspend the guest into a spool (`xl save -p`: it stays suspended and paused here), wrap
  the vTPM's secret for the destination (the manager parks its entry: no vTPM can run on from it),
  send everything sealed to the destination's TPM, then act on the destination's signed outcome:
  "committed" deletes this host's copy, "aborted" un-parks it and resumes the guest.  Without an
  outcome it does neither: the guest stays paused and the vTPM parked until `recover` learns one.
* destination: nothing is touched until the whole transfer has arrived and authenticated; then
  store the vTPM as this host's own (provisionally), start it and prove it loaded its state,
  restore the guest paused, and commit: the journaled "commit" step is the move's one decision.
  Before it, recover undoes everything here; from it on, recover finishes.

So the guest and its vTPM exist on one host, or on two with one of them frozen (paused guest,
parked vTPM) and already decided to go; never running twice, never lost.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Callable, Iterator
from typing import Any

from xen_vtpm.errors import (
    MigrationError,
    MoveInDoubt,
    PreconditionFailed,
    TransferError,
    XenVtpmError,
)
from xen_vtpm.model import Checkpoint, VtpmCapture, VtpmExport, VtpmRef

from . import steps as S
from .base import Sequences
from .interfaces import Draft, IncomingMove, OutgoingMove, Ports, Spooled
from .journal import Operation, OpParams

COMMITTED = "committed"
ABORTED = "aborted"

# Record kinds of the transfer, in the order they travel.
META, VTPM_STATE, MEMORY = "meta", "vtpm", "memory"
CKPT, CKPT_IMAGE, CKPT_MEMORY = "checkpoint", "checkpoint-image", "checkpoint-memory"


class _Records:
    """The destination's view of the transfer: records in order, one of lookahead."""

    def __init__(self, records: Iterator[tuple[str, bytes]]) -> None:
        self._it = records
        self._next: tuple[str, bytes] | None = None

    def peek(self) -> str | None:
        if self._next is None:
            self._next = next(self._it, None)
        return None if self._next is None else self._next[0]

    def take(self, kind: str) -> bytes:
        if self.peek() != kind:
            raise TransferError(f"the transfer holds {self.peek()!r} where {kind!r} belongs (altered, or another "
                                "version of xen-vtpm)")
        assert self._next is not None
        payload, self._next = self._next[1], None
        return payload

    def json(self, kind: str) -> dict[str, Any]:
        try:
            obj = json.loads(self.take(kind).decode())
            if not isinstance(obj, dict):
                raise ValueError
        except (UnicodeDecodeError, ValueError):
            raise TransferError(f"the transfer's {kind} record is not readable") from None
        return obj

    def blocks(self, kind: str) -> Iterator[bytes]:
        while self.peek() == kind:
            yield self.take(kind)

    def end(self) -> None:
        if self.peek() is not None:
            raise TransferError(f"the transfer holds an unexpected {self.peek()!r} record at its end")


@dataclasses.dataclass
class _Incoming:
    """A moved checkpoint while the transfer arrives: its description, its draft, its capture as sent."""
    head: dict[str, Any]
    draft: Draft
    capture: VtpmCapture

    def envelope(self) -> bytes:
        try:
            return bytes.fromhex(str(self.head["envelope"]))
        except (KeyError, ValueError):
            raise TransferError(f"checkpoint {self.head.get('id')}: its envelope is malformed (altered)") from None


class Migration(Sequences):
    def __init__(self, ports: Ports, recover: Callable[[], Any]) -> None:
        super().__init__(ports)
        self._recover_all = recover

    # --- source ---------------------------------------------------------------------------
    def migrate(self, domain: str, host: str, ssh: str, *, with_checkpoints: bool, auth_secret: bytes | None,
                paused: bool = False) -> dict[str, Any]:
        guest = self.p.guests.find(domain)
        with self.p.lock(guest.uuid, guest.name):
            self._check_fresh(S.MIGRATE, guest.name)
            vt = guest.vtpm
            self.p.vtpm.check_can_move(vt)
            self._check_can_suspend(guest)
            self.p.vtpm.check_single_consumer(vt)
            self.p.store.check_writable()
            # The state leaves this host: the same TPM-checked secret as a rollback, when one is set.
            self.p.host.authorize_rollback(auth_secret)
            owned = self.p.store.entries(guest.uuid)
            moving: list[Checkpoint] = []
            if with_checkpoints:
                for entry in owned:
                    self._verify_logged(entry, S.MIGRATE)
                    moving.append(self.p.store.get(entry.id))
            link = self.p.peers.connect(host, ssh)
            try:
                recipient = link.recipient(vt.backend_kind)
                op = self.p.journal.begin(S.MIGRATE, guest.uuid, OpParams(
                    guest=guest.name, vtpm=vt.backend, vtpm_kind=vt.backend_kind, vtpm_uuid=vt.uuid, host=host, ssh=ssh,
                    transfer=link.transfer, peer=link.peer_key, checkpoints=tuple(c.id for c in moving),
                    paused=paused))
                outcome = self._send(op, link, recipient, guest.name, guest.uuid, guest.mem_mib << 20, vt, moving)
            finally:
                link.close()
            result = {"domain": guest.name, "host": host, "peer": link.peer_name, "transfer": link.transfer,
                      "checkpoints_moved": len(moving), "checkpoints_kept": len(owned) - len(moving)}
            self._settle_source(op, outcome, link.peer_name)
            return result

    def _send(self, op: Operation, link: OutgoingMove, recipient: bytes, name: str, vm_uuid: str, mem_bytes: int,
              vt: VtpmRef, moving: list[Checkpoint]) -> str | None:
        """Everything up to the destination's outcome; None when it gave none: once the stream may
        have gone, only the destination decides, so nothing here is undone on a failure."""
        try:
            self.p.journal.step(op, S.GUEST_SAVE)
            spool = self.p.streams.spool_save(name, mem_bytes)
            try:
                self.p.journal.step(op, S.EXPORT_VTPM)
                export = self.p.vtpm.export_for(vt, link.transfer, recipient)
                self.p.journal.step(op, S.EXPORT_CHECKPOINTS)
                envelopes = {c.id: self.p.vtpm.export_checkpoint(vt, c.manager_checkpoint or "", link.transfer,
                                                                 recipient) for c in moving}
            except BaseException:
                spool.close()
                raise
        except BaseException:
            self._undo_source(op, "failed before anything was sent")
            raise
        self.p.journal.step(op, S.SEND)
        try:
            link.send_json(META, {"guest": name, "vm_uuid": vm_uuid, "memory_bytes": spool.size,
                                  "vtpm": export.meta(), "checkpoints": [c.id for c in moving],
                                  "paused": op.params.paused})
            link.send_bytes(VTPM_STATE, [export.state])
            link.send_bytes(MEMORY, spool.blocks())
            for ckpt in moving:
                self._send_checkpoint(link, ckpt, envelopes[ckpt.id])
            return link.finish()
        except XenVtpmError:
            return None
        finally:
            spool.close()

    def _send_checkpoint(self, link: OutgoingMove, ckpt: Checkpoint, envelope: bytes) -> None:
        capture = self.p.store.vtpm_capture(ckpt)
        meta = ckpt.meta
        link.send_json(CKPT, {"id": ckpt.id, "name": ckpt.name, "vm_uuid": ckpt.vm_uuid, "vm_name": ckpt.vm_name,
                              "kind": meta.kind, "vtpm_uuid": meta.vtpm_uuid, "vtpm_backend": meta.vtpm_backend,
                              "manager_checkpoint": meta.manager_checkpoint, "manager_hash": meta.manager_hash,
                              "slot_hashes": list(capture.slot_hashes), "envelope": envelope.hex(),
                              "details": {"save_file": meta.save_file, "save_file_digest": meta.save_file_digest,
                                          "pause_window_s": meta.pause_window_s, "save_info": meta.save_info}})
        link.send_bytes(CKPT_IMAGE, [capture.image])
        link.send_bytes(CKPT_MEMORY, self.p.store.memory_blocks(ckpt.id))

    def _settle_source(self, op: Operation, outcome: str | None, peer: str) -> None:
        """Act on the destination's outcome; with none, ask it once more, else leave the move parked."""
        host, ssh = op.params.host or "", op.params.ssh or ""
        if outcome is None:
            try:
                outcome = self.p.peers.outcome(host, ssh, op.params.transfer or "", op.params.peer or "")
            except MigrationError as exc:          # no signed answer, or the host unreachable
                raise MoveInDoubt(f"{op.params.guest}: the move to {host} is in doubt ({exc}); the guest stays "
                                  f"suspended and its vTPM parked here; run `xen-vtpm recover` once {host} "
                                  "answers") from None
        if outcome == COMMITTED:
            self._finish_source(op, peer)
        else:
            self._undo_source(op, outcome)
            raise MigrationError(f"{host} refused the move ({outcome}); {op.params.guest} runs on here")

    def _finish_source(self, op: Operation, peer: str) -> None:
        """The destination committed: delete this host's copy (every action idempotent, for recover)."""
        params, ref = op.params, self._vtpm_of(op)
        if not op.reached(S.FINISH_SOURCE):
            self.p.journal.step(op, S.FINISH_SOURCE)
        self._destroy_if_present(params.guest)
        # Checkpoint entries first: the vTPM's own entry keeps their manager group from going empty.
        for ckpt_id in params.checkpoints:
            if self.p.store.is_committed(ckpt_id):
                manager_checkpoint = self.p.store.get(ckpt_id).manager_checkpoint
                if manager_checkpoint:
                    self.p.vtpm.discard(ref, manager_checkpoint)
                self._delete_and_bind(op, (ckpt_id,))
        self.p.vtpm.remove(ref)
        if not op.reached(S.ADVANCE_HEAD):
            self.p.audit.append(action=S.MIGRATE, vm=params.guest, checkpoint=None,
                                result=f"moved to {peer} ({params.host})",
                                detail=f"transfer {params.transfer}; {len(params.checkpoints)} checkpoints moved")
        self._finish(op, action=S.MIGRATE, vm=params.guest, checkpoint=None)

    def _undo_source(self, op: Operation, why: str) -> bool:
        """Un-park the vTPM and resume the guest; on a failure the op stays for the next recover."""
        params = op.params

        def undo() -> None:
            if op.reached(S.EXPORT_VTPM):
                self.p.vtpm.unexport(self._vtpm_of(op))
            if self.p.guests.exists(params.guest) and self.p.guests.is_paused(params.guest):
                self.p.xl.unpause(params.guest)
        return self._undo(op, undo, why, f"undone: {why}")

    def _undo(self, op: Operation, undo: Callable[[], None], why: str, outcome: str) -> bool:
        """Run ``undo``, then end the op with ``outcome``; on a failure (a component down) leave it
        open for the next recover, and say so in the audit log."""
        try:
            undo()
        except XenVtpmError as exc:
            with contextlib.suppress(XenVtpmError):
                self.p.audit.append(action=op.kind, vm=op.params.guest, checkpoint=None,
                                    result=f"failed; undo incomplete: {exc}"[:500])
            return False
        self.p.journal.finish(op, outcome[:500])
        with contextlib.suppress(XenVtpmError):
            self.p.audit.append(action=op.kind, vm=op.params.guest, checkpoint=None,
                                result=f"failed; undone ({why})"[:500], detail=f"op {op.op_id}")
        return True

    def recover_source(self, op: Operation, ask_peer: bool) -> str:
        if op.reached(S.FINISH_SOURCE):
            self._finish_source(op, op.params.host or "")
            return "finished"
        if not op.reached(S.SEND):
            return "undone" if self._undo_source(op, "interrupted before sending") else "undo incomplete"
        params = op.params
        if not ask_peer:
            return f"in doubt: `xen-vtpm recover` asks {params.host} what it decided"
        try:
            outcome = self.p.peers.outcome(params.host or "", params.ssh or "", params.transfer or "",
                                           params.peer or "")
        except MigrationError as exc:
            return f"in doubt, retried by the next recover ({exc})"[:300]
        if outcome == COMMITTED:
            self._finish_source(op, params.host or "")
            return "finished (the destination committed)"
        return "undone" if self._undo_source(op, outcome) else "undo incomplete"

    # --- destination ------------------------------------------------------------------------
    def receive(self, link: IncomingMove) -> dict[str, Any]:
        """Take a move in; the signed outcome goes back to the source whatever happens."""
        try:
            result = self._receive(link)
        except XenVtpmError as exc:
            found = self.p.journal.find_transfer(S.MIGRATE_IN, link.transfer)
            if found is None:
                link.answer(f"{ABORTED}: {exc}"[:500])    # refused before anything was touched here
            elif found[1] is not None:
                link.answer(found[1])
            else:
                link.refuse(exc)       # undo incomplete: no decision yet, the source must ask again
            raise
        link.answer(COMMITTED)
        return result

    def _receive(self, link: IncomingMove) -> dict[str, Any]:
        self._check_fresh(S.MIGRATE_IN, None)
        records = _Records(link.records())
        meta = records.json(META)
        try:
            name, vm_uuid, mem_bytes = str(meta["guest"]), str(meta["vm_uuid"]), int(meta["memory_bytes"])
            export_meta, ckpt_ids = meta["vtpm"], [str(c) for c in meta["checkpoints"]]
            paused = meta["paused"] is True
        except (KeyError, TypeError, ValueError):
            raise TransferError("the transfer's description is malformed (another version of xen-vtpm?)") from None
        with self.p.lock(vm_uuid, name):
            if self.p.guests.exists(name):
                raise PreconditionFailed(f"{name}: a domain of that name runs on this host; nothing was changed")
            self.p.store.check_writable()
            for ckpt_id in ckpt_ids:
                if self.p.store.is_committed(ckpt_id):
                    raise PreconditionFailed(f"checkpoint {ckpt_id}: already in this host's store; delete it here "
                                             "or move without --with-checkpoints")
            export = VtpmExport.from_meta(export_meta, b"".join(records.blocks(VTPM_STATE)))
            if export.ref.backend_kind != export.kind or export.ref.guest != name:
                raise TransferError(f"{export.ref.backend}: the moving vTPM's description contradicts itself (altered)")
            self.p.vtpm.check_importable(export)
            spool = self.p.streams.spool(records.blocks(MEMORY), mem_bytes)
            drafts: list[_Incoming] = []
            try:
                while records.peek() == CKPT:
                    drafts.append(self._receive_checkpoint(records, export.ref))
                records.end()
                if spool.size != mem_bytes or [d.head["id"] for d in drafts] != ckpt_ids:
                    raise TransferError("the transfer's contents differ from its description (altered)")
                op = self.p.journal.begin(S.MIGRATE_IN, vm_uuid, OpParams(
                    guest=name, vtpm=export.ref.backend, vtpm_kind=export.kind, vtpm_uuid=export.ref.uuid,
                    host=link.peer_name, transfer=link.transfer, peer=link.peer_key, checkpoints=tuple(ckpt_ids),
                    manager_checkpoints=tuple(str(d.head["manager_checkpoint"]) for d in drafts), paused=paused))
                self._take_in(op, export, spool, drafts)
            except BaseException:
                for d in drafts:
                    with contextlib.suppress(XenVtpmError):
                        d.draft.abort()
                raise
            finally:
                spool.close()
            return {"domain": name, "from": link.peer_name, "transfer": link.transfer,
                    "checkpoints_moved": len(drafts)}

    def _receive_checkpoint(self, records: _Records, ref: VtpmRef) -> _Incoming:
        head = records.json(CKPT)
        try:
            self.p.store.check_name_free(str(head["vm_uuid"]), str(head["name"]))
            draft = self.p.store.begin(str(head["id"]), name=str(head["name"]), vm_uuid=str(head["vm_uuid"]),
                                       vm_name=str(head["vm_name"]), vtpm_uuid=str(head["vtpm_uuid"]),
                                       vtpm_backend=str(head["vtpm_backend"]), kind=str(head["kind"]))
        except (KeyError, TypeError) as exc:
            raise TransferError(f"a moved checkpoint's description is malformed ({exc})") from None
        try:
            image = b"".join(records.blocks(CKPT_IMAGE))
            draft.add_stream("memory", self.p.vtpm.incoming_stream(ref, records.blocks(CKPT_MEMORY)))
            slots = tuple(head["slot_hashes"])
            capture = VtpmCapture(image=image, manager_checkpoint=head["manager_checkpoint"],
                                  manager_hash=head["manager_hash"], slot_hashes=(slots[0], slots[1]),
                                  backend_kind=ref.backend_kind)
        except (KeyError, TypeError, IndexError) as exc:
            draft.abort()
            raise TransferError(f"a moved checkpoint's description is malformed ({exc})") from None
        except BaseException:
            draft.abort()
            raise
        return _Incoming(head, draft, capture)

    def _take_in(self, op: Operation, export: VtpmExport, spool: Spooled, drafts: list[_Incoming]) -> None:
        ref = export.ref
        try:
            self._step_once(op, S.IMPORT_VTPM, lambda: self.p.vtpm.import_from(export, op.params.transfer or ""))

            def import_checkpoints() -> None:
                for d in drafts:
                    d.draft.set_vtpm(self.p.vtpm.import_checkpoint(ref, d.capture, op.params.transfer or "",
                                                                   d.envelope()))
                with self.p.host.exclusive():
                    for d in drafts:
                        d.draft.commit(**d.head["details"])
                    self.p.host.advance(changing=op.params.checkpoints)
            self._step_once(op, S.IMPORT_CHECKPOINTS, import_checkpoints)
            self._step_once(op, S.START_VTPM, lambda: self.p.vtpm.start_verified(ref))
            self._step_once(op, S.RESTORE_GUEST, lambda: self.p.streams.restore_from(
                ref.guest, self.p.vtpm.incoming_stream(ref, spool.blocks()), spool.size, paused=True))
        except BaseException as exc:
            self._undo_destination(op, f"{exc}" if isinstance(exc, XenVtpmError) else exc.__class__.__name__)
            raise
        self._commit_destination(op)

    def _commit_destination(self, op: Operation) -> None:
        """The move's decision: from this journaled step on, the guest lives here."""
        params = op.params
        if not op.reached(S.COMMIT):
            self.p.journal.step(op, S.COMMIT)
        self.p.vtpm.adopt(self._vtpm_of(op))
        if not params.paused and self.p.guests.exists(params.guest) and self.p.guests.is_paused(params.guest):
            self.p.xl.unpause(params.guest)
        if not op.reached(S.ADVANCE_HEAD):
            self.p.audit.append(action=S.MIGRATE_IN, vm=params.guest, checkpoint=None,
                                result=f"moved in from {params.host}",
                                detail=f"transfer {params.transfer}; {len(params.checkpoints)} checkpoints moved")
        self._finish(op, action=S.MIGRATE_IN, vm=params.guest, checkpoint=None, outcome=COMMITTED)

    def _undo_destination(self, op: Operation, why: str) -> bool:
        """Everything this host took in goes; on a failure the op stays for the next recover."""
        params, ref = op.params, self._vtpm_of(op)

        def undo() -> None:
            self._destroy_if_present(params.guest)
            for manager_checkpoint in params.manager_checkpoints:
                self.p.vtpm.discard(ref, manager_checkpoint)
            committed = tuple(filter(self.p.store.is_committed, params.checkpoints))
            if committed:
                self._delete_and_bind(op, committed)
            self.p.vtpm.remove(ref)     # after its checkpoint entries (see _finish_source)
        return self._undo(op, undo, why, f"{ABORTED}: {why}")

    def recover_destination(self, op: Operation) -> str:
        if op.reached(S.COMMIT):
            self._commit_destination(op)
            return "finished (committed)"
        why = f"interrupted at {op.last_step or 'its start'}"
        return "undone" if self._undo_destination(op, why) else "undo incomplete"

    def outcome_of(self, transfer: str) -> str:
        """What happened to a transfer, for the source: final once returned (MoveInDoubt: not yet).

        Under the transfer's lock, so a live receive of it decides first; a transfer this host
        never journaled is recorded as aborted here, so no later session can commit it."""
        with self.p.lock(f"transfer-{transfer}", f"transfer {transfer}"):
            self._recover_all()
            found = self.p.journal.find_transfer(S.MIGRATE_IN, transfer)
            if found is None:
                op = self.p.journal.begin(S.MIGRATE_IN, "-", OpParams(guest="-", transfer=transfer))
                outcome = f"{ABORTED}: never received in full here"
                self.p.journal.finish(op, outcome)
                return outcome
            if found[1] is None:
                raise MoveInDoubt(f"transfer {transfer}: still being undone here (a component is down); "
                                  "retry once `xen-vtpm recover` succeeds on this host")
            return found[1]

