"""The interface every vTPM backend offers the coordinator.

Xen's vtpmmgr + vtpm stub domains are the first backend (`stubdom`); swtpm
processes in dom0 (XCP-ng style) would be another.  The coordinator only sees
this interface, so the sequences do not change with the backend.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class VtpmRef:
    """One guest's vTPM: the guest-side device and the domain that serves it."""
    guest: str            # guest domain name
    devid: int
    backend: str          # name of the vTPM stub domain (backend= in the guest's cfg)
    uuid: str             # vTPM UUID from the /libxl trusted copy, cross-checked


@dataclass(frozen=True)
class VtpmCapture:
    """A consistent vTPM state: the disk image and the manager checkpoint that matches one of its slots."""
    image: bytes
    manager_checkpoint: str | None   # None with a stock manager (forward-only fingerprint only)
    manager_hash: str | None         # H, hex SHA-1 of the active slot blob
    slot_hashes: tuple[str, str]     # hex SHA-1 of slot 0 and slot 1 blobs


class VtpmBackend(Protocol):
    def supports_checkpoints(self) -> bool: ...
    def check_single_consumer(self, ref: VtpmRef) -> None: ...
    def capture(self, ref: VtpmRef, checkpoint_id: str) -> VtpmCapture: ...
    def fingerprint(self, ref: VtpmRef) -> tuple[str, str]: ...
    def stop(self, ref: VtpmRef) -> None: ...
    def put_back(self, ref: VtpmRef, capture: VtpmCapture) -> None: ...
    def start_verified(self, ref: VtpmRef) -> None: ...
    def is_running(self, ref: VtpmRef) -> bool: ...
    def discard(self, manager_checkpoint: str) -> None: ...
