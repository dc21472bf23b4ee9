"""The values every layer passes around: frozen dataclasses, no I/O.

The coordinator works on these, the adapters produce them, and the checkpoint metadata the
store carries (without reading it) is ``CheckpointMeta.encode()``.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any

from xen_vtpm.errors import IntegrityError


@dataclasses.dataclass(frozen=True)
class VtpmRef:
    """One guest's vTPM: the guest-side device and what serves it."""
    guest: str            # guest domain name
    devid: int
    backend: str          # stubdom: the vTPM stub domain (backend= in the guest's cfg); swtpm: swtpm-<guest>
    uuid: str             # stubdom: the vTPM's UUID at the manager (libxl's trusted copy, cross-checked);
                          # swtpm: the UUID xen-vtpm gave the vTPM (`vtpm add`), named by the device model's socket
    backend_kind: str = "stubdom"   # one of BACKEND_KINDS: which VtpmBackend serves it


# The vTPM backends (xen_vtpm/vtpm/<kind>.py); wiring picks one per guest.
BACKEND_KINDS = ("stubdom", "swtpm")


@dataclasses.dataclass(frozen=True)
class VtpmCapture:
    """A consistent vTPM state, as its backend captured it while the guest was suspended.

    stubdom: the disk image and the manager checkpoint that names one of its slots.  swtpm: swtpm's
    state files (encrypted by swtpm with the vTPM's state key), packed; they hold everything."""
    image: bytes = dataclasses.field(repr=False)
    # The backend's handle on what it needs besides the image to put this capture back: the
    # manager's checkpoint entry (stubdom), the checkpoint id (swtpm: nothing is held elsewhere).
    # None: it cannot be put back (a stock manager: forward-only fingerprint only).
    manager_checkpoint: str | None
    manager_hash: str | None         # stubdom: H, hex SHA-1 of the active slot blob; swtpm: None
    # Fingerprints of the vTPM's persistent state ("" for an empty part); any change means it moved on.
    # stubdom: hex SHA-1 of the slot 0 and slot 1 blobs; swtpm: SHA-256 of its permanent and volatile files.
    slot_hashes: tuple[str, str]
    backend_kind: str = "stubdom"


@dataclasses.dataclass(frozen=True)
class VtpmExport:
    """A vTPM on its way to another host: its state as the vTPM itself encrypted it, its secret
    wrapped for a key only the destination's TPM can use, and what the destination needs to run it."""
    kind: str                        # the backend kind that made it and must receive it
    ref: VtpmRef
    envelope: bytes = dataclasses.field(repr=False)   # the secret, for the destination's key
    state: bytes = dataclasses.field(repr=False)      # stub domain: the disk image, encrypted under K
    state_hash: str                  # what the secret names (stub domain: H, SHA-1 of the active slot)
    slot_hashes: tuple[str, str]
    config: str                      # stub domain: its xl cfg file

    def meta(self) -> dict[str, Any]:
        """Everything but the state, as JSON values (the state travels in records of its own)."""
        return {"kind": self.kind, "ref": dataclasses.asdict(self.ref), "envelope": self.envelope.hex(),
                "state_hash": self.state_hash, "slot_hashes": list(self.slot_hashes), "config": self.config,
                "state_bytes": len(self.state)}

    @classmethod
    def from_meta(cls, meta: Any, state: bytes) -> VtpmExport:
        try:
            if len(state) != meta["state_bytes"]:
                raise ValueError(f"{len(state)} state bytes arrived, {meta['state_bytes']} announced")
            ref = VtpmRef(**meta["ref"])
            slots = tuple(str(h) for h in meta["slot_hashes"])
            if len(slots) != 2:
                raise ValueError("slot_hashes")
            return cls(kind=str(meta["kind"]), ref=ref, envelope=bytes.fromhex(meta["envelope"]), state=state,
                       state_hash=str(meta["state_hash"]), slot_hashes=(slots[0], slots[1]),
                       config=str(meta["config"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise IntegrityError(f"the moving vTPM's description is malformed ({exc}); the source runs another "
                                 "version of xen-vtpm") from None


@dataclasses.dataclass(frozen=True)
class Guest:
    name: str
    domid: int
    uuid: str
    vtpm: VtpmRef
    paused: bool
    mem_mib: int = 0       # `xl list`'s Mem: sizes the snapshot spool


@dataclasses.dataclass(frozen=True)
class SaveHeader:
    """The header of an `xl save` file (``xen.savefile`` parses it)."""
    mandatory_flags: int
    optional_flags: int
    config: dict[str, Any]            # libxl's JSON of the domain config
    vtpms: list[dict[str, Any]]       # its vtpms[] entries
    stream_offset: int                # where the libxl migration stream begins
    # swtpm control sockets of the emulator TPMs its device_model_args_hvm wires to QEMU
    emulator_tpms: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class CatalogEntry:
    """A checkpoint as the catalog lists it, before its manifest (and so its MAC) is checked."""
    id: str
    name: str
    vm_uuid: str
    vm_name: str
    time: str              # UTC, ISO 8601
    size: int              # logical bytes
    stored_bytes: int      # bytes this checkpoint added to the store


KINDS = ("snapshot", "pre-rollback", "save")


@dataclasses.dataclass(frozen=True)
class CheckpointMeta:
    """What the tool records with a checkpoint; the store carries it MAC'd but never reads it."""
    kind: str                                   # one of KINDS
    vtpm_uuid: str
    vtpm_backend: str
    manager_checkpoint: str | None              # VtpmCapture.manager_checkpoint (None: stock manager)
    manager_hash: str | None
    slot_hashes: tuple[str, str]
    save_file: str | None = None                # `save`: the xl save image bound to this checkpoint
    save_file_digest: str | None = None
    pause_window_s: float | None = None
    save_info: dict[str, Any] = dataclasses.field(default_factory=dict)
    backend_kind: str = "stubdom"               # one of BACKEND_KINDS (absent from metadata written before it)

    VERSION = 1

    def encode(self) -> bytes:
        """Canonical JSON: the same meta always gives the same bytes."""
        body = dataclasses.asdict(self)
        body["version"] = self.VERSION
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode("ascii")

    @classmethod
    def decode(cls, raw: bytes, label: str) -> CheckpointMeta:
        """Parse what ``encode`` wrote; IntegrityError for anything else (it passed the manifest MAC,
        so anything else means a bug or a different tool version, never a value to guess at)."""
        try:
            body = json.loads(raw.decode("ascii"))
            if not isinstance(body, dict) or body.pop("version", None) != cls.VERSION:
                raise ValueError("unknown metadata version")
            body["slot_hashes"] = tuple(body["slot_hashes"])
            meta = cls(**body)
            if meta.kind not in KINDS or len(meta.slot_hashes) != 2 or meta.backend_kind not in BACKEND_KINDS:
                raise ValueError("bad kind, slot list or backend kind")
            return meta
        except (UnicodeDecodeError, ValueError, TypeError, KeyError) as exc:
            raise IntegrityError(f"checkpoint {label}: its metadata cannot be read ({exc}); it was written by "
                                 "another version of xen-vtpm — use that version, or delete the checkpoint") from None


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """A checkpoint whose manifest MAC was checked: identity and metadata come from the manifest."""
    id: str
    name: str
    vm_uuid: str
    vm_name: str
    time: str
    size: int
    stored_bytes: int
    meta: CheckpointMeta

    @property
    def kind(self) -> str:
        return self.meta.kind

    @property
    def manager_checkpoint(self) -> str | None:
        return self.meta.manager_checkpoint

    def vtpm_ref(self) -> VtpmRef:
        """The vTPM this checkpoint belongs to (the guest side may no longer exist)."""
        return VtpmRef(guest=self.vm_name, devid=0, backend=self.meta.vtpm_backend, uuid=self.meta.vtpm_uuid,
                       backend_kind=self.meta.backend_kind)


@dataclasses.dataclass(frozen=True)
class Check:
    """One precondition of a real Xen host (`xen-vtpm doctor`): whether it holds, what was seen, the exact fix."""
    name: str
    passed: bool
    detail: str
    fix: str = ""


@dataclasses.dataclass(frozen=True)
class RetentionPolicy:
    """How many checkpoints `prune` keeps per rule (0: the rule is off; ``core.retention`` applies
    them), and whether checkpoints a save file is bound to are candidates too."""
    keep_last: int = 0
    keep_hourly: int = 0
    keep_daily: int = 0
    keep_weekly: int = 0
    keep_monthly: int = 0
    keep_yearly: int = 0
    include_saves: bool = False

    RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

    def counts(self) -> dict[str, int]:
        """rule -> count, in the order the rules are listed."""
        return {rule: int(getattr(self, f"keep_{rule}")) for rule in self.RULES}

    @property
    def empty(self) -> bool:
        return not any(self.counts().values())


@dataclasses.dataclass(frozen=True)
class PruneEntry:
    """One checkpoint `prune` looked at, and why it stays (``rules`` is empty for one it removes)."""
    id: str
    name: str
    kind: str
    time: str              # UTC, ISO 8601
    rules: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class PruneResult:
    """What `prune` kept and removed of one VM's checkpoints, newest first."""
    domain: str
    vm_uuid: str
    dry_run: bool
    kept: tuple[PruneEntry, ...]
    removed: tuple[PruneEntry, ...]
    freed_bytes: int
