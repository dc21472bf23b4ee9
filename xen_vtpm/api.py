"""The Python API for dom0 scripts: ``from xen_vtpm import Host`` (docs/api.md).

Every method opens the host's adapters for one call (``wiring``), runs one sequence of the
coordinator and closes them again, so a ``Host`` holds no connection, lock or TPM session
between calls.  Results are frozen dataclasses; failures are the classes of ``xen_vtpm.errors``,
each carrying the exit code the command line gives for it.  The command line (``cli/``) is a
layer of argument parsing and printing over this module, so both behave the same.
"""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator

from xen_vtpm import schedule, wiring
from xen_vtpm.config import Config
from xen_vtpm.core.coordinator import Coordinator
from xen_vtpm.errors import XenVtpmError
from xen_vtpm.host import provision
from xen_vtpm.model import Check, Checkpoint, PruneEntry, PruneResult, RetentionPolicy

__all__ = ["Host", "HostStatus", "CheckpointInfo", "SnapshotResult", "RollbackResult", "SaveResult",
           "RestoreResult", "DeleteResult", "VerifyResult", "KeepResult", "RecoverResult", "ScheduledRun",
           "RetentionPolicy", "PruneResult", "PruneEntry", "Check"]


def doctor_summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if not c.passed]
    head = f"{len(checks) - len(failed)} of {len(checks)} checks pass"
    return head + (f"; failing: {', '.join(failed)} (see `xen-vtpm doctor`)" if failed else "")


@dataclasses.dataclass(frozen=True)
class HostStatus:
    """`status`: each value says what it found, never raises for a state it describes."""
    config_file: str
    state_dir: str
    provisioned: bool
    rollback_auth: str
    tpm: str
    pcr_policy: str
    counter: int | str | None
    catalog_head: str
    audit_chain: str
    real_host: str = ""           # the `doctor` checks in one line


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    id: str
    name: str
    domain: str
    kind: str | None        # snapshot, pre-rollback or save; None when the manifest fails its check
    time: str               # UTC, ISO 8601
    size: int               # bytes of the state it represents
    stored_bytes: int       # what it added to the store
    verified: str           # "manifest ok", or "FAILED: <reason>" (`verify` reads every chunk)
    kept: bool              # marked with `keep`
    backend: str | None     # the vTPM backend kind (stubdom, swtpm); None when the manifest fails its check

    @property
    def ok(self) -> bool:
        return not self.verified.startswith("FAILED")


@dataclasses.dataclass(frozen=True)
class SnapshotResult:
    id: str
    name: str
    domain: str
    vm_uuid: str
    vtpm_uuid: str
    pause_window_s: float   # how long the guest did not run
    size: int
    stored_bytes: int


@dataclasses.dataclass(frozen=True)
class RollbackResult:
    domain: str
    rolled_back_to: str
    name: str
    safety_checkpoint: str | None   # the pre-rollback checkpoint of the state left (None if not taken)
    downtime_s: float       # from the old guest's destruction to the new guest running


@dataclasses.dataclass(frozen=True)
class SaveResult:
    id: str
    name: str
    domain: str
    file: str
    size: int
    stored_bytes: int


@dataclasses.dataclass(frozen=True)
class RestoreResult:
    domain: str
    checkpoint: str
    vtpm_restored: bool     # the vTPM had moved on and was put back
    paused: bool


@dataclasses.dataclass(frozen=True)
class DeleteResult:
    deleted: str
    name: str
    freed_bytes: int


@dataclasses.dataclass(frozen=True)
class VerifyResult:
    id: str
    name: str
    vm_name: str
    streams: int
    chunks: int
    size: int
    packs: int
    status: str             # "ok" (any defect raises IntegrityError instead)


@dataclasses.dataclass(frozen=True)
class KeepResult:
    id: str
    name: str
    domain: str
    kept: bool


@dataclasses.dataclass(frozen=True)
class RecoverResult:
    op: int
    kind: str
    vm: str
    last_step: str | None
    outcome: str


@dataclasses.dataclass(frozen=True)
class ScheduledRun:
    """One run of a guest's schedule: the snapshot, then the prune (None with `prune = no`)."""
    snapshot: SnapshotResult
    prune: PruneResult | None


class Host:
    """This host's checkpoints.  ``config``: the config file (default ``$XEN_VTPM_CONFIG``, then
    ``/etc/xen-vtpm/xen-vtpm.conf``) or a loaded ``Config``.  ``progress``, if given, is called as
    ``progress(label, total_bytes)`` for each long transfer and returns an object with
    ``update(n)`` and ``close()``."""

    def __init__(self, config: str | os.PathLike[str] | Config | None = None, *,
                 progress: wiring.Progress | None = None) -> None:
        self.config = config if isinstance(config, Config) else Config.load(config)
        self._progress = progress

    @contextlib.contextmanager
    def _coordinator(self) -> Iterator[Coordinator]:
        with wiring.coordinator(self.config, self._progress) as coord:
            yield coord

    # --- reading ----------------------------------------------------------------------
    def status(self) -> HostStatus:
        return HostStatus(**provision.status(self.config), real_host=doctor_summary(self.doctor()))

    def doctor(self) -> list[Check]:
        """Every precondition of a real Xen 4.17 host, each with whether it holds and its exact fix."""
        return wiring.doctor_checks(self.config)

    def checkpoints(self, domain: str | None = None) -> list[CheckpointInfo]:
        """Every checkpoint (of ``domain``, which may no longer exist), oldest first."""
        with self._coordinator() as coord:
            listed = coord.checkpoints(domain)
            held = coord.p.store.holds()
        return [CheckpointInfo(ckpt.id, ckpt.name, ckpt.vm_name, ckpt.kind, ckpt.time, ckpt.size, ckpt.stored_bytes,
                               "manifest ok", ckpt.id in held, ckpt.meta.backend_kind)
                if isinstance(ckpt, Checkpoint) else
                CheckpointInfo(entry.id, entry.name, entry.vm_name, None, entry.time, entry.size, entry.stored_bytes,
                               f"FAILED: {ckpt}", entry.id in held, None)
                for entry, ckpt in listed]

    def verify(self, checkpoint: str | None = None) -> list[VerifyResult]:
        """Read and check every byte of ``checkpoint`` (None: of every checkpoint); changes nothing."""
        with self._coordinator() as coord:
            return [VerifyResult(**row) for row in coord.verify(checkpoint)]

    def retention(self, domain: str | None = None) -> RetentionPolicy:
        """The [retention] rules of the config file, with ``domain``'s own section over them."""
        return RetentionPolicy(**self.config.retention(domain))

    # --- changing -----------------------------------------------------------------------
    def snapshot(self, domain: str, name: str | None = None) -> SnapshotResult:
        with self._coordinator() as coord:
            return SnapshotResult(**coord.snapshot(domain, name=name))

    def rollback(self, domain: str, checkpoint: str, *, auth_secret: bytes | None = None,
                 safety_checkpoint: bool = True, paused: bool = False) -> RollbackResult:
        with self._coordinator() as coord:
            return RollbackResult(**coord.rollback(domain, checkpoint, auth_secret=auth_secret,
                                                   safety_checkpoint=safety_checkpoint, paused=paused))

    def save(self, domain: str, path: str | os.PathLike[str]) -> SaveResult:
        with self._coordinator() as coord:
            return SaveResult(**coord.save(domain, os.fspath(path)))

    def restore(self, path: str | os.PathLike[str], *, paused: bool = False) -> RestoreResult:
        with self._coordinator() as coord:
            return RestoreResult(**coord.restore(os.fspath(path), paused=paused))

    def delete(self, checkpoint: str) -> DeleteResult:
        with self._coordinator() as coord:
            return DeleteResult(**coord.delete(checkpoint))

    def keep(self, checkpoint: str) -> KeepResult:
        """Mark a checkpoint so that `prune` and `delete` leave it alone."""
        with self._coordinator() as coord:
            return KeepResult(**coord.keep(checkpoint, True))

    def unkeep(self, checkpoint: str) -> KeepResult:
        with self._coordinator() as coord:
            return KeepResult(**coord.keep(checkpoint, False))

    def prune(self, domain: str | None = None, policy: RetentionPolicy | None = None, *,
              include_saves: bool | None = None, dry_run: bool = False) -> list[PruneResult]:
        """Remove what the retention rules do not keep, for ``domain`` (None: every VM with
        checkpoints); one result per VM.  ``policy`` None: each VM's rules from the config file;
        ``include_saves``, unless None, overrides the policy's."""
        def policy_for(vm_name: str) -> RetentionPolicy:
            rules = policy if policy is not None else self.retention(vm_name)
            return rules if include_saves is None else dataclasses.replace(rules, include_saves=include_saves)

        with self._coordinator() as coord:
            return coord.prune(domain, policy_for, dry_run=dry_run)

    def recover(self) -> list[RecoverResult]:
        """Finish or undo what a crash interrupted (every changing method does this first, but only this
        one asks the other host of an interrupted move what it decided)."""
        with self._coordinator() as coord:
            return [RecoverResult(**row) for row in coord.recover(ask_peers=True)]

    def run_schedule(self, domain: str) -> ScheduledRun:
        """What the guest's timer runs: a snapshot, then a prune with the guest's [retention] rules
        (unless its [schedule] says ``prune = no``).  The outcome, failed or not, goes to the audit log."""
        policy = schedule.rules(self.config, domain)   # before the snapshot
        with self._coordinator() as coord:
            try:
                snap = SnapshotResult(**coord.snapshot(domain))
                pruned = coord.prune(domain, lambda _: policy)[0] if policy else None
            except XenVtpmError as exc:
                with contextlib.suppress(XenVtpmError):   # the failure is what the caller must see
                    coord.p.audit.append(action=schedule.SCHEDULED, vm=domain, checkpoint=None,
                                         result=f"failed (exit {exc.exit_code}): {exc}"[:500])
                raise
            coord.p.audit.append(action=schedule.SCHEDULED, vm=domain, checkpoint=snap.id, result="ok",
                                 detail=f"snapshot {snap.name}" + (f", pruned {len(pruned.removed)}" if pruned else ""))
        return ScheduledRun(snap, pruned)

