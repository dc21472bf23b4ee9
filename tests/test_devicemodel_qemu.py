"""The simulated device model against real QEMU (Debian's qemu-system-x86, TCG) and a real swtpm.

Each side runs against its own swtpm (state and migration keys, log level 20, which logs every control
command it receives).  Real QEMU boots paused, migrates to a file (its tpm-emulator section is the
same vmstate a Xen device model puts in qemu-save.<domid>), and a second QEMU takes that file as an
incoming migration.  The simulated device model does a fresh boot, xen-save-devices-state, and an
incoming start from that state.  The tests assert that both send swtpm the same control commands, in
the same order and with the same flags, that the tpm-emulator sections have the same layout, and that
each can load what the other wrote (so the simulator's state files stand for QEMU's).
"""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
from xs_fixture import start_xenstored

from xen_vtpm.xen.devicemodel import tpm_args
from xen_vtpm_sim import devicemodel

QEMU = "qemu-system-x86_64"
KEYS = (("--key", b"\x11" * 32), ("--migration-key", b"\x22" * 32))


def swtpm(state: Path, sock: Path, log: Path) -> None:
    state.mkdir()
    fds, args = [], []
    for option, key in KEYS:
        r, w = os.pipe()
        os.write(w, key)
        os.close(w)
        fds.append(r)
        args += [option, f"fd={r},mode=aes-256-cbc,format=binary"]
    try:
        subprocess.run(["swtpm", "socket", "--tpm2", "--daemon", "--tpmstate", f"dir={state}",
                        "--ctrl", f"type=unixio,path={sock}", *args, "--log", f"file={log},level=20"],
                       pass_fds=fds, check=True, timeout=30)
    finally:
        for fd in fds:
            os.close(fd)
    _wait(sock.exists, "swtpm did not open its control socket")


def _wait(cond, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.02)


def control_commands(log: Path) -> list[tuple[int, bytes]]:
    """(code, body) of every control command swtpm logged (level 20 prints each as hex)."""
    out = []
    lines = log.read_text().splitlines()
    for i, line in enumerate(lines):
        if line.strip().startswith("Ctrl Cmd:"):
            raw = bytes.fromhex("".join(lines[i + 1].split()))
            out.append((struct.unpack(">I", raw[:4])[0], raw[4:]))
    return out


def shape(cmds: list[tuple[int, bytes]]) -> list[str]:
    """The command codes, with the argument that matters: flags of INIT and of the state blobs."""
    names = {0x01: "GET_CAPABILITY", 0x02: "INIT", 0x03: "SHUTDOWN", 0x0C: "GET_STATEBLOB", 0x0D: "SET_STATEBLOB",
             0x0E: "STOP", 0x10: "SET_DATAFD", 0x11: "SET_BUFFERSIZE"}
    out = []
    for code, body in cmds:
        name = names.get(code, hex(code))
        if code in (0x02, 0x0C, 0x0D, 0x11):
            name += f"({struct.unpack('>I', body[:4])[0]:#x})"
        out.append(name)
    return out


def qmp(path: Path, *commands: dict) -> list[dict]:
    with socket.socket(socket.AF_UNIX) as s:
        _wait(lambda: _connects(s, path), f"no QMP on {path}")
        f = s.makefile("rwb")
        f.readline()
        out = []
        for cmd in ({"execute": "qmp_capabilities"}, *commands):
            f.write(json.dumps(cmd).encode() + b"\n")
            f.flush()
            while "event" in (answer := json.loads(f.readline())):
                pass
            out.append(answer)
        return out


def _connects(s: socket.socket, path: Path) -> bool:
    try:
        s.connect(str(path))
        return True
    except OSError:
        return False


def run_qemu(tmp: Path, sock: Path, name: str, *extra: str) -> subprocess.Popen:
    qsock = tmp / f"{name}.qmp"
    with open(tmp / f"{name}.log", "ab") as log:
        proc = subprocess.Popen([QEMU, "-machine", "pc,accel=tcg", "-nodefaults", "-display", "none", "-S",
                                 "-m", "32", *tpm_args(sock, tag="tpm0"), "-qmp", f"unix:{qsock},server=on,wait=off",
                                 *extra], stdout=log, stderr=log)
    proc.qmp_path = qsock  # type: ignore[attr-defined]
    return proc


def migration_done(qsock: Path) -> str:
    status = ""

    def done() -> bool:
        nonlocal status
        status = qmp(qsock, {"execute": "query-migrate"})[-1]["return"].get("status", "")
        return status in ("completed", "failed")
    _wait(done, "migration did not end")
    return status


def tpm_section_of_migration(stream: bytes) -> list[tuple[int, bytes]]:
    """The tpm-emulator section of a full QEMU migration stream (RAM, other devices and section
    footers around it): FULL header, then the fields a Xen device model writes too."""
    name = b"tpm-emulator"
    at = stream.index(bytes([len(name)]) + name)
    assert stream[at - 5] == devicemodel.QEMU_VM_SECTION_FULL
    instance, version = struct.unpack_from(">II", stream, at + 1 + len(name))
    assert (instance, version) == (0, devicemodel.TPM_SECTION_VERSION)
    header = devicemodel.write_device_state([])[:8]
    body_at = at + 1 + len(name) + 8
    return devicemodel.read_tpm_section(header + bytes([devicemodel.QEMU_VM_SECTION_FULL]) + stream[at - 4:body_at]
                                        + _three_blobs(stream, body_at) + bytes([devicemodel.QEMU_VM_EOF]))


def _three_blobs(stream: bytes, pos: int) -> bytes:
    start = pos
    for _ in range(3):
        _, size = struct.unpack_from(">II", stream, pos)
        pos += 8 + size
    return stream[start:pos]


@pytest.fixture(scope="module")
def qemu_runs(tmp_path_factory):
    """Real QEMU: a paused boot migrated to a file, then an incoming QEMU from it."""
    tmp = tmp_path_factory.mktemp("qemu")
    swtpm(tmp / "st1", tmp / "s1.sock", tmp / "sw1.log")
    q = run_qemu(tmp, tmp / "s1.sock", "q1")
    qmp(q.qmp_path, {"execute": "migrate", "arguments": {"uri": f"exec:cat > {tmp / 'mig'}"}})
    assert migration_done(q.qmp_path) == "completed"
    qmp(q.qmp_path, {"execute": "quit"})
    assert q.wait(30) == 0
    swtpm(tmp / "st2", tmp / "s2.sock", tmp / "sw2.log")
    q = run_qemu(tmp, tmp / "s2.sock", "q2", "-incoming", f"exec:cat {tmp / 'mig'}")
    assert migration_done(q.qmp_path) == "completed"
    qmp(q.qmp_path, {"execute": "quit"})
    assert q.wait(30) == 0
    return tmp


@pytest.fixture(scope="module")
def sim_runs(tmp_path_factory):
    """The simulated device model: a fresh boot, xen-save-devices-state, then an incoming start."""
    tmp = tmp_path_factory.mktemp("simdm")
    sock_path, stop_xs = start_xenstored(tmp)
    env = dict(os.environ, XENSTORED_PATH=sock_path, XEN_VTPM_SIM_DIR=str(tmp),
               PYTHONPATH=os.pathsep.join(filter(None, [str(Path(devicemodel.__file__).parents[1]),
                                                        os.environ.get("PYTHONPATH")])))
    (tmp / "run").mkdir()
    try:
        swtpm(tmp / "st1", tmp / "s1.sock", tmp / "sw1.log")
        dm = subprocess.Popen([sys.executable, "-m", "xen_vtpm_sim.devicemodel", "-xen-domid", "5", "-name", "g",
                               "-qmp", f"unix:{devicemodel.qmp_path(tmp, 5)},server=on,wait=off",
                               *tpm_args(tmp / "s1.sock")], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.STDOUT)
        state = tmp / "qemu-save.5"
        _wait(lambda: devicemodel.qmp_path(tmp, 5).exists(), "the device model did not start")
        devicemodel.qmp(tmp, 5, "stop")
        devicemodel.qmp(tmp, 5, "xen-save-devices-state", filename=str(state), live=False)
        dm.send_signal(signal.SIGHUP)    # as libxl ends it
        assert dm.wait(30) == 0
        swtpm(tmp / "st2", tmp / "s2.sock", tmp / "sw2.log")
        fd = os.open(state, os.O_RDONLY)
        try:
            dm = subprocess.Popen([sys.executable, "-m", "xen_vtpm_sim.devicemodel", "-xen-domid", "6", "-name", "g",
                                   "-qmp", f"unix:{devicemodel.qmp_path(tmp, 6)},server=on,wait=off",
                                   "-incoming", f"fd:{fd}", *tpm_args(tmp / "s2.sock")], env=env, pass_fds=[fd],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
        finally:
            os.close(fd)
        _wait(lambda: devicemodel.qmp_path(tmp, 6).exists() or dm.poll() is not None, "no incoming device model")
        assert dm.poll() is None, "the incoming device model failed"
        dm.send_signal(signal.SIGHUP)
        assert dm.wait(30) == 0
    finally:
        stop_xs()
    return tmp


def _until_blobs(cmds: list[str]) -> list[str]:
    return cmds[:next(i for i, c in enumerate(cmds) if c.startswith(("GET_STATEBLOB", "SET_STATEBLOB"))) + 3]


def test_fresh_boot_and_save_send_what_qemu_sends(qemu_runs, sim_runs):
    real = shape(control_commands(qemu_runs / "sw1.log"))
    sim = shape(control_commands(sim_runs / "sw1.log"))
    # QEMU quits at once; the simulator's guest is one more `stop` (QMP, no TPM command) away.
    assert real == ["SET_DATAFD", "GET_CAPABILITY", "STOP", "SET_BUFFERSIZE(0x0)", "STOP", "SET_BUFFERSIZE(0xf80)",
                    "INIT(0x0)", "GET_STATEBLOB(0x1)", "GET_STATEBLOB(0x1)", "GET_STATEBLOB(0x1)", "SHUTDOWN"], real
    assert sim == real


def test_incoming_sends_what_qemu_sends(qemu_runs, sim_runs):
    real = shape(control_commands(qemu_runs / "sw2.log"))
    sim = shape(control_commands(sim_runs / "sw2.log"))
    assert real == ["SET_DATAFD", "GET_CAPABILITY", "STOP", "SET_BUFFERSIZE(0x0)", "STOP", "SET_BUFFERSIZE(0xf80)",
                    "STOP", "SET_STATEBLOB(0x0)", "SET_STATEBLOB(0x0)", "INIT(0x1)", "SHUTDOWN"], real
    assert sim == real


def test_the_tpm_emulator_sections_have_one_layout(qemu_runs, sim_runs):
    real = tpm_section_of_migration((qemu_runs / "mig").read_bytes())
    sim = devicemodel.read_tpm_section((sim_runs / "qemu-save.5").read_bytes())
    for blobs in (real, sim):
        assert [flags for flags, _ in blobs] == [0, 0, 0]           # state flags: not file-key encrypted
        assert blobs[0][1] and blobs[1][1] and not blobs[2][1]       # TPM 2: no savestate blob
        for _, blob in blobs[:2]:                                     # swtpm's header: migration-encrypted
            assert struct.unpack_from(">H", blob, 4)[0] & 0x02
    assert (qemu_runs / "st2" / "tpm2-00.permall").exists() and (sim_runs / "st2" / "tpm2-00.permall").exists()


def test_swtpm_logs_at_level_20_show_command_bytes_only_encrypted(qemu_runs):
    """Why the tool runs swtpm at log level 1: level 20 dumps control traffic, blobs included."""
    assert re.search(r"Ctrl Rsp Continued:", (qemu_runs / "sw1.log").read_text())
