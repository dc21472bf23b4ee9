"""Fuzz target: the libxl/libxc stream reader (xen_vtpm_sim.savestream.read_save) -> MalformedSaveFile."""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fz_xl_header  # noqa: E402
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm.errors import MalformedSaveFile
    from xen_vtpm_sim.savestream import PAGE_SIZE, read_save, write_save

GUEST_PAGES = 4   # the reader's memory: small, so pfns beyond it are reachable by mutation


def guest_memory(pages: int) -> bytes:
    return b"".join(bytes([0x11 * (i + 1)]) * 64 + bytes(PAGE_SIZE - 64) for i in range(pages))


def seeds() -> list[bytes]:
    out = []
    for pages, config in zip((1, 2, GUEST_PAGES, 0), fz_xl_header.configs()):
        buf = io.BytesIO()
        write_save(buf, config, guest_memory(pages), domid=7)
        out.append(buf.getvalue())
    return out


def check(data: bytes) -> bool:
    memory = bytearray(GUEST_PAGES * PAGE_SIZE)
    try:
        info = read_save(io.BytesIO(data), memory)
    except MalformedSaveFile as exc:
        harness.expect(exc)
        return False
    assert 0 <= info.pages
    assert info.libxc_version in (2, 3)
    assert len(memory) == GUEST_PAGES * PAGE_SIZE, "the reader resized the caller's memory"
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
