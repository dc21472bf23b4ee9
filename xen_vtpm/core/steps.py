"""The journaled steps of every sequence, as data.

The coordinator journals a step *before* its side effect (``Journal.step``), so after a crash
``recover`` knows the last step that may have started.  The lists below are the steps each
kind of operation journals, in order; the crash tests kill the tool at every one of them and at
every point between two writes of one step (``INNER_POINTS``).  ``UNDO`` is journaled only when an
uncommitted capture is undone, so a crash in the middle of an undo is recovered like any other.
Where a sequence skips a step (a restore whose vTPM did not move, a delete without a manager
entry), the order of the rest is still this one.  A prune journals each step once for all the
checkpoints it removes (their ids are in its parameters).
"""
from __future__ import annotations

from typing import Final

# --- step names -----------------------------------------------------------------------------
GUEST_SAVE: Final = "guest-save"                   # `xl save -p` (snapshot) or `xl save` (save) starts
MANAGER_CHECKPOINT: Final = "manager-checkpoint"   # the vTPM pair is captured (manager copy + image)
COMMIT: Final = "commit"                           # the checkpoint is committed to the store
DESTROY_GUEST: Final = "destroy-guest"             # a rollback's point of no return; a save's end
STOP_VTPM: Final = "stop-vtpm"
PUT_BACK_VTPM: Final = "put-back-vtpm"             # image, then manager entry
START_VTPM: Final = "start-vtpm"                   # created and proven to have loaded its state
RESTORE_GUEST: Final = "restore-guest"
UNPAUSE_GUEST: Final = "unpause-guest"
DELETE_STORE: Final = "delete-store"
DISCARD_MANAGER: Final = "discard-manager"
MARK: Final = "mark"                               # a `keep` mark is set or cleared
ADVANCE_HEAD: Final = "advance-head"               # audit record, counter increment, journal end
# A move (docs/migration.md): the source's steps, then the destination's.
EXPORT_VTPM: Final = "export-vtpm"                 # the secret wrapped for the destination; parked here
EXPORT_CHECKPOINTS: Final = "export-checkpoints"   # --with-checkpoints: their manager entries wrapped too
SEND: Final = "send"                               # from here only the destination decides the outcome
FINISH_SOURCE: Final = "finish-source"             # the destination committed: this host's copy goes
IMPORT_VTPM: Final = "import-vtpm"                 # state and secret stored as this host's, provisionally
IMPORT_CHECKPOINTS: Final = "import-checkpoints"   # the moved checkpoints committed to this host's store
UNDO: Final = "undo"                               # an uncommitted capture is undone (recover or a failure):
                                                   # unpause, discard the manager copy, abort the draft

# --- operation kinds and their steps ------------------------------------------------------------
SNAPSHOT: Final = "snapshot"
PRE_ROLLBACK: Final = "pre-rollback"               # the automatic safety snapshot before a rollback
ROLLBACK: Final = "rollback"
SAVE: Final = "save"
RESTORE: Final = "restore"
DELETE: Final = "delete"
MIGRATE: Final = "migrate"                         # the source of a move
MIGRATE_IN: Final = "migrate-in"                   # the destination of a move (its commit step decides)
PRUNE: Final = "prune"                             # delete's steps, for every checkpoint the rules drop
KEEP: Final = "keep"
UNKEEP: Final = "unkeep"

_CAPTURE = (GUEST_SAVE, MANAGER_CHECKPOINT, COMMIT)
_PUT_BACK = (STOP_VTPM, PUT_BACK_VTPM, START_VTPM)
_REMOVE = (DELETE_STORE, DISCARD_MANAGER)

SEQUENCES: Final[dict[str, tuple[str, ...]]] = {
    SNAPSHOT: (*_CAPTURE, ADVANCE_HEAD),
    PRE_ROLLBACK: (*_CAPTURE, ADVANCE_HEAD),
    ROLLBACK: (DESTROY_GUEST, *_PUT_BACK, RESTORE_GUEST, UNPAUSE_GUEST, ADVANCE_HEAD),
    SAVE: (*_CAPTURE, DESTROY_GUEST, ADVANCE_HEAD),
    RESTORE: (*_PUT_BACK, RESTORE_GUEST, ADVANCE_HEAD),
    DELETE: (*_REMOVE, ADVANCE_HEAD),
    PRUNE: (*_REMOVE, ADVANCE_HEAD),
    KEEP: (MARK, ADVANCE_HEAD),
    UNKEEP: (MARK, ADVANCE_HEAD),
    MIGRATE: (GUEST_SAVE, EXPORT_VTPM, EXPORT_CHECKPOINTS, SEND, FINISH_SOURCE, ADVANCE_HEAD),
    MIGRATE_IN: (IMPORT_VTPM, IMPORT_CHECKPOINTS, START_VTPM, RESTORE_GUEST, COMMIT, ADVANCE_HEAD),
}

# Points between two writes of one step, in order.  The journal passes ``<kind>:<step>`` when a step
# is journaled; the coordinator passes ``<kind>:<step>:<point>`` after each write listed here, so a
# crash test can stop the tool between the writes of one step (``xen_vtpm.faults``).
AUDITED: Final = "audited"          # the audit record that ends the operation is appended
ADVANCED: Final = "advanced"        # the head is advanced (counter incremented); the journal is not finished
DELETED: Final = "deleted"          # the store's delete is committed; the head does not bind it yet
UNPAUSED: Final = "unpaused"        # undo: the guest runs again
DISCARDED: Final = "discarded"      # undo: the manager's copy is discarded; the draft is not aborted yet

INNER_POINTS: Final[dict[str, tuple[str, ...]]] = {
    ADVANCE_HEAD: (AUDITED, ADVANCED),
    DELETE_STORE: (DELETED,),
    UNDO: (UNPAUSED, DISCARDED),
}

# The two halves of a move run on two hosts; each side's journal has its own.
MOVES: Final = frozenset({MIGRATE, MIGRATE_IN})

# Kinds that write a checkpoint: until it is committed, recover undoes them.
CAPTURING: Final = frozenset({SNAPSHOT, PRE_ROLLBACK, SAVE})
