"""The vTPM stub domain's disk image (vtpmblk): two slots, each ``be32 L ‖ blob[L]``.

Slot 0 starts at byte 0 and slot 1 at half the image; the manager's H is the SHA-1 of the blob in
one of them (docs/xen-internals.md, the vTPM disk format).  Fingerprinting both slots tells a
dom0 tool which state the manager names and whether the vTPM moved on, without any key.
"""
from __future__ import annotations

import hashlib
import os
import struct


def slot_fingerprints(image: str | os.PathLike | bytes) -> tuple[str | None, str | None]:
    """Hex SHA-1 of the blob in slot 0 (byte 0) and slot 1 (byte size/2); None for an empty slot.

    `image` is the image file or a copy of its bytes (a checkpoint holds the copy)."""
    if not isinstance(image, (bytes, bytearray, memoryview)):
        with open(image, "rb") as fh:
            image = fh.read()
    data = memoryview(image)
    half = len(data) // 2
    out: list[str | None] = []
    for offset in (0, half):
        head = bytes(data[offset:offset + 4])
        length = struct.unpack(">I", head)[0] if len(head) == 4 else 0
        blob = data[offset + 4:offset + 4 + length] if 0 < length <= half - 4 else b""
        out.append(hashlib.sha1(blob).hexdigest() if len(blob) == length and length else None)
    return out[0], out[1]


def matching_slot(image: str | os.PathLike, manager_hash: str) -> int | None:
    """Which slot the manager's H points at (None: the pair is inconsistent, never start it)."""
    for slot, digest in enumerate(slot_fingerprints(image)):
        if digest is not None and digest == manager_hash.lower():
            return slot
    return None


