"""The transfer ops of the C extension (vtpmmgr/src/vtpm_transfer.c and friends), between the managers of
two simulated hosts, each on its own physical TPM (swtpm), under ASan and UBSan.

An exported entry is parked: no vTPM stub domain may load or save it, not even one whose connection
bound it before.  Its envelope opens only in the manager it was made for, and only for the vTPM,
transfer and kind it was made for; one altered byte is refused.  Removal takes only parked or
provisional entries of stopped vTPMs.  Without transfer=1 the manager serves none of it.
"""
from __future__ import annotations

import time
import uuid as uuidlib

import pytest
from sim_fixture import start_sim_host, stop_sim_host
from test_vtpm_stubdom import VtpmLab, _populate
from test_vtpmmgr_c_ext import SANITIZER_MARKS, _answer, _write_request

from xen_vtpm.errors import ManagerError, NoCheckpointFeature
from xen_vtpm.xen.consoles import log_path
from xen_vtpm_sim.mgrdisk import FLAG_CHECKPOINT, MgrDisk, PtpmSealer

EXPORTED, IMPORTED, REMOVED = 0x4, 0x8, 0x10
PARKED = FLAG_CHECKPOINT | EXPORTED


@pytest.fixture(scope="module")
def labs(tmp_path_factory):
    base = tmp_path_factory.mktemp("xfer")
    sims = [start_sim_host(base / name) for name in ("a", "b")]
    pair = [VtpmLab(sim) for sim in sims]
    try:
        yield pair
    finally:
        for lab in pair:
            lab.close()
        for sim in sims:
            stop_sim_host(sim)


@pytest.fixture(autouse=True)
def sanitizer_clean(labs):
    yield
    for lab in labs:
        log = lab.manager_log()
        assert not [m for m in SANITIZER_MARKS if m in log], log[-3000:]


def _table(lab: VtpmLab) -> dict[str, tuple[int, bytes]]:
    d = lab.sim.dir
    table = MgrDisk(d / "images" / "vtpmmgr.img", PtpmSealer((d / "run" / "ptpm.tcti").read_text().strip())).load()
    return {} if table is None else {str(uuidlib.UUID(bytes=k)): (e.flags, e.data)
                                     for k, e in table.items()}


def _key(lab: VtpmLab) -> bytes:
    key = lab.mgr.info().transfer_key
    assert key is not None and len(key) == 64
    return key


def _wait_log(path, offset: int, text: str) -> None:
    deadline = time.monotonic() + 10
    while text not in path.read_text(errors="replace")[offset:]:
        assert time.monotonic() < deadline, f"{text!r} never appeared in {path.name}"
        time.sleep(0.05)


def test_an_envelope_opens_only_where_and_for_what_it_was_made(labs):
    a, b = labs
    dom = a.create("vtpm-x1")
    _populate(a, dom)
    a.sim.xl("pause", dom.name)
    transfer = str(uuidlib.uuid4())
    digest, envelope = a.mgr.export(dom.uuid, transfer, _key(b))
    flags, data = _table(a)[dom.uuid]
    assert flags & PARKED == PARKED and data[:20].hex() == digest
    assert _key(a) != _key(b)                    # each manager's transfer key lives in its own TPM

    refusals = {
        "another manager": (a, dom.uuid, transfer, envelope),
        "another transfer": (b, dom.uuid, str(uuidlib.uuid4()), envelope),
        "another vTPM": (b, str(uuidlib.uuid4()), transfer, envelope),
        "one byte altered": (b, dom.uuid, transfer, envelope[:100] + bytes([envelope[100] ^ 1]) + envelope[101:]),
    }
    tables = _table(a), _table(b)
    for why, (lab, uuid, tid, env) in refusals.items():
        with pytest.raises(ManagerError, match="does not open with this manager's transfer key"):
            lab.mgr.import_entry(uuid, tid, env)
        assert (_table(a), _table(b)) == tables, why

    assert b.mgr.import_entry(dom.uuid, transfer, envelope) == digest
    assert _table(b)[dom.uuid] == (IMPORTED, data)
    with pytest.raises(ManagerError, match="does not open"):      # a checkpoint entry is another kind
        b.mgr.import_entry(dom.uuid, transfer, envelope, checkpoint=str(uuidlib.uuid4()))
    assert b.mgr.import_entry(dom.uuid, transfer, envelope) == digest       # idempotent for recover
    assert b.mgr.adopt(dom.uuid) == digest
    assert _table(b)[dom.uuid] == (0, data)
    with pytest.raises(ManagerError, match=f"vTPM {dom.uuid} already exists"):
        b.mgr.import_entry(dom.uuid, transfer, envelope)                  # not over a live vTPM
    a.sim.xl("unpause", dom.name)
    a.mgr.unexport(dom.uuid)
    a.destroy(dom)


def test_a_parked_entry_serves_no_vtpm(labs):
    a, b = labs
    dom = a.create("vtpm-x2")
    before = _populate(a, dom)
    _, data = _table(a)[dom.uuid]
    a.mgr.export(dom.uuid, str(uuidlib.uuid4()), _key(b))

    # The running stub domain bound the entry before: its saves are refused now.
    stub_log = log_path(a.cfg.log_dir, dom.name)
    offset = stub_log.stat().st_size
    with a.tpm(dom) as tpm:
        tpm.extend16(b"after the export")
    _wait_log(stub_log, offset, "VTPM_SaveHashKey() failed with error code (3)")
    assert "names an exported entry: refused" in a.manager_log()
    assert _table(a)[dom.uuid][1] == data
    a.destroy(dom)
    # A new one presenting the UUID cannot load it, and comes up fresh without overwriting it.
    again = a.create("vtpm-x2", dom.uuid, dom.image)
    assert again.status.fresh and "the manager refused its key" in again.status.reason, again.status
    with a.tpm(again) as tpm:
        tpm.pcr16()
    assert _table(a)[dom.uuid][1] == data
    a.destroy(again)
    # Un-parked, the vTPM loads its state again, exactly as it was.
    a.mgr.unexport(dom.uuid)
    back = a.create("vtpm-x2", dom.uuid, dom.image, startup="save")   # save: the PCRs come back too
    assert back.status.loaded
    with a.tpm(back) as tpm:
        assert tpm.snapshot() == before
    a.destroy(back)


def test_remove_takes_only_a_stopped_parked_or_provisional_entry(labs):
    a, b = labs
    dom = a.create("vtpm-x3")
    _populate(a, dom)
    with pytest.raises(ManagerError, match="neither exported nor imported; refusing to remove it"):
        a.mgr.remove(dom.uuid)
    transfer = str(uuidlib.uuid4())
    _, envelope = a.mgr.export(dom.uuid, transfer, _key(b))
    with pytest.raises(ManagerError, match=f"vTPM {dom.uuid} is open"):
        a.mgr.remove(dom.uuid)
    a.destroy(dom)
    a.mgr.remove(dom.uuid)
    gone = _table(a).get(dom.uuid)
    assert gone is None or (gone[0] & REMOVED and gone[1] == bytes(64)), gone      # deleted, or scrubbed
    assert a.mgr.remove(dom.uuid) == ""                                           # idempotent
    with pytest.raises(ManagerError, match=f"unknown vTPM uuid {dom.uuid}"):
        a.mgr.unexport(dom.uuid)                                                  # a removed entry is gone
    # The receiving side's undo: a provisional import goes the same way.
    b.mgr.import_entry(dom.uuid, transfer, envelope)
    b.mgr.remove(dom.uuid)
    assert dom.uuid not in {u for u, (f, _) in _table(b).items() if not f & REMOVED}


def test_checkpoint_entries_travel_as_checkpoints(labs):
    a, b = labs
    dom = a.create("vtpm-x4")
    _populate(a, dom)
    a.sim.xl("pause", dom.name)
    ckpt = str(uuidlib.uuid4())
    a.mgr.checkpoint(dom.uuid, ckpt)
    transfer = str(uuidlib.uuid4())
    _, vtpm_env = a.mgr.export(dom.uuid, transfer, _key(b))
    with pytest.raises(ManagerError, match=f"unknown checkpoint {dom.uuid}"):
        a.mgr.export(dom.uuid, transfer, _key(b), checkpoint=dom.uuid)     # a vTPM is not a checkpoint
    _, ckpt_env = a.mgr.export(dom.uuid, transfer, _key(b), checkpoint=ckpt)
    with pytest.raises(ManagerError, match=f"unknown vTPM uuid {dom.uuid}"):
        b.mgr.import_entry(dom.uuid, transfer, ckpt_env, checkpoint=ckpt)  # its vTPM first
    b.mgr.import_entry(dom.uuid, transfer, vtpm_env)
    b.mgr.import_entry(dom.uuid, transfer, ckpt_env, checkpoint=ckpt)
    assert _table(b)[ckpt] == (FLAG_CHECKPOINT, _table(a)[ckpt][1])
    with pytest.raises(ManagerError, match=f"unknown checkpoint {dom.uuid}"):
        a.mgr.submit("discard", dom.uuid)             # a parked vTPM entry is no checkpoint to discard
    assert _table(a)[dom.uuid][0] & PARKED == PARKED
    b.mgr.discard(ckpt, dom.uuid)
    b.mgr.remove(dom.uuid)
    a.sim.xl("unpause", dom.name)
    a.mgr.unexport(dom.uuid)
    a.mgr.discard(ckpt, dom.uuid)
    a.destroy(dom)


def test_transfer_request_validation(labs):
    a, _ = labs
    vtpm, tid = str(uuidlib.uuid4()), str(uuidlib.uuid4())
    cases = [
        ({"op": "export", "uuid": vtpm, "transfer": tid}, "missing field 'recipient'"),
        ({"op": "export", "uuid": vtpm, "transfer": tid, "recipient": "ab"}, "field 'recipient' is not 128"),
        ({"op": "export", "uuid": vtpm, "transfer": tid, "recipient": "AB" * 64}, "field 'recipient' is not 128"),
        ({"op": "import", "uuid": vtpm, "transfer": tid, "envelope": "00" * 161, "recipient": "00" * 64},
         "field 'recipient' does not belong to op 'import'"),
        ({"op": "import", "uuid": vtpm, "envelope": "00" * 161}, "missing field 'transfer'"),
        ({"op": "remove", "uuid": vtpm, "transfer": tid}, "field 'transfer' does not belong to op 'remove'"),
        ({"op": "adopt", "uuid": "not-a-uuid"}, "field 'uuid' is not a canonical lower-case UUID"),
        ({"op": "import", "uuid": vtpm, "transfer": tid, "envelope": "00" * 161},
         "not a version 1 transfer envelope"),
        ({"op": "import", "uuid": vtpm, "transfer": tid, "envelope": "01" + "00" * 160},
         "ECDH_ZGen: the point is not on the curve (TPM_RC_ECC_POINT): altered"),
    ]
    for fields, error in cases:
        base, rsp = _write_request(a, uuidlib.uuid4().hex, {**fields, "state": "submitted"})
        answer = _answer(a, rsp, 20)
        assert answer and answer["status"] == "error" and error in answer["error"], (fields, answer)
        a.xs.rm(base)
        a.xs.rm(rsp)


def test_without_transfer_1_the_manager_serves_no_transfer(labs):
    a, b = labs
    images = a.sim.dir / "images"
    original = images / "vtpmmgr.cfg"
    plain = images / "vtpmmgr-no-transfer.cfg"
    plain.write_text(original.read_text().replace(" transfer=1", ""))

    def restart(path) -> None:
        offset = log_path(a.cfg.log_dir, "vtpmmgr").stat().st_size
        old = a.mgr.info().domid
        a.sim.xl("destroy", "vtpmmgr")
        assert a.xs.wait_for(lambda: not a.xs.is_introduced(old), ["@releaseDomain"], 20)
        a.sim.xl("create", str(path))
        a.wait_manager_ready(offset)
    restart(plain)
    try:
        assert a.mgr.info().transfer_key is None
        with pytest.raises(NoCheckpointFeature, match="cannot move vTPMs"):
            a.mgr.export(str(uuidlib.uuid4()), str(uuidlib.uuid4()), _key(b))
        # The request itself, bypassing the client's check, is refused by the manager.
        base, rsp = _write_request(a, uuidlib.uuid4().hex, {"op": "remove", "uuid": str(uuidlib.uuid4()),
                                                            "state": "submitted"})
        answer = _answer(a, rsp, 20)
        assert answer and answer["error"] == "transfer not enabled: start the manager with transfer=1"
        a.xs.rm(base)
        a.xs.rm(rsp)
    finally:
        restart(original)
    assert a.mgr.info().transfer_key is not None
