"""Fuzz target: the xl.cfg parser (xen_vtpm.xen.xlcfg: load_cfg, parse_disk, parse_vtpm) -> XlConfigError.

The input is a config file's bytes.  There is no standalone cfg writer to draw seeds from, so
the seeds are the files the simulated host writes for the manager, a vTPM stub domain and a
guest (same text as xen_vtpm_sim/host.py), plus the xl.cfg syntax libxlu accepts besides.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import harness  # noqa: E402

with harness.instrumented():
    from xen_vtpm.errors import XlConfigError
    from xen_vtpm.xen import xlcfg

_DIR: Path | None = None


def seeds() -> list[bytes]:
    uid = "0d3c5b7a-9e1f-4a2b-8c3d-4e5f60718293"
    return [s.encode() for s in (
        'name="vtpmmgr"\nkernel="/usr/lib/xen/boot/vtpmmgr-stubdom.gz"\n'
        'extra="tpmlocality=2 checkpoint=1"\nmemory=128\ndisk=["file:images/vtpmmgr.img,hda,w"]\niomem=["fed40,5"]\n',
        'name="vtpm-guest1"\nkernel="/usr/lib/xen/boot/vtpm-stubdom.gz"\nmemory=8\n'
        f'disk=["file:images/vtpm-guest1.img,hda,w"]\nvtpm=["backend=vtpmmgr,uuid={uid}"]\n',
        f'name = "guest1"  # a comment\nuuid = "{uid}"\nmemory = 0x40; vcpus = 2\n'
        'disk = [ "target=guest1.img,vdev=xvda,access=ro",\n  \'phy:/dev/vg/g1,xvdb,w\', ]\n'
        'vtpm = [ "backend=vtpm-guest1" ]\nextra = "console=hvc0 \\"quoted\\"\\n"\nextra += " more"\n'
        'vif = []\ncpu_weight = 1.5\n',
    )]


def check(data: bytes) -> bool:
    global _DIR
    if _DIR is None:
        _DIR = harness.scratch_dir()
    path = _DIR / "domain.cfg"
    path.write_bytes(data)
    try:
        cfg = xlcfg.load_cfg(str(path))
    except XlConfigError as exc:
        harness.expect(exc)
        return False
    assert isinstance(cfg, dict)
    if "memory" in cfg:
        assert isinstance(cfg["memory"], int)
    for key, parse in (("disk", xlcfg.parse_disk), ("vtpm", xlcfg.parse_vtpm)):
        for spec in cfg.get(key, []):
            try:
                parse(str(spec))
            except XlConfigError as exc:
                harness.expect(exc)
    return True


if __name__ == "__main__":
    harness.main(check, seeds)
