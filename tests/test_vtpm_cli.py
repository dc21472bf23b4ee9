"""`xen-vtpm vtpm add|import` and `list` for the swtpm backend, on the simulated host.

`import` adopts a TPM 2.0 that another tool ran with swtpm: the guest must find the objects it made in
it (an NV counter and a persistent key, read through its own TPM with tpm2-pytss), and the tool must
keep only an encrypted copy.  `add` and `import` refuse what cannot work (a guest without QEMU, a
directory that holds no TPM 2.0) with one line, exit 4, and the cfg and the tool's state as before.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
from pathlib import Path

import pytest
from e2e_helpers import provision_guest_tpm, tpm_state
from sim_fixture import initialised_host, swtpm_home, swtpm_pid
from tpm_fixture import _free_port_pair

GUEST = "imported"


def _tree(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _run_swtpm(state: Path) -> tuple[subprocess.Popen, str]:
    port = _free_port_pair()
    proc = subprocess.Popen(["swtpm", "socket", "--tpm2", "--tpmstate", f"dir={state}",
                             "--server", f"type=tcp,port={port},bindaddr=127.0.0.1",
                             "--ctrl", f"type=tcp,port={port + 1},bindaddr=127.0.0.1",
                             "--flags", "not-need-init,startup-clear"])
    return proc, f"swtpm:host=127.0.0.1,port={port}"


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with initialised_host(tmp_path_factory.mktemp("vc") / "h") as sim:
        yield sim


@pytest.fixture(scope="module")
def foreign_state(tmp_path_factory) -> tuple[Path, dict]:
    """A TPM 2.0 another tool ran with swtpm, with the objects a guest made in it."""
    state = tmp_path_factory.mktemp("foreign-swtpm")
    proc, tcti = _run_swtpm(state)
    try:
        made = None
        for _ in range(50):   # until swtpm listens
            try:
                made = provision_guest_tpm(tcti)
                break
            except Exception:   # noqa: BLE001 - tpm2-pytss raises several types before the socket is up
                if proc.poll() is not None:
                    raise
                subprocess.run(["sleep", "0.1"], check=True)
        assert made is not None, "swtpm never answered"
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    assert (state / "tpm2-00.permall").is_file()
    return state, made


def _refused(sim, *argv: str) -> str:
    proc = sim.tool(*argv, check=False)
    assert proc.returncode == 4, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def _unchanged(sim, cfg: Path, before_cfg: str, before_state: dict[str, bytes]) -> None:
    assert cfg.read_text() == before_cfg
    assert _tree(sim.dir / "state") == before_state


def test_add_refuses_a_guest_without_a_device_model(sim, tmp_path):
    cfg = tmp_path / "pvg.cfg"
    cfg.write_text('name="pvg"\ntype="pvh"\nmemory=16\n')
    before = _tree(sim.dir / "state")
    line = _refused(sim, "vtpm", "add", "pvg", "--backend", "swtpm", "--cfg", str(cfg))
    assert "pvg" in line and "not an HVM guest" in line and "stub domain" in line
    _unchanged(sim, cfg, 'name="pvg"\ntype="pvh"\nmemory=16\n', before)


def test_import_refuses_a_directory_without_a_tpm2(sim, tmp_path):
    cfg = tmp_path / "h2.cfg"
    cfg.write_text('name="h2"\ntype="hvm"\nmemory=16\n')
    empty = tmp_path / "not-a-tpm"
    empty.mkdir()
    (empty / "tpm-00.permall").write_bytes(b"a TPM 1.2 state file")
    before = _tree(sim.dir / "state")
    line = _refused(sim, "vtpm", "import", "h2", "--swtpm-state", str(empty), "--cfg", str(cfg))
    assert str(empty) in line and "tpm2-00.permall" in line
    _unchanged(sim, cfg, 'name="h2"\ntype="hvm"\nmemory=16\n', before)


def test_import_adopts_the_tpm_and_keeps_it_encrypted(sim, foreign_state):
    state, made = foreign_state
    plain = (state / "tpm2-00.permall").read_bytes()
    sim.tool("sim", "create", GUEST, "--vtpm", "swtpm", "--swtpm-state", str(state), timeout=120)

    seen = tpm_state(sim.tool("sim", "tcti", GUEST).stdout.strip())
    # PCRs reset at every TPM start; the NV counter and the persistent key are the imported TPM's own.
    assert seen["counter"] == made["counter"] and seen["persistent"] == made["persistent"]

    home = swtpm_home(sim, GUEST)
    kept = (home / "state" / "tpm2-00.permall").read_bytes()
    assert kept != plain
    window = plain[len(plain) // 2: len(plain) // 2 + 48]   # the middle of the plaintext state: key material
    leaked = [name for name, data in _tree(sim.dir / "state").items() if window in data]
    assert leaked == [], f"plaintext swtpm state in {leaked}"

    rows = json.loads(sim.tool("--json", "list").stdout)
    (row,) = [r for r in rows if r["name"] == GUEST]
    (vtpm,) = row["vtpms"]
    assert vtpm["backend_name"] == "swtpm" and vtpm["uuid"] == home.name and vtpm["uuid_check"] == "ok"
    assert "swtpm (0)" in sim.tool("list").stdout


def _start_refused(sim, guest: str) -> str:
    proc = sim.tool("vtpm", "start", guest, check=False)
    assert proc.returncode == 5, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    return lines[0]


def test_start_refuses_a_state_that_is_gone_or_another_vtpms(sim):
    """Negative controls of the proof that an swtpm loaded its vTPM's own state: without the permanent
    state swtpm would manufacture a new TPM (a new EK), and with another vTPM's it would not be this one.
    `vtpm start` refuses both (exit 5), leaves no swtpm running and writes no state; with the state put
    back it starts."""
    for name in ("nc1", "nc2"):
        sim.tool("sim", "create", name, "--vtpm", "swtpm", timeout=120)
        sim.xl("destroy", name)                              # its swtpm ends with its device model
        assert swtpm_pid(sim, name) is None
    permall = swtpm_home(sim, "nc1") / "state" / "tpm2-00.permall"
    own = permall.read_bytes()

    permall.unlink()
    line = _start_refused(sim, "nc1")
    assert "no permanent state" in line and "fresh TPM" in line, line
    assert not permall.exists() and swtpm_pid(sim, "nc1") is None

    other = (swtpm_home(sim, "nc2") / "state" / "tpm2-00.permall").read_bytes()
    permall.write_bytes(other)
    line = _start_refused(sim, "nc1")
    assert "cannot load its state" in line, line
    assert permall.read_bytes() == other and swtpm_pid(sim, "nc1") is None

    permall.write_bytes(own)
    sim.tool("vtpm", "start", "nc1")
    pid = swtpm_pid(sim, "nc1")
    assert pid is not None and permall.read_bytes() == own
    os.kill(pid, signal.SIGTERM)
