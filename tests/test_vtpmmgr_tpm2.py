"""A vtpmmgr that persists on a TPM 2.0 host (patches 0003 and 0004, docs/vtpmmgr-tpm2.md): Xen's
manager code, built natively under ASan and UBSan, sealing its table to PCRs 0-7 of a real TPM 2.0
(swtpm) with an authorized-policy path for planned updates, and an NV counter against a replayed
disk.  Every test runs its own simulated host and ends with a sanitizer-clean manager console."""
from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import pytest
from sim_fixture import SimHost, sim_host, start_sim_host, stop_sim_host  # noqa: F401
from test_vtpm_stubdom import MANAGER_STOPPED, VtpmDom, VtpmLab, _populate, wait_manager_console

from xen_vtpm.errors import XenError, XenStorePermission
from xen_vtpm.xen.consoles import LogTail, log_path
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm_sim import boot, domains, reboot
from xen_vtpm_sim.mgrdisk import MgrDisk, PtpmSealer

ROOT = Path(__file__).resolve().parents[1]
POLICY_TOOL = ROOT / "vtpmmgr" / "tools" / "tpm2-policy.py"
SANITIZER_MARKS = ("ERROR: AddressSanitizer", "runtime error:", "ERROR: LeakSanitizer")
NV_INCREMENT = "134"          # TPM2_CC_NV_Increment
FIRMWARE_UPDATE = [(0, "simulated firmware 1.1")]


@pytest.fixture
def lab(sim_host):  # noqa: F811
    lab = VtpmLab(sim_host)
    try:
        yield lab
    finally:
        lab.close()
        log = (sim_host.dir / "logs" / "guest-vtpmmgr.log").read_text(errors="replace")
        assert not [m for m in SANITIZER_MARKS if m in log], log[-3000:]


def _image(sim: SimHost) -> Path:
    return sim.dir / "images" / "vtpmmgr.img"


def _manager_cfg(sim: SimHost) -> Path:
    return sim.dir / "images" / "vtpmmgr.cfg"


def _set_cfg(sim: SimHost, extra_words: str = "", **keys: str) -> None:
    """Append words to the manager's extra= and simulator keys to its cfg (the next start reads them)."""
    cfg = _manager_cfg(sim)
    text = cfg.read_text().replace('extra="', f'extra="{extra_words} ' if extra_words else 'extra="')
    cfg.write_text(text + "".join(f'{k}="{v}"\n' for k, v in keys.items()))


def _manager_log(sim: SimHost) -> Path:
    return sim.dir / "logs" / "guest-vtpmmgr.log"


def _stop_manager(lab: VtpmLab) -> None:
    old = lab.mgr.info().domid
    lab.sim.xl("destroy", "vtpmmgr")
    assert lab.xs.wait_for(lambda: not lab.xs.is_introduced(old), ["@releaseDomain"], 20)


def _start_manager(lab: VtpmLab) -> str:
    """`xl create` the manager; its console from then on, once it serves or stopped."""
    log = _manager_log(lab.sim)
    offset = log.stat().st_size
    lab.sim.xl("create", str(_manager_cfg(lab.sim)))
    try:
        return wait_manager_console(log, offset)
    except AssertionError:
        return log.read_bytes()[offset:].decode(errors="replace")


def _reboot(sim: SimHost, measure: list[tuple[int, str]] | None = None) -> tuple[VtpmLab, dict[str, int]]:
    """Power-cycle the host; a lab on it and where each console log stood before."""
    offsets = {log.name: log.stat().st_size for log in (sim.dir / "logs").glob("guest-*.log")}
    reboot.reboot(sim.dir, measure)
    return VtpmLab(sim), offsets


def _came_back(lab: VtpmLab, dom: VtpmDom, offsets: dict[str, int]) -> VtpmDom:
    """The stub domain the reboot created again, and whether it loaded its state (its console says)."""
    status = lab.verdict(LogTail(log_path(lab.cfg.log_dir, dom.name), offsets.get(f"guest-{dom.name}.log", 0)))
    assert domains.wait_until(lambda: lab.tcti_file(dom.name).exists(), 20)
    return VtpmDom(dom.name, dom.uuid, dom.image, status)


def _boots_in_save_mode(lab: VtpmLab, dom: VtpmDom) -> None:
    """From its next boot on (a reboot reads its cfg again) the stub starts with `save`, as `sim create`
    leaves a guest's vTPM once it has saved: its PCRs then come back too."""
    cfg = lab.sim.dir / "images" / f"{dom.name}.cfg"
    cfg.write_text(cfg.read_text().replace('extra=""', 'extra="save"'))


def _check(lab: VtpmLab, dom: VtpmDom, expected: dict) -> None:
    with lab.tpm(dom) as tpm:
        assert tpm.snapshot() == expected


def _last_boot(sim: SimHost) -> str:
    log = _manager_log(sim).read_text(errors="replace")
    return log[log.rindex("Starting vTPM manager domain"):]


def _damage_newest_root(sim: SimHost) -> None:
    """Flip a bit in the root the manager would load first, as a write that never completed."""
    disk = MgrDisk(_image(sim), PtpmSealer((sim.dir / "run" / "ptpm.tcti").read_text().strip()))
    assert disk.load() is not None
    raw = bytearray(_image(sim).read_bytes())
    raw[MgrDisk.root_sector_offset(disk.active) + 200] ^= 0x01
    _image(sim).write_bytes(bytes(raw))


def _die_in_the_next_save(lab: VtpmLab, dom: VtpmDom, event: bytes) -> None:
    """Start the vTPM on a manager that dies after writing its table for the vTPM's next save and
    before counting that write; one guest command (one save) extends PCR 16 with event.  Both
    domains are gone afterwards, and the manager's config is as before."""
    _stop_manager(lab)
    original = _manager_cfg(lab.sim).read_text()
    _set_cfg(lab.sim, sim_crash_before_tpm_command=f"{NV_INCREMENT}:1")
    assert "table opened" in _start_manager(lab)
    again = lab.create(dom.name, dom.uuid, startup="save")
    with lab.tpm(again) as tpm:
        tpm.extend16(event)
    log = _manager_log(lab.sim)
    assert domains.wait_until(lambda: "stopping the domain before TPM command 0x134" in log.read_text(), 10)
    lab.sim.xl("destroy", again.name)
    lab.sim.xl("destroy", "vtpmmgr")
    _manager_cfg(lab.sim).write_text(original)


def _policy_tool(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(POLICY_TOOL), *args], capture_output=True, text=True, timeout=60)


# --- persistence ---------------------------------------------------------------------------------


def test_manager_restart_and_host_reboot_keep_every_vtpm(lab):
    doms = [lab.create(name) for name in ("vtpm-p1", "vtpm-p2")]
    states = [_populate(lab, dom) for dom in doms]
    assert states[0]["ek"] != states[1]["ek"]
    for dom in doms:
        lab.destroy(dom)
    _stop_manager(lab)
    boot_log = _start_manager(lab)
    assert "table opened with PCRs 0-7 of this boot" in boot_log and "first time" not in boot_log
    for dom, state in zip(doms, states, strict=True):
        again = lab.create(dom.name, dom.uuid, startup="save")
        assert again.status.kind == "loaded"
        _check(lab, again, state)
    lab.close()

    # Power cut: both TPMs and every domain stop; PCRs 0-7 are measured again, the same way.
    lab, offsets = _reboot(lab.sim)
    assert "table opened with PCRs 0-7 of this boot" in _last_boot(lab.sim)
    for dom, state in zip(doms, states, strict=True):
        again = _came_back(lab, dom, offsets)
        assert again.status.kind == "loaded", again.status
        _check(lab, again, state)
    lab.close()


def test_a_host_reboot_brings_back_guests_with_their_vtpm_state(sim_host):  # noqa: F811
    sim = sim_host
    sim.create_guest("g1")
    tcti = sim.tool("sim", "tcti", "g1").stdout.strip()
    subprocess.run(["tpm2_pcrextend", "-T", tcti, "16:sha256=" + "ab" * 32], check=True, capture_output=True,
                   timeout=30)
    before = subprocess.run(["tpm2_pcrread", "-T", tcti, "sha256:16"], check=True, capture_output=True,
                            text=True, timeout=30).stdout
    old_domid = sim.domid("g1")
    out = sim.tool("sim", "reboot")
    assert out.stdout.split() == ["started", "vtpmmgr", "vtpm-g1", "g1"]
    assert sim.domid("g1") != old_domid                   # booted afresh: a new domain
    tcti = sim.tool("sim", "tcti", "g1").stdout.strip()
    after = subprocess.run(["tpm2_pcrread", "-T", tcti, "sha256:16"], check=True, capture_output=True,
                           text=True, timeout=30).stdout
    assert after == before and "0x" in after


def _nv(sim: SimHost, guest: str, *argv: str, data: bytes | None = None) -> bytes:
    tcti = sim.tool("sim", "tcti", guest).stdout.strip()
    return subprocess.run([argv[0], "-T", tcti, *argv[1:]], input=data, check=True, capture_output=True,
                          timeout=30).stdout


def test_a_reboot_without_console_logs_restarts_swtpm_guests_with_their_tpm(tmp_path):
    """xenconsoled keeping no logs does not stop a reboot (the manager is followed on its pty), and an
    HVM guest whose TPM is an swtpm comes back with it running (`vtpm start` before `xl create`, as the
    xendomains drop-in does), its NV index intact."""
    sim = start_sim_host(tmp_path / "h", console_log="none")
    try:
        sim.tool("init")
        sim.create_guest("g1")
        sim.tool("sim", "create", "hvm1", "--memory", "16", "--vtpm", "swtpm")
        _nv(sim, "hvm1", "tpm2_nvdefine", "0x1500016", "-C", "o", "-s", "8", "-a", "ownerread|ownerwrite")
        _nv(sim, "hvm1", "tpm2_nvwrite", "0x1500016", "-C", "o", "-i", "-", data=b"hvm1-nv!")
        old = sim.domid("hvm1")
        out = sim.tool("sim", "reboot")
        assert out.stdout.split() == ["started", "vtpmmgr", "vtpm-g1", "g1", "hvm1"]
        assert sim.domid("hvm1") != old
        assert _nv(sim, "hvm1", "tpm2_nvread", "0x1500016", "-C", "o", "-s", "8") == b"hvm1-nv!"
        assert not list((sim.dir / "logs").glob("guest-*.log"))       # the reboot read no log file
    finally:
        stop_sim_host(sim)


# --- a changed boot --------------------------------------------------------------------------------


def test_a_changed_boot_measurement_is_refused_and_says_so(lab):
    dom = lab.create("vtpm-m")
    state = _populate(lab, dom)
    _boots_in_save_mode(lab, dom)
    lab.close()
    sealed = _image(lab.sim).read_bytes()
    with pytest.raises(XenError) as exc:
        reboot.reboot(lab.sim.dir, FIRMWARE_UPDATE)
    message = str(exc.value)
    assert "vtpmmgr stopped" in message and "the boot measurements changed" in message
    assert "vtpm-m (its vTPM backend vtpmmgr is not running)" in message
    tail = _last_boot(lab.sim)
    assert "the table is sealed to PCRs 0-7" in tail and "to approve this boot" in tail
    assert "refusing to start with an empty table" in tail and MANAGER_STOPPED in tail
    assert "Assuming first time initialization" not in tail       # no silent fresh start
    table = domains.snapshot(lab.sim.dir)
    assert not [d for d in table["domains"].values() if d.get("pid") and domains.is_alive(d["pid"])]
    assert _image(lab.sim).read_bytes() == sealed                 # nothing written

    # The table is still there for the boot it was sealed to.
    lab, offsets = _reboot(lab.sim, [boot.DEFAULT_EVENTS[0]])
    again = _came_back(lab, dom, offsets)
    assert again.status.kind == "loaded"
    _check(lab, again, state)
    lab.close()


def test_an_authorized_update_keeps_the_data(lab):
    dom = lab.create("vtpm-u")
    state = _populate(lab, dom)
    _boots_in_save_mode(lab, dom)
    lab.close()
    with pytest.raises(XenError):
        reboot.reboot(lab.sim.dir, FIRMWARE_UPDATE)
    log = _manager_log(lab.sim).read_text()
    digest = log.rsplit("sign PolicyPCR digest ", 1)[1].split()[0]

    # The administrator computes the same digest off the host from the new PCR values...
    tcti = (lab.sim.dir / "run" / "ptpm.tcti").read_text().strip()
    pcrs = subprocess.run(["tpm2_pcrread", "-T", tcti, "sha256:0,1,2,3,4,5,6,7"], check=True,
                          capture_output=True, text=True, timeout=30).stdout
    values = [line.split("0x")[1] for line in pcrs.splitlines() if "0x" in line]
    assert _policy_tool("policy", "0-7", *values).stdout.strip() == digest
    # ...and approves it with the authority key recorded in group 0 at provisioning.
    approval = _policy_tool("approve", str(boot.authority_path(lab.sim.dir)), digest).stdout.strip()
    assert approval.startswith("tpm2_authorized=")

    # An approval by another key opens nothing.
    other = lab.sim.dir / "other.pem"
    _policy_tool("keygen", str(other))
    forged = _policy_tool("approve", str(other), digest).stdout.strip()
    original = _manager_cfg(lab.sim).read_text()
    _set_cfg(lab.sim, forged)
    image = _image(lab.sim).read_bytes()
    with pytest.raises(XenError, match="vtpmmgr stopped"):
        reboot.reboot(lab.sim.dir)
    assert "tpm2_authorized= does not open it" in _last_boot(lab.sim)
    assert _image(lab.sim).read_bytes() == image

    _manager_cfg(lab.sim).write_text(original)
    _set_cfg(lab.sim, approval)
    lab, offsets = _reboot(lab.sim)
    assert "opened with the policy authority's approval of this boot; resealed to PCRs 0-7" in _last_boot(lab.sim)
    again = _came_back(lab, dom, offsets)
    assert again.status.kind == "loaded"
    _check(lab, again, state)
    lab.close()

    # Resealed: the next boot of the updated host needs no approval.
    _manager_cfg(lab.sim).write_text(original)
    lab, offsets = _reboot(lab.sim)
    assert "table opened with PCRs 0-7 of this boot" in _last_boot(lab.sim)
    _check(lab, _came_back(lab, dom, offsets), state)
    lab.close()


# --- anti-rollback -------------------------------------------------------------------------------


def test_a_replayed_manager_disk_is_refused(lab):
    dom = lab.create("vtpm-r")
    _populate(lab, dom)
    lab.sim.xl("pause", dom.name)
    old = _image(lab.sim).read_bytes()                   # a copy of the manager's disk...
    lab.sim.xl("unpause", dom.name)
    with lab.tpm(dom) as tpm:
        tpm.extend16(b"after the copy")
        latest = tpm.snapshot()
    lab.destroy(dom)
    _stop_manager(lab)
    current = _image(lab.sim).read_bytes()
    _image(lab.sim).write_bytes(old)                     # ...put back later
    boot_log = _start_manager(lab)
    assert "an older copy of the manager's disk (replayed); refused" in boot_log
    assert MANAGER_STOPPED in boot_log and "Assuming first time initialization" not in boot_log
    assert _image(lab.sim).read_bytes() == old           # refused, not rewritten
    lab.sim.xl("destroy", "vtpmmgr")
    _image(lab.sim).write_bytes(current)
    assert "table opened" in _start_manager(lab)
    again = lab.create("vtpm-r", dom.uuid, startup="save")
    assert again.status.kind == "loaded"
    _check(lab, again, latest)
    lab.destroy(again)


def test_a_damaged_newest_root_is_not_rolled_back_to_the_older_one(lab):
    dom = lab.create("vtpm-d")
    _populate(lab, dom)
    lab.destroy(dom)
    _stop_manager(lab)
    _damage_newest_root(lab.sim)
    boot_log = _start_manager(lab)
    # The other slot holds the table one write earlier: loading it would undo that write.
    assert "(replayed); refused" in boot_log and MANAGER_STOPPED in boot_log


@pytest.mark.crash_full
def test_a_crash_between_the_disk_write_and_the_counter_is_recovered(lab):
    dom = lab.create("vtpm-c")
    state = _populate(lab, dom)
    lab.destroy(dom)
    event = b"the save the manager died in"
    _die_in_the_next_save(lab, dom, event)
    boot_log = _start_manager(lab)
    assert "the last write of the table was not counted yet; NV counter advanced" in boot_log
    last = lab.create("vtpm-c", dom.uuid, startup="save")
    assert last.status.kind == "loaded"
    _check(lab, last, dict(state, pcr16=hashlib.sha256(state["pcr16"] + hashlib.sha256(event).digest()).digest()))
    lab.destroy(last)


@pytest.mark.crash_full
def test_a_write_torn_before_it_was_counted_falls_back_to_the_previous_table(lab):
    dom = lab.create("vtpm-t")
    state = _populate(lab, dom)
    lab.destroy(dom)
    _die_in_the_next_save(lab, dom, b"lost")
    _damage_newest_root(lab.sim)                         # and the write never completed
    assert "table opened" in _start_manager(lab)
    last = lab.create("vtpm-t", dom.uuid, startup="save")
    assert last.status.kind == "loaded"                  # the vTPM's other slot matches the older H
    _check(lab, last, state)
    lab.destroy(last)


# --- what dom0 tools read ----------------------------------------------------------------------


def test_the_manager_says_what_runs_and_whether_it_persists(lab):
    mgr = lab.mgr.info()
    node = f"/local/domain/{mgr.domid}/data/vtpmmgr"
    assert lab.xs.read(f"{node}/build").startswith("native xen-4.17 vtpmmgr")
    assert "xen-vtpm patches 0001-0004" in lab.xs.read(f"{node}/build")
    assert lab.xs.read(f"{node}/tpm") == "2.0"
    assert lab.xs.read(f"{node}/persistent") == "1"
    assert lab.xs.read(f"{node}/anti-rollback") == "nv-counter 0x0100a100"
    # Only dom0 and the manager read it: a vTPM stub domain cannot...
    dom = lab.create("vtpm-s")
    with XenStore(f"{lab.cfg.xenstore_path}.d{lab.sim.domid(dom.name)}") as xs:
        with pytest.raises(XenStorePermission):
            xs.read(f"{node}/persistent")
    lab.destroy(dom)

    # ...and an unprovisioned manager says it keeps nothing.
    _stop_manager(lab)
    blank = lab.sim.dir / "images" / "blank.img"
    blank.write_bytes(bytes(2 << 20))
    cfg = _manager_cfg(lab.sim)
    cfg.write_text(cfg.read_text().replace(str(_image(lab.sim)), str(blank)) + "sim_unprovisioned=1\n")
    assert "group 0 stays unprovisioned" in _start_manager(lab)
    mgr = lab.mgr.info()
    node = f"/local/domain/{mgr.domid}/data/vtpmmgr"
    assert lab.xs.read(f"{node}/persistent") == "0" and lab.xs.read(f"{node}/anti-rollback") == "none"


# --- the policy tool -----------------------------------------------------------------------------


def test_the_policy_tool_refuses_bad_input_in_one_line(tmp_path):
    key = tmp_path / "a.pem"
    assert _policy_tool("keygen", str(key)).returncode == 0
    assert key.stat().st_mode & 0o777 == 0o600
    cases = [
        (("keygen", str(key)), "cannot create"),
        (("approve", str(key), "zz"), "expected 64 hex digits"),
        (("approve", str(tmp_path / "none.pem"), "00" * 32), "cannot read the authority key"),
        (("policy", "0-7", "00" * 32), "selects 8 PCRs but 1 values"),
        (("policy", "0-24", "00" * 32), "PCRs are 0 to 23"),
    ]
    for args, message in cases:
        out = _policy_tool(*args)
        assert out.returncode == 2 and message in out.stderr and out.stderr.count("\n") == 1, out.stderr
