"""The simulated xl against the simulated xenstored, checked with Debian's C clients and Xen's verifier."""
import os
import struct
import subprocess
import threading
import time
import uuid as uuidlib
from pathlib import Path

import pytest
from sim_fixture import sim_host_module  # noqa: F401

from xen_vtpm.xen.savefile import read_save_header
from xen_vtpm.xen.xl import parse_vtpm_list, parse_xl_list
from xen_vtpm_sim import domains

VERIFY = "/usr/lib/xen-4.17/bin/verify-stream-v2"


@pytest.fixture
def sim(sim_host_module):
    yield sim_host_module
    # Each test cleans up its guests so names can be reused.
    for dom in domains.snapshot(sim_host_module.dir)["domains"].values():
        if dom["name"] != "vtpmmgr":
            sim_host_module.xl("destroy", str(dom["domid"]), check=False)


def write_cfg(sim, name, memory=16, vtpm=None):
    path = sim.dir / "images" / f"{name}.cfg"
    lines = [f'name="{name}"', f"memory={memory}"] + ([f'vtpm=["{vtpm}"]'] if vtpm else [])
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def xs_read(sim, path):
    return sim.run(["xenstore-read", path]).stdout.strip()


def state_of(sim, name):
    return {r["name"]: r["state"] for r in parse_xl_list(sim.xl("list").stdout)}.get(name)


def digest(sim, name):
    return sim.tool("sim", "memdigest", name).stdout.strip()


def wait(pred, timeout=20):
    assert domains.wait_until(pred, timeout, 0.05), "condition not reached"


WINDOW = 1.0    # seconds: the running guest writes its memory every 50 ms (xen_vtpm_sim.guest.TICK)


def newest_write(sim, name):
    """The guest process stamps (domid, tick count) into the first 16 bytes of every page it writes:
    the highest tick found in its memory file, read straight from the file, is its newest write."""
    dom = domains.find(domains.snapshot(sim.dir), name)
    data = Path(dom["memfile"]).read_bytes()
    ticks = [struct.unpack_from("<QQ", data, off) for off in range(0, len(data), 4096)]
    return max((tick for domid, tick in ticks if domid == dom["domid"]), default=0)


def runs_nothing(sim, name):
    """Paused: its process is stopped, and for WINDOW (many of its ticks) no new write shows up in its
    memory, where the same look sees a running guest's writes (runs() below is the control)."""
    dom = domains.find(domains.snapshot(sim.dir), name)
    assert domains.is_stopped(dom["pid"]), f"{name}: its process {dom['pid']} is not stopped"
    before = newest_write(sim, name)
    time.sleep(WINDOW)
    assert newest_write(sim, name) == before, f"{name}: wrote its memory while paused"


def runs(sim, name):
    """A new write by the guest process shows up in its memory within WINDOW."""
    before = newest_write(sim, name)
    wait(lambda: newest_write(sim, name) > before, WINDOW * 5)


def test_lifecycle_and_lookups(sim):
    sim.xl("create", write_cfg(sim, "life"))
    domid = sim.domid("life")
    assert sim.xl("domname", str(domid)).stdout.strip() == "life"
    assert sim.xl("domid", "Domain-0").stdout.strip() == "0"
    rows = parse_xl_list(sim.xl("list").stdout)
    assert rows[0]["name"] == "Domain-0" and rows[0]["domid"] == 0
    assert {"name": "life", "domid": domid, "mem": 16}.items() <= next(r for r in rows if r["name"] == "life").items()
    # Running: memory keeps changing (seen through `sim memdigest` and by the guest's own stamps).
    # Paused: nothing the guest process could write shows up.
    first = digest(sim, "life")
    wait(lambda: digest(sim, "life") != first)
    runs(sim, "life")
    sim.xl("pause", "life")
    assert state_of(sim, "life") == "--p---"
    runs_nothing(sim, "life")
    sim.xl("unpause", str(domid))
    assert state_of(sim, "life") != "--p---"
    runs(sim, "life")
    sim.xl("destroy", "life")
    assert state_of(sim, "life") is None
    assert sim.run(["xenstore-read", f"/local/domain/{domid}/name"], check=False).returncode != 0


def test_create_paused_runs_nothing_until_unpause(sim):
    sim.xl("create", "-p", write_cfg(sim, "held"))
    assert state_of(sim, "held") == "--p---"
    runs_nothing(sim, "held")
    assert newest_write(sim, "held") == 0, "a guest created paused has already written its memory"
    sim.xl("unpause", "held")
    wait(lambda: state_of(sim, "held") != "--p---")
    runs(sim, "held")


def test_xenstore_layout_vtpm_device_and_release_watch(sim):
    vuuid = str(uuidlib.uuid4())
    mgr = sim.domid("vtpmmgr")
    sim.xl("create", write_cfg(sim, "lay", vtpm=f"backend=vtpmmgr,uuid={vuuid}"))
    d = sim.domid("lay")
    fe, be = f"/local/domain/{d}/device/vtpm/0", f"/local/domain/{mgr}/backend/vtpm/{d}/0"
    lx = f"/libxl/{d}/device/vtpm/0"
    assert xs_read(sim, f"/local/domain/{d}/name") == "lay"
    assert xs_read(sim, f"/local/domain/{d}/domid") == str(d)
    vm = xs_read(sim, f"/local/domain/{d}/vm")
    assert xs_read(sim, f"{vm}/name") == "lay"
    assert xs_read(sim, f"{fe}/backend") == be and xs_read(sim, f"{fe}/backend-id") == str(mgr)
    assert xs_read(sim, f"{be}/frontend") == fe and xs_read(sim, f"{be}/frontend-id") == str(d)
    assert xs_read(sim, f"{be}/uuid") == vuuid == xs_read(sim, f"{lx}/uuid")
    assert xs_read(sim, f"{lx}/frontend") == fe and xs_read(sim, f"{lx}/backend") == be
    perms = sim.run(["xenstore-ls", "-p", f"/local/domain/{d}/device/vtpm"]).stdout
    assert f"(n{d},r{mgr})" in perms
    be_perms = sim.run(["xenstore-ls", "-p", f"/local/domain/{mgr}/backend/vtpm/{d}"]).stdout
    assert f"(n{mgr},r{d})" in be_perms
    # The guest (frontend) and the manager (backend) connect.
    wait(lambda: xs_read(sim, f"{fe}/state") == "4" and xs_read(sim, f"{be}/state") == "4")
    for key in ("ring-ref", "event-channel"):
        assert xs_read(sim, f"{fe}/{key}").isdigit()
    assert xs_read(sim, f"{fe}/feature-protocol-v2") == "1"
    (row,) = parse_vtpm_list(sim.xl("vtpm-list", "lay").stdout)
    assert (row["devid"], row["backend_domid"], row["uuid"], row["state"]) == (0, mgr, vuuid, 4)
    # @releaseDomain fires when the domain is destroyed (first event: the registration).
    # stdbuf: xenstore-watch block-buffers a pipe; timeout: never hang the suite.
    watcher = subprocess.Popen(["timeout", "30", "stdbuf", "-oL", "xenstore-watch", "-n", "2", "@releaseDomain"],
                               env=sim.env, stdout=subprocess.PIPE, text=True)
    try:
        assert watcher.stdout.readline().strip() == "@releaseDomain"
        sim.xl("destroy", "lay")
        assert watcher.stdout.readline().strip() == "@releaseDomain"
        assert watcher.wait(timeout=30) == 0
    finally:
        watcher.kill()
        watcher.wait()
    assert sim.run(["xenstore-ls", f"/libxl/{d}"], check=False).returncode != 0
    assert sim.run(["xenstore-ls", fe], check=False).returncode != 0


def test_save_restore_round_trip_with_vtpm_config(sim, tmp_path):
    vuuid = str(uuidlib.uuid4())
    sim.xl("create", write_cfg(sim, "rt", vtpm=f"backend=vtpmmgr,uuid={vuuid}"))
    old = sim.domid("rt")
    first = digest(sim, "rt")
    wait(lambda: digest(sim, "rt") != first)   # it has run and scribbled
    save = tmp_path / "rt.save"
    sim.xl("save", "-p", "rt", str(save))
    assert state_of(sim, "rt") == "--p---"
    saved = digest(sim, "rt")
    verify = sim.run([VERIFY, "-f", "xl", "-i", str(save)], check=False,
                     env={"PYTHONPATH": "/usr/lib/xen-4.17/lib/python"})
    assert verify.returncode == 0, verify.stderr
    header = read_save_header(str(save))
    assert header.vtpms == [{"uuid": vuuid, "backend_domname": "vtpmmgr",
                             "backend_domid": sim.domid("vtpmmgr"), "devid": 0}]
    assert header.config["c_info"]["name"] == "rt"
    sim.xl("destroy", "rt")
    sim.xl("restore", "-p", str(save))
    new = sim.domid("rt")
    assert new != old and state_of(sim, "rt") == "--p---"
    assert digest(sim, "rt") == saved
    assert xs_read(sim, f"/libxl/{new}/device/vtpm/0/uuid") == vuuid
    sim.xl("unpause", "rt")
    wait(lambda: digest(sim, "rt") != saved)
    # A CFG given to restore replaces the saved config (name, vTPM uuid); memory must still match.
    other = str(uuidlib.uuid4())
    sim.xl("restore", "-p", write_cfg(sim, "rt-copy", vtpm=f"backend=vtpmmgr,uuid={other}"), str(save))
    assert digest(sim, "rt-copy") == saved
    assert xs_read(sim, f"/libxl/{sim.domid('rt-copy')}/device/vtpm/0/uuid") == other
    proc = sim.xl("restore", write_cfg(sim, "rt-big", memory=32), str(save), check=False)
    assert proc.returncode == 1 and "does not match the saved domain's 16 MiB" in proc.stderr


def test_save_and_restore_through_fifos(sim, tmp_path):
    sim.xl("create", write_cfg(sim, "ff"))
    fifo, copy = tmp_path / "fifo", tmp_path / "copy.save"
    os.mkfifo(fifo)
    reader = threading.Thread(target=lambda: copy.write_bytes(fifo.read_bytes()))
    reader.start()
    sim.xl("save", "-p", "ff", str(fifo))
    reader.join(30)
    saved = digest(sim, "ff")
    sim.xl("destroy", "ff")
    writer = threading.Thread(target=lambda: fifo.write_bytes(copy.read_bytes()))
    writer.start()
    sim.xl("restore", "-p", str(fifo))
    writer.join(30)
    assert digest(sim, "ff") == saved


def test_save_c_keeps_running_and_plain_save_destroys(sim, tmp_path):
    sim.xl("create", write_cfg(sim, "cc"))
    sim.xl("save", "-c", "cc", str(tmp_path / "c.save"))
    after = digest(sim, "cc")
    wait(lambda: digest(sim, "cc") != after)       # running again
    sim.xl("save", "cc", str(tmp_path / "plain.save"))
    assert state_of(sim, "cc") is None


@pytest.mark.parametrize("case", ["bad_cfg", "unknown_dom", "truncated", "magic", "bad_backend", "usage",
                                  "zero_memory"])
def test_bad_input_one_line_errors(sim, tmp_path, case):
    if case == "bad_cfg":
        cfg = tmp_path / "bad.cfg"
        cfg.write_text('name="x"\nmemory=[\n')
        proc = sim.xl("create", str(cfg), check=False)
        want = f"{cfg}:3:"
    elif case == "unknown_dom":
        proc = sim.xl("pause", "ghost", check=False)
        want = "ghost is an invalid domain identifier"
    elif case == "zero_memory":
        proc = sim.xl("create", write_cfg(sim, "tiny", memory=0), check=False)
        want = "memory=0 must be a whole number of MiB"
    elif case == "bad_backend":
        proc = sim.xl("create", write_cfg(sim, "orphan", vtpm="backend=nobody"), check=False)
        want = "'nobody' is not a domain"
    elif case == "usage":
        proc = sim.xl("save", "x", check=False)
        assert proc.returncode == 2 and "requires at least 2 arguments" in proc.stderr
        return
    else:
        sim.xl("create", write_cfg(sim, "victim"))
        good = tmp_path / "good.save"
        sim.xl("save", "victim", str(good))
        bad = tmp_path / "bad.save"
        data = good.read_bytes()
        bad.write_bytes(data[: len(data) // 2] if case == "truncated" else b"Q" + data[1:])
        proc = sim.xl("restore", str(bad), check=False)
        want = "truncated inside" if case == "truncated" else "wrong magic"
        assert state_of(sim, "victim") is None    # nothing half-restored is left
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    errors = [ln for ln in proc.stderr.splitlines() if ln and not ln.startswith(("Parsing", "Loading"))]
    assert len(errors) == 1 and want in errors[0], proc.stderr
