"""xen_vtpm.vtpm.stubdom: the tool's side of the manager and the vTPM stub domains."""
from __future__ import annotations

import dataclasses
import re
import uuid as uuidlib

import pytest
from sim_fixture import start_sim_host, stop_sim_host
from test_vtpm_stubdom import VtpmLab, _populate

from xen_vtpm.config import Config
from xen_vtpm.errors import (
    DomainNotFound,
    IntegrityError,
    ManagerError,
    NoCheckpointFeature,
    UsageError,
    XenStoreTimeout,
)
from xen_vtpm.model import VtpmRef
from xen_vtpm.vtpm import console, manager, stubdom, vtpmblk
from xen_vtpm.xen.consoles import LogTail
from xen_vtpm.xen.domains import domid_of
from xen_vtpm.xen.xl import Xl

# Boot transcripts in Xen 4.17's own words (docs/xen-internals.md §7.2), as xenconsoled logs them.
_BOOT = ("vtpm.c:463: Info: starting TPM Emulator (1.2.0.7-475)\n"
         "vtpm.c:395: Info: Startup mode is `clear'\n"
         "vtpmblk.c:35: Info: Initializing persistent NVM storage\n"
         "vtpm.c:210: Info: VTPM Initializing\n"
         "vtpm_cmd.c:155: Info: Requesting Encryption key from backend\n")
_READ0 = "vtpmblk.c:120: Info: Read 2896 bytes from NVM persistent storage (slot 0)\n"
_READ1 = "vtpmblk.c:120: Info: Read 2912 bytes from NVM persistent storage (slot 1)\n"
_FRESH = "tpm_data.c:122: Info: initializing TPM data to default values\n"
_INIT = "tpm_startup.c:29: Info: TPM_Init()\ntpm_startup.c:43: Info: TPM_Startup(1)\n"
_CHECKSUM = ("vtpmblk.c:322: Error: NVM Storage Checksum failed!\nExpected: 0A 0B \nSlot 0:   01 02 \n"
             "Slot 1:   03 04 \n")
_REFUSED = ("vtpm_cmd.c:164: Error: VTPM_LoadHashKey() failed with error code (9)\n"
            "vtpm_cmd.c:175: Error: VTPM_LoadHashKey failed\n")


@pytest.mark.parametrize("text, kind, detail", [
    (_BOOT + _READ0 + _INIT, "loaded", "slot 0"),
    (_BOOT + _READ0 + _READ1 + _INIT, "loaded", "slot 1"),
    # The false positive of the old marker: both slots read, then the checksum fails (vtpmblk.c:120 < 322).
    (_BOOT + _READ0 + _READ1 + _CHECKSUM + _FRESH + _INIT, "fresh", "neither disk slot"),
    # A failed decryption or unmarshal leaves a slot read as the last load line; only the fresh init tells.
    (_BOOT + _READ0 + "vtpmblk.c:225: Error: Decryption Error: Cipher block size was not a multiple of 16\n"
     + _FRESH + _INIT, "fresh", "does not decrypt"),
    (_BOOT + _READ1 + _FRESH + _INIT, "fresh", "brand-new TPM"),
    (_BOOT + _REFUSED + _FRESH + _INIT, "fresh", "manager answered 9"),
    (_BOOT + "vtpmblk.c:106: Error: read 0 data_length for NVM\n" + _FRESH + _INIT, "fresh", "length prefix"),
    (_BOOT + _READ0 + _FRESH + _INIT + "tpm_startup.c:87: Error: restoring permanent data failed\n", "fresh",
     "brand-new"),
    (_BOOT + _INIT, "fresh", "not proof"),             # TPM_Init() with no key request answered: not proof
    (_BOOT + _READ0, "pending", "not finished"),
    ("", "none", "no vTPM boot"),
    # Only the last boot counts: an earlier loaded boot proves nothing about a later fresh one, and back.
    (_BOOT + _READ0 + _INIT + _BOOT + _REFUSED + _FRESH + _INIT, "fresh", "refused"),
    (_BOOT + _REFUSED + _FRESH + _INIT + _BOOT + _READ0 + _INIT, "loaded", "slot 0"),
    # xenconsoled -t prefixes a time stamp: markers are searched within the line.
    ("".join(f"[2025-01-01 00:00:00] {line}\n" for line in (_BOOT + _READ0 + _INIT).splitlines()), "loaded",
     "slot 0"),
])
def test_boot_verdict_believes_only_a_load_accepted_in_this_boot(text, kind, detail):
    verdict = console.boot_verdict(text)
    assert verdict.kind == kind and detail in verdict.reason, verdict
    assert verdict.loaded == (kind == "loaded") and verdict.fresh == (kind == "fresh")


def test_watch_boot_prefers_a_complete_log_and_gives_up_on_a_dead_stub(tmp_path):
    log = tmp_path / "guest-vtpm-x.log"
    log.write_text(_BOOT + _READ0 + _INIT)                 # an earlier boot
    tail = LogTail(log)
    with open(log, "a") as fh:
        fh.write(_BOOT + _READ0 + _READ1 + _CHECKSUM + _FRESH + _INIT)
    assert console.watch_boot(None, tail, 1, lambda: True).fresh
    assert console.watch_boot(None, LogTail(tmp_path / "none.log"), 0.2, lambda: True).kind == "pending"
    died = console.watch_boot(None, LogTail(tmp_path / "none.log"), 10, lambda: False)
    assert died.fresh and "died" in died.reason


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
        again = lab.create("vtpm-s", dom.uuid, startup="save")
        assert again.status.loaded
        with lab.tpm(again) as tpm:
            assert tpm.snapshot() == before
    finally:
        lab.close()
        stop_sim_host(sim)


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


def test_start_verified_takes_slot_reads_followed_by_a_checksum_failure_as_fresh(lab):
    """The old marker's false positive: Xen logs `Read … bytes` for both slots before the checksum fails
    (docs/xen-internals.md §7.3).  The tool must see a fresh vTPM, destroy it before anything attaches, and
    leave the image and the manager entry as they were, so the intact pair still loads afterwards."""
    dom = lab.create("vtpm-t3")
    before = _populate(lab, dom)
    lab.destroy(dom)
    lab.destroy(lab.create("vtpm-t3", dom.uuid, startup="save"))   # its cfg now says save, as xen-vtpm requires
    intact = dom.image.read_bytes()
    damaged = bytearray(intact)
    half = len(damaged) // 2
    assert vtpmblk.slot_fingerprints(intact)[1], "both slots must hold a blob for this case"
    for offset in (4 + 100, half + 4 + 100):          # inside each slot's blob: both hashes change
        damaged[offset] ^= 0xFF
    dom.image.write_bytes(bytes(damaged))
    backend = stubdom.StubdomBackend(lab.cfg, lab.xs, Xl(lab.cfg))
    ref = VtpmRef(guest="none", devid=0, backend="vtpm-t3", uuid=dom.uuid)
    with pytest.raises(IntegrityError, match="neither disk slot matches"):
        backend.start_verified(ref)
    assert domid_of(lab.xs, "vtpm-t3") is None                        # destroyed before anything attached
    assert dom.image.read_bytes() == bytes(damaged)                   # the fresh vTPM wrote nothing
    boot = lab.console("vtpm-t3")
    boot = boot[boot.rindex(console.BOOT_START):]
    assert boot.index("Read ") < boot.index("NVM Storage Checksum failed!")
    dom.image.write_bytes(intact)
    backend.start_verified(ref)                                       # the manager entry was never touched
    with lab.tpm(dom) as tpm:
        assert tpm.snapshot() == before
    lab.destroy(dom)
