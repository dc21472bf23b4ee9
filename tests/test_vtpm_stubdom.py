"""vTPM stub domains on a simulated host: real swtpm inside, tpm2-pytss / tpm2-tools as the guest's TPM stack.

The helpers (VtpmLab, GuestTpm) are imported by the other vTPM test modules.
"""
from __future__ import annotations

import os
import select
import signal
import socket
import struct
import subprocess
import time
import uuid as uuidlib
from dataclasses import dataclass
from pathlib import Path

import pytest
from sim_fixture import SimHost, sim_host_module  # noqa: F401
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception
from tpm2_pytss.constants import ESYS_TR, TPM2_ALG, TPM2_NT, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

from xen_vtpm.config import Config
from xen_vtpm.vtpm import console, manager, stubdom, vtpmblk
from xen_vtpm.xen.consoles import LogTail, log_path
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm_sim import domains

NV_INDEX = 0x01000010
PERSISTENT = 0x81000010
# The simulator's TPM 2.0 stand-in (tpm2-pytss is the guest's stack here); test_sim_traps uses Xen's TPM 1.2.
VTPM_CFG = ('name="{name}"\nkernel="/usr/lib/xen/boot/{kernel}"\nmemory=8\nextra="{extra}"\n'
            'disk=["{disk},hda,w"]\nvtpm=["backend=vtpmmgr,uuid={uuid}"]\n')
KERNELS = {"2.0": "vtpm2-stubdom.gz", "1.2": "vtpm-stubdom.gz"}


@dataclass
class VtpmDom:
    name: str
    uuid: str
    image: Path
    status: console.BootVerdict | None = None


class VtpmLab:
    """Creates vTPM stub domains (no guest: the test is the guest's TPM software) on one sim host."""

    def __init__(self, sim: SimHost) -> None:
        self.sim = sim
        self.cfg = Config.load(sim.config)
        self.xs = XenStore(self.cfg.xenstore_path)
        self.mgr = manager.ManagerClient(self.cfg, self.xs)
        self.wait_manager_ready(0)

    def wait_manager_ready(self, offset: int) -> str:
        """`sim up` returns once the manager process runs; it serves after unsealing its table."""
        log = log_path(self.cfg.log_dir, "vtpmmgr")
        deadline = time.monotonic() + 30
        while "vtpmmgr: ready" not in (text := log.read_bytes()[offset:].decode(errors="replace")):
            assert time.monotonic() < deadline, f"vtpmmgr not ready: {text[-300:]}"
            time.sleep(0.05)
        return text

    def close(self) -> None:
        self.xs.close()

    def image(self, name: str) -> Path:
        path = self.sim.dir / "images" / f"{name}.img"
        if not path.exists():
            with open(path, "wb") as fh:
                fh.truncate(2 << 20)
        return path

    def create(self, name: str, vtpm_uuid: str | None = None, image: Path | None = None, *, startup: str = "clear",
               version: str = "2.0", disk: str | None = None) -> VtpmDom:
        """A vTPM stub domain; ``status`` is the console's verdict on its boot (Xen's default startup is clear)."""
        dom = VtpmDom(name, vtpm_uuid or str(uuidlib.uuid4()), image or self.image(name))
        cfg_file = self.sim.dir / "images" / f"{name}.cfg"
        cfg_file.write_text(VTPM_CFG.format(name=name, disk=disk or f"file:{dom.image}", uuid=dom.uuid,
                                            kernel=KERNELS[version], extra="" if startup == "clear" else startup))
        log = LogTail(log_path(self.cfg.log_dir, name))
        self.sim.xl("create", str(cfg_file))
        dom.status = self.verdict(log)
        tcti = self.tcti_file(name)
        deadline = time.monotonic() + 20
        while not tcti.exists():
            assert time.monotonic() < deadline, f"{name} never wrote {tcti.name}"
            time.sleep(0.02)
        return dom

    @staticmethod
    def verdict(log: LogTail, timeout: float = 30) -> console.BootVerdict:
        deadline = time.monotonic() + timeout
        while (verdict := console.boot_verdict(log.text())).kind in ("none", "pending"):
            assert time.monotonic() < deadline, f"no verdict on {log.path.name}: {log.text()[-400:]}"
            time.sleep(0.05)
        return verdict

    def tcti_file(self, name: str) -> Path:
        return self.sim.dir / "run" / f"{name}.tcti"

    def tcti(self, dom: VtpmDom) -> str:
        return self.tcti_file(dom.name).read_text().strip()

    def destroy(self, dom: VtpmDom) -> None:
        domid = self.sim.domid(dom.name)
        self.sim.xl("destroy", dom.name)
        stubdom.wait_released(self.xs, domid, self.mgr.info().domid, 20)

    def tpm(self, dom: VtpmDom) -> GuestTpm:
        return GuestTpm(self.tcti(dom))

    def manager_log(self, wait_for: str | None = None) -> str:
        return self.console("vtpmmgr", wait_for)

    def console(self, name: str, wait_for: str | None = None, timeout: float = 20) -> str:
        """The stub's console log (xenconsoled writes it a moment after the domain printed: wait for a line)."""
        deadline = time.monotonic() + timeout
        while wait_for is not None and wait_for not in log_path(self.cfg.log_dir, name).read_text():
            assert time.monotonic() < deadline, f"{name}: {wait_for!r} never reached its console log"
            time.sleep(0.05)
        return log_path(self.cfg.log_dir, name).read_text()


class GuestTpm:
    """What a guest does with its TPM, through the swtpm TCTI the vTPM publishes."""

    def __init__(self, tcti: str) -> None:
        name, _, conf = tcti.partition(":")
        self.ctx = ESAPI(TCTILdr(name, conf))

    def __enter__(self) -> GuestTpm:
        return self

    def __exit__(self, *exc) -> None:
        self.ctx.close()

    def pcr16(self) -> bytes:
        return bytes(self.ctx.pcr_read("sha256:16")[2][0])

    def extend16(self, data: bytes) -> None:
        self.ctx.pcr_event(ESYS_TR.PCR16, data)

    def counter_define(self) -> None:
        attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | (TPM2_NT.COUNTER << TPMA_NV.TPM2_NT_SHIFT)
        pub = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=NV_INDEX, nameAlg=TPM2_ALG.SHA256,
                                                      attributes=attrs, dataSize=8))
        self.ctx.nv_define_space(None, pub)

    def counter_increment(self) -> None:
        self.ctx.nv_increment(self.ctx.tr_from_tpmpublic(NV_INDEX), ESYS_TR.OWNER)

    def counter(self) -> int:
        handle = self.ctx.tr_from_tpmpublic(NV_INDEX)
        return int.from_bytes(bytes(self.ctx.nv_read(handle, 8, 0, ESYS_TR.OWNER)), "big")

    def make_persistent(self) -> bytes:
        primary = self.ctx.create_primary(None, "ecc256")[0]
        self.ctx.evict_control(ESYS_TR.OWNER, primary, PERSISTENT)
        self.ctx.flush_context(primary)
        return self.persistent_name()

    def persistent_name(self) -> bytes | None:
        try:
            handle = self.ctx.tr_from_tpmpublic(PERSISTENT)
        except TSS2_Exception:
            return None
        return bytes(self.ctx.read_public(handle)[1])

    def ek_name(self) -> bytes:
        handle = self.ctx.create_primary(None, "ecc256", primary_handle=ESYS_TR.ENDORSEMENT)[0]
        name = bytes(self.ctx.tr_get_name(handle))
        self.ctx.flush_context(handle)
        return name

    def snapshot(self) -> dict:
        return {"pcr16": self.pcr16(), "counter": self.counter(), "persistent": self.persistent_name(),
                "ek": self.ek_name()}


@pytest.fixture(scope="module")
def lab(sim_host_module):  # noqa: F811
    lab = VtpmLab(sim_host_module)
    try:
        yield lab
    finally:
        lab.close()


def _populate(lab: VtpmLab, dom: VtpmDom) -> dict:
    with lab.tpm(dom) as tpm:
        tpm.extend16(b"measured boot")
        tpm.counter_define()
        tpm.counter_increment()
        tpm.counter_increment()
        tpm.make_persistent()
        return tpm.snapshot()


def test_state_survives_stub_domain_restart(lab):
    dom = lab.create("vtpm-a")
    assert dom.status.fresh and dom.status.manager_rc == 3   # first boot: the manager has no entry yet
    before = _populate(lab, dom)
    assert before["counter"] == 2 and before["persistent"] is not None
    lab.destroy(dom)
    again = lab.create("vtpm-a", dom.uuid, startup="save")   # save: the PCRs come back too
    assert again.status.loaded and again.status.slot in (0, 1)
    with lab.tpm(again) as tpm:
        assert tpm.snapshot() == before                   # PCR (volatile), NV counter, object, EK
    lab.destroy(again)


def test_every_successful_command_moves_the_pair(lab):
    dom = lab.create("vtpm-b")
    with lab.tpm(dom) as tpm:
        tpm.ctx.get_random(8)
        first = vtpmblk.slot_fingerprints(dom.image)
        tpm.ctx.get_random(8)                            # read-only, still saved (docs/xen-internals.md §6.1)
        second = vtpmblk.slot_fingerprints(dom.image)
    # Alternating slots: the slot written before stays, the other one changes.
    assert first != second and (first[0] == second[0] or first[1] == second[1])
    # tpm2-tools through the TCTI string works too and also persists.
    out = subprocess.run(["tpm2_pcrread", "-T", lab.tcti(dom), "sha256:16"], capture_output=True, text=True,
                         timeout=30)
    assert out.returncode == 0 and "16" in out.stdout
    assert vtpmblk.slot_fingerprints(dom.image) != second
    lab.destroy(dom)


def test_disk_only_restore_comes_up_fresh_and_destroys_the_old_identity(lab):
    dom = lab.create("vtpm-c")
    old = _populate(lab, dom)
    lab.sim.xl("pause", dom.name)
    saved = dom.image.read_bytes()
    lab.sim.xl("unpause", dom.name)
    with lab.tpm(dom) as tpm:
        tpm.extend16(b"later")
    lab.destroy(dom)
    dom.image.write_bytes(saved)                          # image only, manager entry moved on
    again = lab.create("vtpm-c", dom.uuid)
    assert again.status.fresh and "Checksum failed" in again.status.reason
    boot = lab.console("vtpm-c")
    boot = boot[boot.rindex("starting TPM Emulator"):]
    # Xen prints the slot reads before the checksum: "Read ... bytes" alone proves nothing (§7.3).
    assert boot.index("Read ") < boot.index("Error: NVM Storage Checksum failed!") < boot.index(
        "initializing TPM data to default values") < boot.index("TPM_Init()")
    with lab.tpm(again) as tpm:
        assert tpm.persistent_name() is None              # a brand-new TPM: object gone ...
        assert tpm.ek_name() != old["ek"]                 # ... and a new endorsement identity
    # Its first command overwrote slot 0 and the manager entry: the old state is unreachable now.
    lab.destroy(again)
    third = lab.create("vtpm-c", dom.uuid, dom.image)
    assert third.status.loaded                            # consistent again, but with the new identity
    with lab.tpm(third) as tpm:
        assert tpm.ek_name() != old["ek"] and tpm.persistent_name() is None
    lab.destroy(third)


def test_image_plus_manager_checkpoint_restores_exactly(lab):
    dom = lab.create("vtpm-d")
    old = _populate(lab, dom)
    ckpt = str(uuidlib.uuid4())
    lab.sim.xl("pause", dom.name)
    digest = lab.mgr.checkpoint(dom.uuid, ckpt)
    saved = dom.image.read_bytes()
    lab.sim.xl("unpause", dom.name)
    copy = lab.sim.dir / "images" / "vtpm-d.copy"
    copy.write_bytes(saved)
    assert vtpmblk.matching_slot(copy, digest) is not None
    with lab.tpm(dom) as tpm:
        tpm.extend16(b"after checkpoint")
        tpm.counter_increment()
    with pytest.raises(Exception, match="is open"):
        lab.mgr.restore(dom.uuid, ckpt)                   # refused while the vTPM runs
    lab.destroy(dom)
    dom.image.write_bytes(saved)
    assert lab.mgr.restore(dom.uuid, ckpt) == digest
    again = lab.create("vtpm-d", dom.uuid, startup="save")
    assert again.status.loaded
    with lab.tpm(again) as tpm:
        assert tpm.snapshot() == old
    lab.mgr.discard(ckpt, dom.uuid)
    lab.destroy(again)


def test_two_vtpms_with_the_same_uuid_are_refused(lab):
    dom = lab.create("vtpm-e")
    _populate(lab, dom)
    lab.destroy(dom)
    live = lab.create("vtpm-e", dom.uuid)                 # LOADHASHKEY marks the entry OPEN
    assert live.status.loaded
    twin = lab.create("vtpm-e2", dom.uuid)
    assert twin.status.fresh and twin.status.manager_rc == 7
    assert "Attempted to open vTPM twice!" in lab.manager_log(wait_for="Attempted to open vTPM twice!")
    with lab.tpm(twin) as tpm:
        tpm.ctx.get_random(4)                             # its save is refused too
    assert "tpm_store_permanent_data() failed" in lab.console("vtpm-e2", wait_for="VTPM_SaveHashKey failed")
    lab.sim.xl("pause", live.name)
    digest = lab.mgr.checkpoint(dom.uuid, str(uuidlib.uuid4()))
    assert digest in vtpmblk.slot_fingerprints(live.image)  # the entry still belongs to the live one
    lab.sim.xl("unpause", live.name)
    lab.destroy(twin)
    lab.destroy(live)


def test_paused_vtpm_serves_nothing(lab):
    dom = lab.create("vtpm-f")
    host, port = "127.0.0.1", int(lab.tcti(dom).rsplit("=", 1)[1])
    before = vtpmblk.slot_fingerprints(dom.image)
    lab.sim.xl("pause", dom.name)
    try:
        with socket.create_connection((host, port)) as conn:
            conn.sendall(struct.pack(">HIIH", 0x8001, 12, 0x17B, 8))   # TPM2_GetRandom(8)
            assert select.select([conn], [], [], 0.5)[0] == []
            assert vtpmblk.slot_fingerprints(dom.image) == before
            lab.sim.xl("unpause", dom.name)
            head = conn.recv(10)
            assert struct.unpack(">HII", head)[2] == 0
    finally:
        lab.sim.xl("unpause", dom.name, check=False)
    assert vtpmblk.slot_fingerprints(dom.image) != before
    lab.destroy(dom)


def test_killed_vtpm_leaves_no_swtpm(lab):
    dom = lab.create("vtpm-g")
    pid = domains.snapshot(lab.sim.dir)["domains"][str(lab.sim.domid(dom.name))]["pid"]
    children = subprocess.run(["pgrep", "-P", str(pid), "swtpm"], capture_output=True, text=True).stdout.split()
    assert children, "the vTPM runs its swtpm as a child"
    os.kill(pid, signal.SIGKILL)                          # no chance to clean up: PDEATHSIG must do it
    deadline = time.monotonic() + 10
    while any(_alive(int(c)) for c in children):
        assert time.monotonic() < deadline, "swtpm outlived its vTPM"
        time.sleep(0.05)
    lab.destroy(dom)


def _alive(pid: int) -> bool:
    try:
        return "State:\tZ" not in Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return False


def test_xenbus_states_of_both_links(lab):
    """guest -> vTPM stub domain -> manager, with the nodes and states of docs/xen-internals.md §8.1, §9.2-9.3."""
    lab.sim.create_guest("g1")
    xs, guest, vtpm, mgr = lab.xs, lab.sim.domid("g1"), lab.sim.domid("vtpm-g1"), lab.mgr.info().domid
    links = ((f"/local/domain/{vtpm}/device/vtpm/0", f"/local/domain/{mgr}/backend/vtpm/{vtpm}/0"),
             (f"/local/domain/{guest}/device/vtpm/0", f"/local/domain/{vtpm}/backend/vtpm/{guest}/0"))

    def connected() -> bool:
        return all(xs.read_or(f"{fe}/state") == "4" and xs.read_or(f"{be}/state") == "4" for fe, be in links)
    assert xs.wait_for(connected, [p + "/state" for link in links for p in link], 20)
    for fe, be in links:
        assert xs.read(f"{be}/ready") == "1" and xs.read(f"{be}/feature-protocol-v2") == "1"
        assert xs.read(f"{fe}/feature-protocol-v2") == "1"
        assert xs.read(f"{fe}/ring-ref").isdigit() and xs.read(f"{fe}/event-channel").isdigit()
    tcti = lab.sim.tool("sim", "tcti", "g1").stdout.strip()
    assert tcti == lab.tcti_file("vtpm-g1").read_text().strip()
    with GuestTpm(tcti) as tpm:
        tpm.ctx.get_random(4)
    lab.sim.xl("destroy", "g1")                           # tpmback frees the guest's tpmif ...
    assert xs.wait_for(lambda: not xs.exists(links[1][1]), [links[1][1]], 20)
    log = log_path(lab.cfg.log_dir, "vtpm-g1")
    deadline = time.monotonic() + 20
    while f"frontend {guest}/0 gone, tpmif freed" not in log.read_text():
        assert time.monotonic() < deadline, "the vTPM never freed the guest's tpmif"
        time.sleep(0.05)
    assert lab.sim.domid("vtpm-g1") == vtpm               # ... and the vTPM keeps running
    lab.sim.xl("destroy", "vtpm-g1")
    stubdom.wait_released(xs, vtpm, mgr, 20)
