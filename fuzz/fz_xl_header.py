"""Fuzz target: the xl save-file header parser (xen_vtpm.xen.savefile.read_save_header) -> MalformedSaveFile."""
from __future__ import annotations

import io
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm.errors import MalformedSaveFile
    from xen_vtpm.xen.savefile import FLAG_JSON, HEADER, read_save_header
    from xen_vtpm_sim.savestream import write_save

GUEST_UUID = "6f2c1a8e-3b0d-4c4e-9a57-1d2e3f405162"
VTPM_UUID = "0d3c5b7a-9e1f-4a2b-8c3d-4e5f60718293"


def configs() -> list[dict]:
    """Domain configs shaped like libxl's JSON (fields at their default are omitted, as libxl does)."""
    base = {"c_info": {"type": "hvm", "name": "guest1", "uuid": GUEST_UUID},
            "b_info": {"max_memkb": 16384, "target_memkb": 16384, "type.hvm": {"firmware": "bios"}}}
    return [
        dict(base, vtpms=[{"backend_domname": "vtpm-guest1", "uuid": VTPM_UUID}]),
        dict(base, vtpms=[{"backend_domid": 3, "devid": 0, "uuid": VTPM_UUID},
                          {"backend_domname": "vtpm-b", "devid": 1}]),
        dict(base, disks=[{"pdev_path": "guest1.img", "vdev": "xvda", "format": "raw"}]),
        {},
    ]


def seeds() -> list[bytes]:
    out = []
    for config in configs():
        buf = io.BytesIO()
        write_save(buf, config, b"", domid=5)   # no pages: the header is what this target is about
        out.append(buf.getvalue())
    return out


def check(data: bytes) -> bool:
    try:
        header = read_save_header(io.BytesIO(data))
    except MalformedSaveFile as exc:
        harness.expect(exc)
        return False
    assert header.mandatory_flags & FLAG_JSON
    assert HEADER.size + 4 < header.stream_offset <= len(data)
    assert isinstance(header.config, dict)
    for vtpm in header.vtpms:
        assert set(vtpm) == {"uuid", "backend_domname", "backend_domid", "devid"}
        assert type(vtpm["backend_domid"]) is int and type(vtpm["devid"]) is int
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
