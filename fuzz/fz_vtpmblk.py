"""Fuzz target: the vTPM disk image slot parser (xen_vtpm_sim.vtpmblk) -> ChecksumError.

Input: K[32] ‖ image.  The image is written to a file; every slot blob ``read_slot`` returns is
then loaded with ``SHA1(blob) ‖ K``, which passes the hash check as the manager's own H would,
so the decryption and length checks behind it are reached.  ``load`` must return the plaintext
or raise ChecksumError; a hash the image does not hold must always be ChecksumError.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm_sim import vtpmblk

IMAGE_SIZE = 2048   # the real image is 2 MiB; the layout only depends on size // 2
_DIR: Path | None = None


def _image_path() -> Path:
    global _DIR
    if _DIR is None:
        _DIR = harness.scratch_dir()
    return _DIR / "vtpm.img"


def seeds() -> list[bytes]:
    """Images as the vTPM stub domain writes them: one or both slots, each under its own fresh K."""
    path = _image_path()
    out = []
    for plaintexts in ((b"tpm state v1" * 20,), (b"tpm state v1" * 20, b"v2" * 300), (b"",)):
        path.write_bytes(bytes(IMAGE_SIZE))
        for slot, plaintext in enumerate(plaintexts):
            hashkey = vtpmblk.write_slot(path, slot, plaintext)
        out.append(hashkey[vtpmblk.HASH_SIZE:] + path.read_bytes())
    return out


def check(data: bytes) -> bool:
    if len(data) < vtpmblk.KEY_SIZE:
        return False
    key, image = data[:vtpmblk.KEY_SIZE], data[vtpmblk.KEY_SIZE:]
    path = _image_path()
    path.write_bytes(image)
    digests = vtpmblk.fingerprints(path)
    accepted = False
    for slot in (0, 1):
        blob = vtpmblk.read_slot(path, slot)
        assert (blob is None) == (digests[slot] is None)
        if blob is None:
            continue
        assert 0 < len(blob) <= len(image) // 2 - 4
        try:
            found, plaintext = vtpmblk.load(path, hashlib.sha1(blob).digest() + key)
        except vtpmblk.ChecksumError as exc:
            harness.expect(exc)
            continue
        assert digests[found] == hashlib.sha1(blob).digest()
        assert len(plaintext) <= len(blob) - vtpmblk.IV_SIZE
        accepted = True
    absent = hashlib.sha1(b"not in any slot" + data).digest()
    try:
        vtpmblk.load(path, absent + key)
    except vtpmblk.ChecksumError as exc:
        harness.expect(exc)
    else:
        raise AssertionError("load accepted a hash that no slot has")
    return accepted


if __name__ == "__main__":
    harness.main(check, seeds)
