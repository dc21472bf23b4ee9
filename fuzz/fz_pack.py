"""Fuzz target: the pack file parser (xen_vtpm.store.packs.read_index) -> IntegrityError.

The input is the whole content of a pack file named like the seed packs; accepted input must
describe entries that tile the file between header and index.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    import store_seeds

    from xen_vtpm.errors import IntegrityError
    from xen_vtpm.store import packs

# Every seed pack is renamed to this one name (its header's pack id is rewritten to match),
# so mutations keep the name binding valid and reach the index checks.
NAME = "00112233445566778899aabbccddeeff"
_DIR: Path | None = None


def seeds() -> list[bytes]:
    out = []
    for _name, data in store_seeds.artifacts()[1].items():
        raw = bytearray(data)
        raw[16:32] = bytes.fromhex(NAME)
        out.append(_redigest(bytes(raw)))
    return out


def _redigest(raw: bytes) -> bytes:
    """The footer digest covers the header: recompute it as the writer would for the new name."""
    index_off, count, res, _, end = packs.FOOTER.unpack_from(raw, len(raw) - packs.FOOTER.size)
    index = raw[index_off:index_off + count * packs.INDEX.size]
    digest = hashlib.sha256(raw[:packs.HEADER.size] + index).digest()
    return raw[:len(raw) - packs.FOOTER.size] + packs.FOOTER.pack(index_off, count, res, digest, end)


def check(data: bytes) -> bool:
    global _DIR
    if _DIR is None:
        _DIR = harness.scratch_dir()
    packs.pack_path(_DIR, NAME).write_bytes(data)
    try:
        entries = packs.read_index(_DIR, NAME)
    except IntegrityError as exc:
        harness.expect(exc)
        return False
    expected = packs.HEADER.size
    for _, offset, length in entries:
        assert offset == expected
        expected = offset + packs.ENTRY.size + length
    assert expected + len(entries) * packs.INDEX.size + packs.FOOTER.size == len(data)
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
