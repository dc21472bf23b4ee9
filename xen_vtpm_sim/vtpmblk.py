"""The vTPM disk image layout of stubdom/vtpm/vtpmblk.c (docs/xen-internals.md §5).

Two slots, slot 0 at byte 0 and slot 1 at ``size // 2``.  A slot holds ``be32 L ‖ blob[L]`` with
``blob = IV[16] ‖ AES-256-CBC(K, IV, plaintext zero-padded to 16)`` and ``IV = 12 random bytes ‖
be32 plaintext_len``.  Every write uses a fresh random K and goes to the inactive slot; the manager
keeps ``H ‖ K`` with ``H = SHA1(blob)`` (the length prefix excluded).  No MAC: integrity and
freshness come only from H held by the manager.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

HASH_SIZE = 20
KEY_SIZE = 32
HASHKEY_SIZE = HASH_SIZE + KEY_SIZE
IV_SIZE = 16


class ChecksumError(Exception):
    """No slot of the image hashes to the manager's H."""


def slot_offsets(image_size: int) -> tuple[int, int]:
    return 0, image_size // 2


def encrypt(plaintext: bytes, key: bytes) -> bytes:
    iv = os.urandom(12) + struct.pack(">I", len(plaintext))
    padded = plaintext + bytes(-len(plaintext) % 16)
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    return iv + enc.update(padded) + enc.finalize()


def decrypt(blob: bytes, key: bytes) -> bytes:
    if len(blob) < IV_SIZE or (len(blob) - IV_SIZE) % 16:
        raise ChecksumError("Decryption Error: Cipher block size was not a multiple of 16")
    iv = blob[:IV_SIZE]
    (length,) = struct.unpack(">I", iv[12:])
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    padded = dec.update(blob[IV_SIZE:]) + dec.finalize()
    if length > len(padded):
        raise ChecksumError(f"IV announces {length} plaintext bytes, only {len(padded)} present")
    return padded[:length]


class SlotError(Exception):
    """A slot read_vtpmblk_raw() refuses; ``line`` is where vtpmblk.c prints the reason."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


def _size(fd: int) -> int:
    # A block device (a `phy:` disk) reports st_size 0: its end is found by seeking.
    return os.lseek(fd, 0, os.SEEK_END)


def read_raw(path: str | os.PathLike, slot: int) -> bytes:
    """read_vtpmblk_raw(): the blob stored in ``slot``, with vtpmblk.c's checks (docs/xen-internals.md §5.4)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        size = _size(fd)
        offset = slot_offsets(size)[slot]
        head = os.pread(fd, 4, offset)
        if len(head) < 4:
            raise SlotError(101, "read(length) failed! error was Input/output error")
        (length,) = struct.unpack(">I", head)
        if length == 0:
            raise SlotError(106, "read 0 data_length for NVM")
        if length > size // 2 - 4:
            raise SlotError(110, "read invalid data_length for NVM")
        blob = os.pread(fd, length, offset + 4)
    finally:
        os.close(fd)
    if len(blob) != length:
        raise SlotError(116, "read(data) failed! error was Input/output error")
    return blob


def read_slot(path: str | os.PathLike, slot: int) -> bytes | None:
    """The blob stored in ``slot``, or None if its length prefix does not fit the slot."""
    try:
        return read_raw(path, slot)
    except SlotError:
        return None


def fingerprints(path: str | os.PathLike) -> tuple[bytes | None, bytes | None]:
    """SHA1 of each slot's blob (None for an empty/invalid slot); one must equal the manager's H."""
    out = []
    for slot in (0, 1):
        blob = read_slot(path, slot)
        out.append(hashlib.sha1(blob).digest() if blob is not None else None)
    return out[0], out[1]


def write_slot(path: str | os.PathLike, slot: int, plaintext: bytes) -> bytes:
    """Encrypt under a fresh key into ``slot``, fsync, and return ``H ‖ K`` for SAVEHASHKEY."""
    key = os.urandom(KEY_SIZE)
    blob = encrypt(plaintext, key)
    fd = os.open(path, os.O_RDWR)
    try:
        size = _size(fd)
        if 4 + len(blob) > size // 2:
            raise OSError(f"{Path(path).name}: state of {len(blob)} bytes does not fit a {size // 2}-byte slot")
        os.pwrite(fd, struct.pack(">I", len(blob)) + blob, slot_offsets(size)[slot])
        os.fdatasync(fd)
    finally:
        os.close(fd)
    return hashlib.sha1(blob).digest() + key


def load(path: str | os.PathLike, hashkey: bytes) -> tuple[int, bytes]:
    """Find the slot whose SHA1 is H and decrypt it with K: (slot, plaintext); ChecksumError if none."""
    if len(hashkey) < HASHKEY_SIZE:
        raise ChecksumError(f"hash+key of {len(hashkey)} bytes, expected {HASHKEY_SIZE}")
    digest, key = hashkey[:HASH_SIZE], hashkey[HASH_SIZE:HASHKEY_SIZE]
    for slot in (0, 1):
        blob = read_slot(path, slot)
        if blob is not None and hashlib.sha1(blob).digest() == digest:
            return slot, decrypt(blob, key)
    raise ChecksumError("no slot matches the manager's hash")
