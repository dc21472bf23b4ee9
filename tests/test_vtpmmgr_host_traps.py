"""What Xen 4.17 leaves to the host, chosen per manager (vtpmmgr-native --xsm, --no-provision,
--release-delay; the sim_* keys of its xl cfg, xen_vtpm_sim/vtpmmgr.py), run through Xen's own
vtpm_cmd_handler.c: each trap does to a reloading vTPM what docs/xen-internals.md §3 says."""
from __future__ import annotations

import pytest
from sim_fixture import sim_host_module  # noqa: F401
from test_vtpm_stubdom import VtpmLab, _populate, lab, wait_manager_console  # noqa: F401

from xen_vtpm.xen.consoles import log_path
from xen_vtpm_sim.mgrdisk import MgrDisk, PtpmSealer

SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


@pytest.fixture
def manager(lab):  # noqa: F811
    """Restart the manager with extra cfg lines; the original comes back after the test."""
    cfg = lab.sim.dir / "images" / "vtpmmgr.cfg"
    original = cfg.read_text()

    def restart(lines: str = "", text: str | None = None) -> str:
        log = log_path(lab.cfg.log_dir, "vtpmmgr")
        old = lab.mgr.info().domid
        lab.sim.xl("destroy", "vtpmmgr")
        assert lab.xs.wait_for(lambda: not lab.xs.is_introduced(old), ["@releaseDomain"], 20)
        cfg.write_text((text or original) + lines)
        offset = log.stat().st_size
        lab.sim.xl("create", str(cfg))
        return wait_manager_console(log, offset)
    yield restart
    restart()
    log = log_path(lab.cfg.log_dir, "vtpmmgr").read_text(errors="replace")
    assert not [m for m in SANITIZER_MARKS if m in log], log[-3000:]


def _entry(lab: VtpmLab, uuid: str) -> bytes:
    disk = MgrDisk(lab.sim.dir / "images" / "vtpmmgr.img",
                   PtpmSealer((lab.sim.dir / "run" / "ptpm.tcti").read_text().strip()))
    table = disk.load()
    assert table is not None
    return table[bytes.fromhex(uuid.replace("-", ""))].data


def _manager_tail(lab: VtpmLab, offset: int) -> str:
    return log_path(lab.cfg.log_dir, "vtpmmgr").read_bytes()[offset:].decode(errors="replace")


def test_without_xsm_a_reload_fails_and_the_fresh_vtpm_overwrites_its_entry(lab, manager):  # noqa: F811
    assert "xsm: no XSM module" in manager('sim_xsm="none"\n')
    dom = lab.create("vtpm-x")
    assert dom.status.fresh and dom.status.manager_rc == 3        # unknown UUID: refused before the XSM step
    before = _populate(lab, dom)                          # ...and auto-created by the first save
    lab.destroy(dom)
    saved = _entry(lab, dom.uuid)

    again = lab.create("vtpm-x", dom.uuid)
    log = log_path(lab.cfg.log_dir, "vtpm-x").read_text()
    assert again.status.fresh and again.status.manager_rc == 9 and "failed with error code (9)" in log   # TPM_FAIL
    with lab.tpm(again) as tpm:
        assert tpm.ek_name() != before["ek"]              # a brand-new TPM
    # The refused connection kept the entry: the fresh vTPM's saves went through and replaced it.
    assert "VTPM_SaveHashKey failed" not in log_path(lab.cfg.log_dir, "vtpm-x").read_text()
    lab.sim.xl("pause", again.name)
    assert _entry(lab, dom.uuid) != saved
    lab.sim.xl("unpause", again.name)
    lab.destroy(again)


def test_an_unprovisioned_manager_refuses_every_reload_and_writes_nothing(lab, manager):  # noqa: F811
    blank = lab.sim.dir / "images" / "vtpmmgr-blank.img"
    blank.write_bytes(bytes(2 << 20))
    cfg = (lab.sim.dir / "images" / "vtpmmgr.cfg").read_text()
    boot = manager("sim_unprovisioned=1\n", cfg.replace(str(lab.sim.dir / "images" / "vtpmmgr.img"), str(blank)))
    assert "group 0 stays unprovisioned" in boot          # the provisioning words were ignored
    dom = lab.create("vtpm-n")
    _populate(lab, dom)
    lab.destroy(dom)
    offset = log_path(lab.cfg.log_dir, "vtpmmgr").stat().st_size
    again = lab.create("vtpm-n", dom.uuid)
    assert again.status.fresh and again.status.manager_rc == 7
    assert "failed with error code (7)" in log_path(lab.cfg.log_dir, "vtpm-n").read_text()      # TPM_DISABLED
    assert "Unauthorized vTPM kernel image used!" in _manager_tail(lab, offset)
    lab.destroy(again)
    assert blank.read_bytes() == bytes(2 << 20)


def test_the_release_race_opens_the_vtpm_twice(lab, manager):  # noqa: F811
    dom = lab.create("vtpm-r")
    before = _populate(lab, dom)                          # auto-created: not marked OPEN
    lab.destroy(dom)
    manager("sim_release_delay=3\n")
    loaded = lab.create("vtpm-r", dom.uuid, startup="save")
    assert loaded.status.kind == "loaded"                 # a verified load marks it OPEN
    lab.destroy(loaded)                                   # the backend is gone, OPEN not yet cleared
    offset = log_path(lab.cfg.log_dir, "vtpmmgr").stat().st_size
    again = lab.create("vtpm-r", dom.uuid)
    assert again.status.fresh and again.status.manager_rc is not None
    assert "Attempted to open vTPM twice!" in _manager_tail(lab, offset)
    with lab.tpm(again) as tpm:
        assert tpm.ek_name() != before["ek"]
    lab.destroy(again)
