"""The checkpoint extension in C (vtpmmgr/src, run by the simulated manager under ASan and UBSan):
checkpoint entries are never vTPMs, concurrent requests, requests while a vTPM saves, request
validation, and the unprovisioned manager.  After every test the manager's console must hold no
sanitizer report."""
from __future__ import annotations

import threading
import time
import uuid as uuidlib

import pytest
from sim_fixture import sim_host_module  # noqa: F401
from test_vtpm_stubdom import VtpmLab, _populate, lab  # noqa: F401  (module scope: a host of its own)

from xen_vtpm.errors import ManagerError
from xen_vtpm.vtpm import manager
from xen_vtpm.xen.consoles import log_path
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm_sim.mgrdisk import FLAG_CHECKPOINT, MgrDisk, PtpmSealer

SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")


@pytest.fixture(autouse=True)
def sanitizer_clean(lab):  # noqa: F811
    yield
    log = lab.manager_log()
    assert not [m for m in SANITIZER_MARKS if m in log], log[-3000:]


def _table(lab: VtpmLab) -> dict[bytes, tuple[int, bytes]]:
    disk = MgrDisk(lab.sim.dir / "images" / "vtpmmgr.img",
                   PtpmSealer((lab.sim.dir / "run" / "ptpm.tcti").read_text().strip()))
    table = disk.load()
    assert table is not None
    return {uid: (e.flags, e.data) for uid, e in table.items()}


def _uuid(text: str) -> bytes:
    return uuidlib.UUID(text).bytes


def test_a_checkpoint_entry_is_never_a_vtpm(lab):
    dom = lab.create("vtpm-c1")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)
    ckpt = str(uuidlib.uuid4())
    digest = lab.mgr.checkpoint(dom.uuid, ckpt)
    before = _table(lab)
    assert before[_uuid(ckpt)] == (FLAG_CHECKPOINT, before[_uuid(dom.uuid)][1])
    assert before[_uuid(ckpt)][1][:20].hex() == digest
    lab.sim.xl("unpause", dom.name)

    # A stub domain presenting the checkpoint's UUID: LOADHASHKEY refused, so it comes up fresh...
    imposter = lab.create("vtpm-c1-imposter", ckpt)
    assert imposter.status.fresh and imposter.status.manager_rc == 3   # TPM_BAD_PARAMETER: no vTPM entry
    offset = log_path(lab.cfg.log_dir, imposter.name).stat().st_size
    with lab.tpm(imposter) as tpm:
        tpm.pcr16()                                       # ...and its first save is refused too
    deadline = time.monotonic() + 10
    log = log_path(lab.cfg.log_dir, imposter.name)
    while "VTPM_SaveHashKey() failed with error code (3)" not in log.read_text()[offset:]:
        assert time.monotonic() < deadline, "the imposter's SAVEHASHKEY was not refused"
        time.sleep(0.05)
    assert "vTPM UUID names a checkpoint entry" in lab.manager_log()
    after = _table(lab)
    assert after[_uuid(ckpt)] == before[_uuid(ckpt)]       # neither overwritten nor shadowed
    lab.destroy(imposter)
    lab.mgr.discard(ckpt, dom.uuid)
    assert _uuid(ckpt) not in _table(lab)
    lab.destroy(dom)


def test_concurrent_requests(lab):
    dom = lab.create("vtpm-c2")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)                         # one H for every checkpoint
    ckpts = [str(uuidlib.uuid4()) for _ in range(6)]
    start = threading.Barrier(len(ckpts))
    hashes: dict[str, str] = {}
    errors: list[BaseException] = []

    def one(ckpt: str) -> None:
        try:
            with XenStore(lab.cfg.xenstore_path) as xs:
                client = manager.ManagerClient(lab.cfg, xs)
                start.wait()
                hashes[ckpt] = client.checkpoint(dom.uuid, ckpt)
        except BaseException as exc:              # reported below
            errors.append(exc)
    try:
        threads = [threading.Thread(target=one, args=(c,)) for c in ckpts]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors
        table = _table(lab)
        h = table[_uuid(dom.uuid)][1][:20].hex()
        assert set(hashes.values()) == {h}
        assert all(table[_uuid(c)] == (FLAG_CHECKPOINT, table[_uuid(dom.uuid)][1]) for c in ckpts)
        for c in ckpts:
            assert lab.mgr.discard(c, dom.uuid) == h
        assert not any(_uuid(c) in _table(lab) for c in ckpts)
    finally:
        lab.sim.xl("unpause", dom.name)
    lab.destroy(dom)


def test_requests_while_the_vtpm_saves(lab):
    """SAVEHASHKEY after every guest command races checkpoint requests: each answer is one whole entry."""
    dom = lab.create("vtpm-c3")
    _populate(lab, dom)
    stop = threading.Event()
    done: list[int] = []

    def guest() -> None:
        with lab.tpm(dom) as tpm:
            n = 0
            while not stop.is_set():
                tpm.extend16(n.to_bytes(4, "big"))
                n += 1
            done.append(n)
    worker = threading.Thread(target=guest)
    worker.start()
    ckpts: dict[str, str] = {}
    try:
        for _ in range(5):
            ckpt = str(uuidlib.uuid4())
            ckpts[ckpt] = lab.mgr.checkpoint(dom.uuid, ckpt)
            time.sleep(0.05)
    finally:
        stop.set()
        worker.join(60)
    assert done and done[0] > 5
    table = _table(lab)
    for ckpt, digest in ckpts.items():
        flags, data = table[_uuid(ckpt)]
        assert flags == FLAG_CHECKPOINT and data[:20].hex() == digest
    assert len(set(ckpts.values())) > 1                  # the entry moved on between checkpoints
    for ckpt in ckpts:
        lab.mgr.discard(ckpt, dom.uuid)
    lab.destroy(dom)


def _write_request(lab: VtpmLab, rid: str, fields: dict[str, str], owner: int = 0) -> tuple[str, str]:
    mgr = lab.mgr.info()
    base = f"/local/domain/{mgr.domid}/control/vtpmmgr/request/{rid}"
    rsp = f"/local/domain/{mgr.domid}/data/vtpmmgr/response/{rid}"

    def tx(t):
        t.mkdir(base)
        t.set_perms(base, [f"n{owner}", f"r{mgr.domid}"])
        for k, v in fields.items():
            t.write(f"{base}/{k}", v)
    lab.xs.transact(tx)
    return base, rsp


def _answer(lab: VtpmLab, rsp: str, timeout: float) -> dict[str, str | None] | None:
    if not lab.xs.wait_for(lambda: lab.xs.read_or(f"{rsp}/status") is not None, [rsp], timeout):
        return None
    return {k: lab.xs.read_or(f"{rsp}/{k}") for k in ("status", "error", "hash")}


def test_request_validation(lab):
    mgr = lab.mgr.info()
    ckpt = str(uuidlib.uuid4())
    # Not owned by dom0 (a toolstack bug or another privileged domain): refused with an answer.
    base, rsp = _write_request(lab, uuidlib.uuid4().hex, {"op": "discard", "checkpoint": ckpt,
                                                          "state": "submitted"}, owner=mgr.domid)
    answer = _answer(lab, rsp, 20)
    assert answer and answer["status"] == "error" and "is not owned by dom0 (perms n" in answer["error"]
    lab.xs.rm(base)
    lab.xs.rm(rsp)
    # Incomplete: no answer until state=submitted appears, then exactly one.
    base, rsp = _write_request(lab, uuidlib.uuid4().hex, {"op": "discard", "checkpoint": ckpt})
    assert _answer(lab, rsp, 1.0) is None
    lab.xs.write(f"{base}/state", "submitted")
    answer = _answer(lab, rsp, 20)
    assert answer == {"status": "error", "error": f"unknown checkpoint {ckpt}", "hash": None}
    lab.xs.rm(base)
    lab.xs.rm(rsp)
    # A directory name outside [A-Za-z0-9_.-]{1,64} is not a request.
    for rid in ("bad@id", "x" * 65):
        base, rsp = _write_request(lab, rid, {"op": "discard", "checkpoint": ckpt, "state": "submitted"})
        assert _answer(lab, rsp, 1.0) is None
        lab.xs.rm(base)
    # A value with control bytes and quotes: shown escaped, on one line, cut at 40 characters.
    base, rsp = _write_request(lab, uuidlib.uuid4().hex, {"op": "restore", "uuid": "x\ty'" + "z" * 60,
                                                          "checkpoint": ckpt, "state": "submitted"})
    answer = _answer(lab, rsp, 20)
    assert answer and answer["error"] == ("field 'uuid' is not a canonical lower-case UUID: "
                                          "'x\\x09y\\x27" + "z" * 36 + "'...")   # 40 characters shown
    lab.xs.rm(base)
    lab.xs.rm(rsp)
    base, rsp = _write_request(lab, uuidlib.uuid4().hex, {"op": "discard", "state": "submitted"})
    answer = _answer(lab, rsp, 20)
    assert answer == {"status": "error", "error": "missing field 'checkpoint'", "hash": None}
    lab.xs.rm(base)
    lab.xs.rm(rsp)


def test_an_unprovisioned_manager_refuses_instead_of_keeping_checkpoints_in_ram(lab):
    """Xen's vtpm_sync_disk writes nothing while group 0 has no seal; the extension says so."""
    images = lab.sim.dir / "images"
    original = images / "vtpmmgr.cfg"
    blank = images / "vtpmmgr-unprovisioned.img"
    with open(blank, "wb") as fh:
        fh.truncate(2 << 20)
    cfg = images / "vtpmmgr-unprovisioned.cfg"
    cfg.write_text(original.read_text().replace(str(images / "vtpmmgr.img"), str(blank)) + "sim_unprovisioned=1\n")

    def restart(path) -> str:
        offset = log_path(lab.cfg.log_dir, "vtpmmgr").stat().st_size
        old = lab.mgr.info().domid
        lab.sim.xl("destroy", "vtpmmgr")
        assert lab.xs.wait_for(lambda: not lab.xs.is_introduced(old), ["@releaseDomain"], 20)
        lab.sim.xl("create", str(path))
        return lab.wait_manager_ready(offset)
    boot = restart(cfg)
    try:
        assert "Assuming first time initialization" in boot and "group 0 stays unprovisioned" in boot
        dom = lab.create("vtpm-c5")
        _populate(lab, dom)                                 # SAVEHASHKEY "succeeds"...
        assert blank.read_bytes() == bytes(2 << 20)         # ...and writes nothing, as on Xen
        with pytest.raises(ManagerError, match="manager not provisioned"):
            lab.mgr.checkpoint(dom.uuid, str(uuidlib.uuid4()))
        assert blank.read_bytes() == bytes(2 << 20)
        lab.destroy(dom)
    finally:
        restart(original)
