"""No plaintext vTPM secret in any file, with the swtpm backend (issue 14, item 4).

The guest (tpm2-tools over its TPM) stores a random secret in an NV index and makes its EK persistent
(RSA: the TPM keeps the EK's private prime in its NV).  Then the tool snapshots, saves to a file,
restores and rolls back.  Every file the tool and the simulator wrote meanwhile -- the state dir (store,
journal, swtpm state), the save file, spools, logs, libxl's qemu-save/qemu-resume stand-ins, sockets'
dirs, the recorded `xl save` streams -- must hold neither the NV secret nor either EK prime, raw, in hex
or in base64.

The needles are not guessed: the test decrypts the vTPM's permanent state the way only a holder of the
host key can (unseal it with the host TPM, derive the vTPM's state key, load a copy of the state in a
throw-away swtpm without a migration key, CMD_GET_STATEBLOB decrypted), finds the NV secret in it and the
prime that divides the EK's public modulus.  So the scan would find them if any file held that state in
clear -- the last test proves it does, on a planted copy.
"""
from __future__ import annotations

import base64
import os
import shutil
import socket
import struct
import subprocess
import time
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from e2e_helpers import GUEST, e2e_host, provision_guest_tpm
from sim_fixture import swtpm_home

from xen_vtpm.config import Config
from xen_vtpm.host.keys import derive_keys
from xen_vtpm.host.session import HOSTKEY
from xen_vtpm.host.tpm import HostTpm, SealedBlob
from xen_vtpm.vtpm import swtpm as swtpm_backend
from xen_vtpm_sim.devicemodel import read_tpm_section
from xen_vtpm_sim.savestream import read_save

NV_INDEX = "0x1500030"
EK_HANDLE = "0x81010001"
BLOB_FLAG_MIGRATION_ENCRYPTED = 0x02


def _forms(value: bytes) -> list[bytes]:
    return [value, value.hex().encode(), value.hex().upper().encode(), base64.b64encode(value),
            base64.b64encode(value).rstrip(b"=")]


def _scan(roots: list[Path], needles: dict[str, bytes]) -> list[str]:
    found = []
    for root in roots:
        for dirpath, _, names in os.walk(root):
            for name in names:
                path = Path(dirpath, name)
                if not path.is_file() or path.is_symlink():
                    continue
                data = path.read_bytes()
                found += [f"{path}: {what}" for what, value in needles.items()
                          if any(form in data for form in _forms(value))]
    return found


def _ctrl(sock: socket.socket, cmd: int, body: bytes, n: int) -> bytes:
    sock.sendall(struct.pack(">I", cmd) + body)
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        assert chunk, "swtpm closed its control socket"
        out += chunk
    return out


def plaintext_permanent_state(h, where: Path) -> bytes:
    """The vTPM's permanent state in clear, as only the holder of the host key can get it."""
    cfg = Config.load(h.env["XEN_VTPM_CONFIG"])
    tpm = HostTpm(cfg.tcti, cfg.pcrs, cfg.primary_handle)
    try:
        host_key = tpm.unseal(SealedBlob.load(Path(cfg.state_dir) / HOSTKEY), "host key")
    finally:
        tpm.close()
    home = swtpm_home(h.sim)
    state_key, _ = swtpm_backend.derive_keys(derive_keys(host_key).swtpm, home.name)
    copy = where / "state"
    shutil.copytree(home / "state", copy)
    (copy / ".lock").unlink(missing_ok=True)
    sock_path = where / "c.sock"
    r, w = os.pipe()
    os.write(w, state_key)
    os.close(w)
    try:
        subprocess.run(["swtpm", "socket", "--tpm2", "--daemon", "--tpmstate", f"dir={copy}",
                        "--ctrl", f"type=unixio,path={sock_path}", "--key", f"fd={r},mode=aes-256-cbc,format=binary",
                        "--log", "file=-"], pass_fds=[r], check=True, timeout=30)
    finally:
        os.close(r)
    deadline = time.monotonic() + 10
    while not sock_path.exists():
        assert time.monotonic() < deadline, "the throw-away swtpm did not start"
        time.sleep(0.01)
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(sock_path))
        assert _ctrl(s, 0x02, struct.pack(">I", 0), 4) == bytes(4), "the copy does not load with the state key"
        rc, _, total, length = struct.unpack(">IIII", _ctrl(s, 0x0C, struct.pack(">III", 1, 1, 0), 16))
        assert rc == 0 and total == length
        blob = b""
        while len(blob) < length:
            blob += s.recv(length - len(blob))
        _ctrl(s, 0x03, b"", 4)
    return blob


def ek_primes(blob: bytes, modulus: int) -> tuple[bytes, bytes]:
    """The 128-byte window of the plaintext state that divides the EK's 2048-bit modulus: its prime."""
    for i in range(len(blob) - 127):
        p = int.from_bytes(blob[i:i + 128], "big")
        if p > 1 and modulus % p == 0 and p != modulus:
            return blob[i:i + 128], (modulus // p).to_bytes(128, "big")
    raise AssertionError("no EK prime in the vTPM's permanent state (is the EK persistent?)")


@pytest.fixture(scope="module")
def host(tmp_path_factory):
    with e2e_host(tmp_path_factory.mktemp("swsec"), backend="swtpm") as h:
        yield h


def test_no_plaintext_vtpm_secret_in_any_file(host, tmp_path_factory):
    h = host
    tcti = h.tcti()
    provision_guest_tpm(tcti)
    secret = os.urandom(32)
    work = tmp_path_factory.mktemp("guestside")    # outside the scanned tree: the guest's own files
    (work / "secret").write_bytes(secret)
    h.sim.run(["tpm2_nvdefine", "-T", tcti, NV_INDEX, "-C", "o", "-s", "32", "-a", "ownerread|ownerwrite"])
    h.sim.run(["tpm2_nvwrite", "-T", tcti, NV_INDEX, "-C", "o", "-i", str(work / "secret")])
    h.sim.run(["tpm2_createek", "-T", tcti, "-c", EK_HANDLE, "-G", "rsa", "-u", str(work / "ek.pub")])
    h.sim.run(["tpm2_readpublic", "-T", tcti, "-c", EK_HANDLE, "-f", "pem", "-o", str(work / "ek.pem")])
    modulus = load_pem_public_key((work / "ek.pem").read_bytes()).public_numbers().n

    h.snapshot("sec-1")
    save_file = h.dir.parent / "guest1.save"          # under the scanned tree
    h.tool("save", GUEST, str(save_file))
    h.tool("restore", str(save_file))
    h.tool("rollback", GUEST, "sec-1", "--yes")
    read = work / "readback"
    h.sim.run(["tpm2_nvread", "-T", h.tcti(), NV_INDEX, "-C", "o", "-s", "32", "-o", str(read)])
    assert read.read_bytes() == secret, "the rolled-back vTPM lost the guest's NV secret"

    plain = plaintext_permanent_state(h, tmp_path_factory.mktemp("decrypt"))
    assert secret in plain, "the decrypted state lacks the NV secret: the needles would prove nothing"
    p, q = ek_primes(plain, modulus)

    # The save file's tpm-emulator section carries the state only under the migration key.
    memory = bytearray(16 << 20)
    with open(save_file, "rb") as fh:
        info = read_save(fh, memory)
    blobs = read_tpm_section(info.emulator_context)
    assert blobs and blobs[0][1], "the save file has no tpm-emulator section"
    assert all(struct.unpack_from(">H", b, 4)[0] & BLOB_FLAG_MIGRATION_ENCRYPTED for _, b in blobs if b)
    assert not list((h.dir / "var" / "lib" / "xen").glob("qemu-save.*")), "qemu-save.<domid> left after a capture"

    found = _scan([h.dir.parent], {"NV secret": secret, "EK prime p": p, "EK prime q": q})
    assert not found, "plaintext vTPM secrets on disk:\n" + "\n".join(found)


def test_the_scan_finds_a_planted_plaintext_state(host, tmp_path_factory):
    """Not vacuous: a base64 copy of the plaintext state around the NV secret, planted in a log, is found.
    (Runs after the test above, which defined the NV index.)"""
    h = host
    plain = plaintext_permanent_state(h, tmp_path_factory.mktemp("decrypt2"))
    read = tmp_path_factory.mktemp("guestside2") / "secret"
    h.sim.run(["tpm2_nvread", "-T", h.tcti(), NV_INDEX, "-C", "o", "-s", "32", "-o", str(read)])
    at = plain.index(read.read_bytes())
    piece = plain[max(0, at - 16):at + 48]
    planted = h.dir / "logs" / "planted.log"
    try:
        planted.write_bytes(b"x" + base64.b64encode(piece) + b"y")
        assert _scan([h.dir.parent], {"state": piece}) == [f"{planted}: state"]
    finally:
        planted.unlink()
