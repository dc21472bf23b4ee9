"""The simulated vtpmmgr: wire format (fuzzed), checkpoint extension, bad input, sealed disk."""
from __future__ import annotations

import subprocess
import uuid as uuidlib

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sim_fixture import sim_host_module  # noqa: F401
from test_vtpm_stubdom import VtpmLab, _populate, lab  # noqa: F401  (module scope: a host of its own)
from xen_vtpm.errors import ManagerError, XenStorePermission
from xen_vtpm_sim import mgrproto as mp
from xen_vtpm_sim.mgrdisk import MgrDisk, PtpmSealer
from xen_vtpm.xen.consoles import log_path
from xen_vtpm.xen.xenstore import XenStore

# --- the wire format ---------------------------------------------------------------------------


def test_packets_are_the_stock_framing():
    req = mp.save_hashkey_request(b"h" * 20 + b"k" * 32)
    assert req[:10] == bytes.fromhex("01c1" "0000003e" "00000001") and len(req) == 62
    assert mp.load_hashkey_request() == bytes.fromhex("01c1" "0000000a" "00000002")
    assert mp.decode(mp.response(0, b"x")) == mp.Packet(mp.VTPM_TAG_RSP, 0, b"x")
    entry = mp.pad_entry(b"a" * 52)
    assert len(entry) == 64 and mp.stored_reply(entry) == b"a" * 52
    assert mp.stored_reply(mp.pad_entry(b"b" * 64)) == b"b" * 64
    for bad in (b"a" * 51, b"a" * 65):
        with pytest.raises(mp.ProtocolError):
            mp.pad_entry(bad)
    with pytest.raises(mp.ProtocolError):
        mp.encode(mp.VTPM_TAG_REQ, 1, bytes(mp.MAX_PACKET))


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=64))
def test_decode_fuzz(data):
    try:
        pkt = mp.decode(data)
    except mp.ProtocolError:
        return
    assert mp.encode(pkt.tag, pkt.code, pkt.body) == data


_field = st.one_of(st.none(), st.text(max_size=40), st.sampled_from(
    ["submitted", "checkpoint", "restore", "discard", str(uuidlib.UUID(int=7)), str(uuidlib.UUID(int=7)).upper()]))


@settings(max_examples=400, deadline=None)
@given(st.fixed_dictionaries({k: _field for k in ("state", "op", "uuid", "checkpoint")}))
def test_request_parsing_fuzz(fields):
    try:
        req = mp.parse_request(fields)
    except mp.RequestError as exc:
        assert str(exc) and "\n" not in str(exc)
        return
    assert req.op in mp.OPS and len(req.checkpoint) == 16
    assert fields["state"] == "submitted"
    assert req.uuid is None if fields["uuid"] is None else mp.format_uuid(req.uuid) == fields["uuid"]


# --- on a simulated host -------------------------------------------------------------------------



def _mgr_image(lab: VtpmLab) -> bytes:
    return (lab.sim.dir / "images" / "vtpmmgr.img").read_bytes()


def _raw_request(lab: VtpmLab, fields: dict[str, str]) -> dict[str, str | None]:
    """Write a request by hand (as a buggy dom0 tool would) and return the response nodes."""
    mgr = lab.mgr.info()
    rid = uuidlib.uuid4().hex
    base = f"/local/domain/{mgr.domid}/control/vtpmmgr/request/{rid}"
    rsp = f"/local/domain/{mgr.domid}/data/vtpmmgr/response/{rid}"

    def tx(t):
        t.mkdir(base)
        t.set_perms(base, ["n0", f"r{mgr.domid}"])
        for k, v in fields.items():
            t.write(f"{base}/{k}", v)
    lab.xs.transact(tx)
    assert lab.xs.wait_for(lambda: lab.xs.read_or(f"{rsp}/status") is not None, [rsp], 20)
    out = {k: lab.xs.read_or(f"{rsp}/{k}") for k in ("status", "error", "hash")}
    lab.xs.rm(base)
    lab.xs.rm(rsp)
    return out


def test_bad_requests_get_an_error_and_change_nothing(lab):
    dom = lab.create("vtpm-m1")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)                          # no SAVEHASHKEY while we look at the disk
    try:
        ckpt = str(uuidlib.uuid4())
        lab.mgr.checkpoint(dom.uuid, ckpt)
        image = _mgr_image(lab)
        unknown = str(uuidlib.uuid4())
        cases = [
            (lambda: lab.mgr.checkpoint(unknown, str(uuidlib.uuid4())), "unknown vTPM uuid"),
            (lambda: lab.mgr.restore(dom.uuid, unknown), "unknown checkpoint"),
            (lambda: lab.mgr.submit("discard", unknown), "unknown checkpoint"),   # raw: discard() is idempotent
            (lambda: lab.mgr.restore(dom.uuid, ckpt), "is open"),
            (lambda: lab.mgr.checkpoint(dom.uuid, ckpt), "already exists"),
            (lambda: lab.mgr.restore(ckpt, ckpt), "unknown vTPM uuid"),     # a checkpoint is not a vTPM
        ]
        for call, message in cases:
            with pytest.raises(ManagerError, match=message):
                call()
            assert _mgr_image(lab) == image
        raw = [({"op": "checkpoint", "checkpoint": str(uuidlib.uuid4()), "state": "submitted"}, "missing field 'uuid'"),
               ({"uuid": dom.uuid, "checkpoint": str(uuidlib.uuid4()), "state": "submitted"}, "missing field 'op'"),
               ({"op": "explode", "uuid": dom.uuid, "checkpoint": ckpt, "state": "submitted"}, "unknown op"),
               ({"op": "checkpoint", "uuid": dom.uuid.upper(), "checkpoint": str(uuidlib.uuid4()),
                 "state": "submitted"}, "canonical")]
        for fields, message in raw:
            answer = _raw_request(lab, fields)
            assert answer["status"] == "error" and message in answer["error"] and answer["hash"] is None
            assert _mgr_image(lab) == image
        lab.mgr.discard(ckpt, dom.uuid)                     # the good checkpoint was there all along
        assert _mgr_image(lab) != image
    finally:
        lab.sim.xl("unpause", dom.name)
    lab.destroy(dom)


def test_corrupted_manager_disk_is_refused(lab):
    dom = lab.create("vtpm-m2")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)
    path = lab.sim.dir / "images" / "vtpmmgr.img"
    good = path.read_bytes()
    try:
        bad = bytearray(good)
        for slot in (0, 1):                                 # both encrypted root sectors (Xen's format)
            bad[MgrDisk.root_sector_offset(slot) + 300] ^= 0xFF
        path.write_bytes(bytes(bad))
        ckpt = str(uuidlib.uuid4())
        with pytest.raises(ManagerError, match="manager disk corrupted"):
            lab.mgr.checkpoint(dom.uuid, ckpt)
        assert path.read_bytes() == bytes(bad)
        path.write_bytes(good)
        with pytest.raises(ManagerError, match="unknown checkpoint"):
            lab.mgr.submit("discard", ckpt)                 # the refused checkpoint never existed
    finally:
        path.write_bytes(good)
        lab.sim.xl("unpause", dom.name)
    lab.destroy(dom)


def test_only_dom0_can_submit(lab):
    dom = lab.create("vtpm-m3")
    mgr = lab.mgr.info()
    with pytest.raises(ManagerError):              # any request leaves the request dir in place
        lab.mgr.submit("discard", str(uuidlib.uuid4()))
    domid = lab.sim.domid(dom.name)
    target = f"/local/domain/{mgr.domid}/control/vtpmmgr/request/evil"
    for as_domain in (domid, mgr.domid):
        with XenStore(f"{lab.cfg.xenstore_path}.d{as_domain}") as xs:
            with pytest.raises(XenStorePermission):
                xs.write(f"{target}/op", "restore")
    env = {"XENSTORED_PATH": f"{lab.cfg.xenstore_path}.d{domid}", "PATH": "/usr/bin:/bin"}
    out = subprocess.run(["xenstore-write", f"{target}/state", "submitted"], env=env, capture_output=True,
                         text=True, timeout=30)
    assert out.returncode != 0
    assert not lab.xs.exists(target)
    lab.destroy(dom)


def _restart_manager(lab: VtpmLab, while_down=lambda: None) -> str:
    log = log_path(lab.cfg.log_dir, "vtpmmgr")
    offset = log.stat().st_size
    old = lab.mgr.info().domid
    lab.sim.xl("destroy", "vtpmmgr")
    assert lab.xs.wait_for(lambda: not lab.xs.is_introduced(old), ["@releaseDomain"], 20)
    while_down()
    lab.sim.xl("create", str(lab.sim.dir / "images" / "vtpmmgr.cfg"))
    return lab.wait_manager_ready(offset)


def test_torn_manager_write_falls_back_to_the_previous_pair(lab):
    dom = lab.create("vtpm-m5")
    _populate(lab, dom)                                   # counter = 2
    with lab.tpm(dom) as tpm:
        tpm.counter_increment()                           # the last command: counter = 3
    lab.destroy(dom)
    path = lab.sim.dir / "images" / "vtpmmgr.img"

    def tear_newest_slot() -> None:
        disk = MgrDisk(path, PtpmSealer((lab.sim.dir / "run" / "ptpm.tcti").read_text().strip()))
        assert disk.load() is not None
        raw = bytearray(path.read_bytes())
        raw[MgrDisk.root_sector_offset(disk.active) + 200] ^= 0x01   # as if the last write never completed
        path.write_bytes(bytes(raw))
    boot = _restart_manager(lab, tear_newest_slot)
    assert "loaded" in boot and "Failed to read manager file" not in boot
    again = lab.create("vtpm-m5", dom.uuid)
    assert again.status.loaded                            # the vTPM's other slot matches the older H
    with lab.tpm(again) as tpm:
        assert tpm.counter() == 2
    lab.destroy(again)


def test_table_survives_manager_restart_but_not_a_pcr_change(lab):
    dom = lab.create("vtpm-m4")
    before = _populate(lab, dom)
    lab.destroy(dom)
    boot = _restart_manager(lab)
    assert "Failed to read manager file" not in boot and "loaded" in boot
    again = lab.create("vtpm-m4", dom.uuid, startup="save")
    assert again.status.loaded
    with lab.tpm(again) as tpm:
        assert tpm.snapshot() == before
    lab.destroy(again)
    tcti = (lab.sim.dir / "run" / "ptpm.tcti").read_text().strip()
    subprocess.run(["tpm2_pcrextend", "-T", tcti, "0:sha256=" + "ab" * 32], check=True, capture_output=True,
                   timeout=30)                            # "a BIOS update" on the manager's physical TPM
    boot = _restart_manager(lab)
    assert "Failed to read manager file. Assuming first time initialization." in boot
    fresh = lab.create("vtpm-m4", dom.uuid)
    assert fresh.status.fresh and fresh.status.manager_rc == 3
    lab.destroy(fresh)
