"""xen_vtpm.vtpm.stubdom: the tool's side of the manager and the vTPM stub domains."""
from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib

import pytest

from sim_fixture import start_sim_host, stop_sim_host
from test_vtpm_stubdom import VtpmLab, _populate
from xen_vtpm.config import Config
from xen_vtpm.errors import (DomainNotFound, ManagerError, NoCheckpointFeature, UsageError,
                             XenStoreTimeout)
from xen_vtpm.vtpm import console, manager, stubdom, vtpmblk


def test_console_markers(tmp_path):
    cfg = Config(log_dir=tmp_path)
    log = tmp_path / "guest-vtpm-x.log"
    assert console.console_status(cfg, "vtpm-x") == console.ConsoleStatus("none")
    log.write_text("vtpm_cmd.c:164: Error: VTPM_LoadHashKey() failed with error code (3)\n"
                   "vtpmblk.c:300: Error: VTPM_LoadHashKey failed\n")
    status = console.console_status(cfg, "vtpm-x")
    assert status.kind == "loadhashkey-failed" and status.fresh
    offset = console.log_offset(cfg, "vtpm-x")
    assert console.console_status(cfg, "vtpm-x", offset).kind == "none"     # only the next boot counts
    with open(log, "a") as fh:
        fh.write("vtpmblk.c:331: Info: Read 10329 bytes from NVM persistent storage (slot 1)\n")
    assert console.console_status(cfg, "vtpm-x", offset) == console.ConsoleStatus("loaded", 1, 10329)
    with open(log, "a") as fh:
        fh.write("vtpmblk.c:320: Error: NVM Storage Checksum failed!\n")
    assert console.console_status(cfg, "vtpm-x", offset).kind == "checksum-failed"
    with pytest.raises(XenStoreTimeout, match="no vTPM load marker"):
        console.wait_console_status(cfg, "vtpm-y", 0, 0.1)


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    sim = start_sim_host(tmp_path_factory.mktemp("tool") / "h")
    lab = VtpmLab(sim)
    try:
        yield lab
    finally:
        lab.close()
        stop_sim_host(sim)


def test_manager_discovery_and_argument_checks(lab):
    info = lab.mgr.info()
    assert info.name == "vtpmmgr" and info.checkpoint and lab.mgr.supports_checkpoints()
    other = manager.ManagerClient(dataclasses.replace(lab.cfg, manager="nope"), lab.xs)
    with pytest.raises(DomainNotFound, match="nope"):
        other.info()
    with pytest.raises(UsageError, match="not a UUID"):
        lab.mgr.checkpoint("not-a-uuid", str(uuidlib.uuid4()))
    with pytest.raises(UsageError, match="unknown op"):
        lab.mgr.submit("clone", str(uuidlib.uuid4()))


def test_paused_manager_times_out_and_the_request_is_withdrawn(lab):
    dom = lab.create("vtpm-t1")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)
    ckpt = str(uuidlib.uuid4())
    lab.sim.xl("pause", "vtpmmgr")
    try:
        with pytest.raises(XenStoreTimeout, match="withdrawn"):
            lab.mgr.checkpoint(dom.uuid, ckpt, timeout=1.0)
    finally:
        lab.sim.xl("unpause", "vtpmmgr")
    home = f"/local/domain/{lab.mgr.info().domid}"
    assert lab.xs.ls(f"{home}/control/vtpmmgr/request") == []
    with pytest.raises(ManagerError, match="unknown checkpoint"):
        lab.mgr.submit("discard", ckpt)             # the withdrawn request never ran (raw: discard() is idempotent)
    digest = lab.mgr.checkpoint(dom.uuid, ckpt)
    assert digest in vtpmblk.slot_fingerprints(dom.image)
    assert lab.mgr.discard(ckpt) == digest
    assert lab.xs.ls(f"{home}/data/vtpmmgr/response") == []   # answers are cleaned up
    lab.sim.xl("unpause", dom.name)


def test_wait_released_needs_the_manager_to_let_go(lab):
    dom = lab.create("vtpm-t2")
    domid, mgr = lab.sim.domid(dom.name), lab.mgr.info().domid
    with pytest.raises(XenStoreTimeout, match="not released"):
        stubdom.wait_released(lab.xs, domid, mgr, 0.3)
    lab.sim.xl("destroy", dom.name)
    stubdom.wait_released(lab.xs, domid, mgr, 20)
    assert not lab.xs.exists(f"/local/domain/{mgr}/backend/vtpm/{domid}")


def test_stock_manager_has_no_checkpoints_but_keeps_vtpms(tmp_path):
    sim = start_sim_host(tmp_path / "h", stock_manager=True)
    lab = VtpmLab(sim)
    try:
        assert not lab.mgr.supports_checkpoints()
        dom = lab.create("vtpm-s")
        with pytest.raises(NoCheckpointFeature, match="stock vtpmmgr"):
            lab.mgr.checkpoint(dom.uuid, str(uuidlib.uuid4()))
        before = _populate(lab, dom)
        lab.destroy(dom)
        again = lab.create("vtpm-s", dom.uuid)
        assert again.status.kind == "loaded"
        with lab.tpm(again) as tpm:
            assert tpm.snapshot() == before
    finally:
        lab.close()
        stop_sim_host(sim)


def test_console_status_words():
    loaded = console.ConsoleStatus("loaded", 0, 42)
    assert loaded.loaded and not loaded.fresh and loaded.reason.endswith("(slot 0)")
    failed = console.ConsoleStatus("checksum-failed")
    assert failed.fresh and not failed.loaded and failed.reason == "NVM Storage Checksum failed!"
    assert console.ConsoleStatus("none").reason == "no load marker on the console"


def test_discard_is_idempotent_but_other_refusals_still_raise(lab):
    dom = lab.create("vtpm-t9")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)
    ckpt = str(uuidlib.uuid4())
    lab.mgr.checkpoint(dom.uuid, ckpt)
    assert re.fullmatch(r"[0-9a-f]{40}", lab.mgr.discard(ckpt))
    assert lab.mgr.discard(ckpt) == ""              # already gone: done, so recover may repeat it
    with pytest.raises(ManagerError, match="unknown checkpoint"):
        lab.mgr.restore(dom.uuid, ckpt)             # the entry really is gone
