"""Two simulated hosts for the move tests: A (the e2e host of e2e_helpers, guest1 running, its `xl
save` streams recorded) and B (initialised, empty), each trusting the other's `xen-vtpm host-key`.

Each host is a directory with its own xenstored, xl, vtpmmgr and physical TPMs; `xen-vtpm sim ssh HOST`
is the `-s` of `xen-vtpm migrate`, exactly as an administrator would type it.  The virtualenv's bin
directory is on PATH, since the remote end runs `xen-vtpm migrate-receive` by name, like xl.
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import stat
import sys
import uuid as uuidlib
from collections.abc import Iterator
from pathlib import Path

from e2e_helpers import GUEST, E2EHost, _install_recording_xl, esapi
from sim_fixture import SimHost, start_sim_host, stop_sim_host
from tpm2_pytss.constants import ESYS_TR
from tpm2_pytss.types import TPM2B_PUBLIC

from xen_vtpm.xen.xlcfg import load_cfg, parse_vtpm
from xen_vtpm_sim.mgrdisk import MgrDisk, PtpmSealer

SSH = "xen-vtpm sim ssh"
VENV_BIN = str(Path(sys.executable).parent)
FAULTY_TOOL = Path(__file__).resolve().parent / "faulty_tool.py"


def with_venv(env: dict[str, str]) -> dict[str, str]:
    return dict(env, PATH=VENV_BIN + os.pathsep + env["PATH"])


@dataclasses.dataclass
class Pair:
    a: E2EHost
    b: E2EHost
    keys: dict[str, Path]          # host name -> its host-key file

    def migrate(self, *args: str, src: E2EHost | None = None, dst: E2EHost | None = None, expect: int = 0,
                ssh: str = SSH, guest: str = GUEST):
        src, dst = src or self.a, dst or self.b
        return src.tool("migrate", "-s", ssh, *args, guest, str(dst.dir), expect=expect, timeout=300)


def _host(base: Path, name: str, *, guest: bool, auth_file: Path | None) -> E2EHost:
    sim = start_sim_host(base / name)
    try:
        sim.env = with_venv(sim.env)
        tooldir = base / f"tool-{name}"
        tooldir.mkdir()
        config, records = _install_recording_xl(sim, tooldir)
        host = E2EHost(sim=sim, env=dict(sim.env, XEN_VTPM_CONFIG=str(config)), records=records)
        host.tool("init", *(["--rollback-auth-file", str(auth_file)] if auth_file else []))
        if guest:
            host.tool("sim", "create", GUEST, "--memory", "16")
    except BaseException:
        stop_sim_host(sim)
        raise
    return host


@contextlib.contextmanager
def two_hosts(base: Path, *, auth_file: Path | None = None, trust: bool = True) -> Iterator[Pair]:
    hosts: list[E2EHost] = []
    try:
        hosts.append(_host(base, "A", guest=True, auth_file=auth_file))
        hosts.append(_host(base, "B", guest=False, auth_file=None))
        keys = {}
        for name, h in zip("AB", hosts, strict=True):
            keys[name] = base / f"{name}.hostkey"
            keys[name].write_text(h.tool("host-key").stdout)
        pair = Pair(hosts[0], hosts[1], keys)
        if trust:
            pair.a.tool("trust", "add", "hostB", str(keys["B"]))
            pair.b.tool("trust", "add", "hostA", str(keys["A"]))
        yield pair
    finally:
        for h in hosts:
            stop_sim_host(h.sim)


# --- what the tests observe ------------------------------------------------------------------------

def ek_public(tcti: str) -> bytes:
    """The vTPM's endorsement key (ECC template), what a remote verifier knows the guest's TPM by."""
    with esapi(tcti) as ectx:
        handle, public, *_ = ectx.create_primary(None, TPM2B_PUBLIC.parse("ecc256"), ESYS_TR.ENDORSEMENT)
        ectx.flush_context(handle)
    return public.marshal()


def manager_table(host: SimHost | E2EHost) -> dict[str, tuple[int, bytes]]:
    """uuid (canonical) -> (flags, 64 data bytes) of the host's vtpmmgr, read from its sealed disk."""
    d = host.dir
    disk = MgrDisk(d / "images" / "vtpmmgr.img", PtpmSealer((d / "run" / "ptpm.tcti").read_text().strip()))
    table = disk.load() or {}
    return {str(uuidlib.UUID(bytes=k)): (e.flags, e.data) for k, e in table.items()}


FLAG_REMOVED = 0x10


def live_entries(host: SimHost | E2EHost) -> dict[str, bytes]:
    """The manager entries a vTPM or a checkpoint could still use (removed ones are scrubbed)."""
    return {u: data for u, (flags, data) in manager_table(host).items() if not flags & FLAG_REMOVED}


def vtpm_uuid(host: E2EHost, backend: str = f"vtpm-{GUEST}") -> str:
    cfg = load_cfg(str(host.dir / "images" / f"{backend}.cfg"))
    return str(parse_vtpm(cfg["vtpm"][0])["uuid"])


def state_files(host: E2EHost) -> dict[str, str]:
    """Every file of the state dir but the SQLite WAL bookkeeping, with its SHA-256: a refused move
    must leave them all exactly as they were."""
    out = {}
    for path in sorted(host.state_dir.rglob("*")):
        if path.is_file() and not path.name.endswith(("-wal", "-shm", ".lock")):
            out[str(path.relative_to(host.state_dir))] = hashlib.sha256(path.read_bytes()).hexdigest()
    return out


def snapshot_of(host: E2EHost) -> dict[str, object]:
    """What must not change on a host when a move is refused: its domains, vTPM files, manager
    table, state dir, journal and audit log."""
    images = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted((host.dir / "images").iterdir())
              if p.name != "vtpmmgr.img"}
    return {"domains": sorted(host.domids()), "images": images, "manager": manager_table(host),
            "state": state_files(host)}


# --- test stand-ins for the `-s` command -----------------------------------------------------------

def ssh_wrapper(where: Path, name: str, body: str) -> str:
    """A shell script usable as `-s`: it gets HOST and the remote command as arguments."""
    script = where / name
    script.write_text("#!/bin/sh\n" + body)
    script.chmod(script.stat().st_mode | stat.S_IXUSR)
    return str(script)


def capturing_ssh(where: Path) -> tuple[str, Path, Path]:
    """`-s` that records both directions of the stream (what someone on the wire would see)."""
    out_s, out_d = where / "wire-from-source", where / "wire-from-destination"
    body = (f'tee -a {out_s} | {SSH} "$@" | tee -a {out_d}\n')
    return ssh_wrapper(where, "capture-ssh", body), out_s, out_d


_FILTER = """import os, sys
flip, cut, seen = {flip}, {cut}, 0
while True:
    data = os.read(0, 1 << 16)          # whatever has arrived: the handshake must get through at once
    if not data:
        break
    if cut is not None and seen + len(data) >= cut:
        os.write(1, data[:cut - seen])
        break
    if flip is not None and seen <= flip < seen + len(data):
        data = data[:flip - seen] + bytes([data[flip - seen] ^ 1]) + data[flip - seen + 1:]
    os.write(1, data)
    seen += len(data)
"""


def filtering_ssh(where: Path, name: str, *, flip: int | None = None, cut: int | None = None) -> str:
    """`-s` whose wire alters the source's bytes on the way: one bit flipped at byte ``flip``, or
    everything from byte ``cut`` on dropped (the connection then closes)."""
    filt = where / f"{name}.py"
    filt.write_text(_FILTER.format(flip=flip, cut=cut))
    return ssh_wrapper(where, name, f'{sys.executable} {filt} | {SSH} "$@"\n')


def frames(data: bytes) -> list[tuple[bytes, bytes]]:
    """Split a captured stream into (tag, body) frames (transfer/wire.py framing)."""
    out, pos = [], 0
    while pos + 4 <= len(data):
        size = int.from_bytes(data[pos:pos + 4], "big")
        frame = data[pos + 4:pos + 4 + size]
        out.append((frame[:1], frame[1:]))
        pos += 4 + size
    return out


def hello_values(from_source: bytes, from_destination: bytes) -> dict[str, object]:
    """The session values a wire observer sees in clear: nonces, transfer id, ephemeral key."""
    s, d = frames(from_source), frames(from_destination)
    hello_s, hello_d, key = json.loads(s[0][1]), json.loads(d[0][1]), json.loads(s[1][1])
    return {"nonce_s": bytes.fromhex(hello_s["nonce"]), "nonce_d": bytes.fromhex(hello_d["nonce"]),
            "transfer": hello_d["transfer"], "ephemeral": bytes.fromhex(key["ephemeral"]),
            "records": [body for tag, body in s[2:] if tag == b"R"]}
