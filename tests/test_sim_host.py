"""`xen-vtpm sim up/create/down`, the full guest → vTPM → manager chain, the demo, and CLI errors."""
import configparser
import os
import re
import subprocess
import sys

from sim_fixture import SimHost

from xen_vtpm.vtpm.vtpmblk import slot_fingerprints
from xen_vtpm_sim import domains


def tool(*args, env=None, check=False):
    return subprocess.run([sys.executable, "-m", "xen_vtpm", *args], capture_output=True, text=True,
                          timeout=120, env=dict(os.environ, **(env or {})), check=check)


def one_line_error(proc, code, *words):
    assert proc.returncode == code, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("xen-vtpm: "), proc.stderr
    for w in words:
        assert w in lines[0]


def logged(path, text, timeout=20):
    """xenconsoled writes a domain's console log a moment after the domain printed."""
    return domains.wait_until(lambda: text in path.read_text(), timeout, 0.05)


def test_up_create_chain_save_and_down_leave_nothing(tmp_path):
    d = tmp_path / "h"
    up = tool("sim", "up", "--dir", str(d))
    try:
        assert up.returncode == 0, up.stderr
        exports = dict(re.findall(r"^export (\w+)=(.*)$", up.stdout, re.M))
        assert set(exports) == {"XEN_VTPM_SIM_DIR", "XENSTORED_PATH", "XEN_VTPM_CONFIG", "PATH"}
        assert exports["PATH"].startswith(f"{d}/bin:")
        sim = SimHost(dir=d, env=dict(os.environ, **exports))
        cfg = configparser.ConfigParser()
        cfg.read(d / "config.ini")
        conf = cfg["xen-vtpm"]
        assert conf["state_dir"] == f"{d}/state" and conf["xl"] == f"{d}/bin/xl"
        assert conf["xenstore_path"] == f"{d}/xenstored.sock" and conf["log_dir"] == f"{d}/logs"
        assert re.fullmatch(r"swtpm:host=127\.0\.0\.1,port=\d+", conf["tcti"])
        # The tool's host TPM answers on that TCTI.
        sim.run(["tpm2_getrandom", "-T", conf["tcti"], "8", "--hex"])
        one_line_error(tool("sim", "up", "--dir", str(d)), 4, "already runs")

        sim.create_guest("g1", memory=16)
        names = [r.split()[0] for r in sim.xl("list").stdout.splitlines()[1:]]
        assert names == ["Domain-0", "vtpmmgr", "vtpm-g1", "g1"]
        assert (d / "images" / "vtpm-g1.img").stat().st_size == 2 << 20
        image = (d / "images" / "vtpm-g1.img").read_bytes()
        one_line_error(tool("sim", "create", "g1", "--dir", str(d)), 4, "already exists")
        assert (d / "images" / "vtpm-g1.img").read_bytes() == image    # the live vTPM's image untouched
        one_line_error(tool("sim", "create", "bad'name", "--dir", str(d)), 2, "invalid domain name")
        # The guest's vTPM is a TPM 2.0 that tpm2-tools can use.
        tcti = sim.tool("sim", "tcti", "g1").stdout.strip()
        sim.run(["tpm2_pcrextend", "-T", tcti, "16:sha256=" + "11" * 32])
        # Like Linux's xen-tpmfront the guest probed its TPM when it connected, and sends it nothing when
        # xl save suspends it: the vTPM's image does not move.
        assert logged(d / "logs" / "guest-g1.log", "TPM probe rc=0x0")
        slots = slot_fingerprints(d / "images" / "vtpm-g1.img")
        sim.xl("save", "-p", "g1", str(tmp_path / "g1.save"))
        assert logged(d / "logs" / "guest-g1.log", "suspended")
        assert slot_fingerprints(d / "images" / "vtpm-g1.img") == slots
        assert domains.owned_pids(d)
    finally:
        down = tool("sim", "down", "--dir", str(d))
    assert down.returncode == 0, down.stderr
    assert domains.owned_pids(d) == []
    assert not (d / "xenstored.sock").exists()


def test_stock_manager_has_no_checkpoint_feature(tmp_path):
    d = tmp_path / "h"
    assert tool("sim", "up", "--dir", str(d), "--stock-manager").returncode == 0
    try:
        assert "checkpoint=0" in (d / "images" / "vtpmmgr.cfg").read_text()
        sim = SimHost(dir=d, env=dict(os.environ, XENSTORED_PATH=str(d / "xenstored.sock")))
        mgr = sim.domid("vtpmmgr")
        # The same client, socket and permissions read the manager's own nodes, so the failure below
        # can only mean the node is absent (as for a stock vtpmmgr), not that XenStore did not answer.
        assert sim.run(["xenstore-read", f"/local/domain/{mgr}/name"]).stdout.strip() == "vtpmmgr"
        assert "data" in sim.run(["xenstore-list", f"/local/domain/{mgr}"]).stdout.split()
        proc = sim.run(["xenstore-read", f"/local/domain/{mgr}/data/vtpmmgr/feature-checkpoint"], check=False)
        assert proc.returncode == 1 and proc.stdout == "" and "couldn't read path" in proc.stderr, proc
    finally:
        assert tool("sim", "down", "--dir", str(d)).returncode == 0
    assert domains.owned_pids(d) == []


def test_cli_errors_are_one_line_with_distinct_codes(tmp_path):
    one_line_error(tool("sim", "memdigest", "ghost", "--dir", str(tmp_path)), 3, "ghost")
    one_line_error(tool("sim", "create", "g", "--dir", str(tmp_path)), 4, "no simulated host")
    env = {k: v for k, v in os.environ.items() if k != "XEN_VTPM_SIM_DIR"}
    proc = subprocess.run([sys.executable, "-m", "xen_vtpm", "sim", "down"], capture_output=True, text=True,
                          env=env, timeout=60)
    one_line_error(proc, 2, "--dir")
    # XenStore down: the config names a socket nobody listens on.
    conf = tmp_path / "c.ini"
    conf.write_text(f"[xen-vtpm]\nxenstore_path = {tmp_path}/none.sock\nxl = {tmp_path}/no-xl\n")
    one_line_error(tool("--config", str(conf), "list"), 9)
