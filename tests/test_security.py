"""Security checks (issue 7 item 5) on a simulated host, end to end.

* XenStore authorization: a non-dom0 client (the guest's and the vTPM stub domain's own domain socket
  `<sock>.d<domid>`, through the project's client and through Debian's xenstore-read/-write C clients)
  cannot create or alter a manager request, nor read the request and response nodes of a checkpoint
  while the tool runs one; the tool's request nodes carry `n0 r<M>` (docs/protocol.md §3).
* No secret anywhere: the host key (unsealed here from `sealed/hostkey.json` with the host TPM) and its
  sub-keys, every `K` the manager holds (read from the manager's disk with its "physical" TPM, and
  proven to be the live one by decrypting the vTPM image with it), the manager's table key, and vTPM
  plaintext (an NV value written by the guest) must not appear, raw, in hex or in base64, in any file
  under the host dir (logs, catalog, packs, manifests, temp dirs, images, the tool's files), any XenStore
  node, or any process's argv or environment -- while a snapshot and a rollback run and after them.
  One exclusion, for vTPM plaintext only: `run/swtpm-<vtpm>/` is the scratch state of the swtpm that
  stands in for the vTPM stub domain's own memory (docs/protocol.md §7); on a real host it is RAM.
* Modes: the state dir and every directory in it 0700, every file 0600 (checked during and after).
"""
from __future__ import annotations

import base64
import contextlib
import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import GUEST, E2EHost, e2e_host, esapi, provision_guest_tpm
from tpm2_pytss.constants import TPM2_ALG, TPMA_NV
from tpm2_pytss.types import TPM2B_NV_PUBLIC, TPMS_NV_PUBLIC

from xen_vtpm.config import Config
from xen_vtpm.errors import XenStoreNotFound, XenStorePermission
from xen_vtpm.host.keys import derive_keys
from xen_vtpm.host.session import HOSTKEY
from xen_vtpm.host.tpm import HostTpm, SealedBlob
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm_sim import vtpmblk
from xen_vtpm_sim.mgrdisk import MgrDisk, PtpmSealer

NV_SECRET_INDEX = 0x01800020
SCRATCH_PREFIX = "swtpm-"
MODE_PROBLEMS: set[str] = set()    # loose modes seen in the state dir by any test of this module


# --- the host and its secrets --------------------------------------------------------------

class Secrets:
    """Named byte strings that must never leave their process (or the vTPM, for plaintext)."""

    def __init__(self) -> None:
        self.keys: dict[str, bytes] = {}        # searched everywhere
        self.plaintext: dict[str, bytes] = {}   # searched everywhere but the vTPM's scratch state

    @staticmethod
    def forms(value: bytes) -> list[bytes]:
        return [value, value.hex().encode(), value.hex().upper().encode(), base64.b64encode(value),
                base64.b64encode(value).rstrip(b"=")]

    def needles(self, with_plaintext: bool) -> dict[bytes, str]:
        found = dict(self.keys, **(self.plaintext if with_plaintext else {}))
        return {form: name for name, value in found.items() for form in self.forms(value)}


def _host_key(h: E2EHost) -> bytes:
    cfg = Config.load(h.env["XEN_VTPM_CONFIG"])
    tpm = HostTpm(cfg.tcti, cfg.pcrs, cfg.primary_handle)
    try:
        return tpm.unseal(SealedBlob.load(Path(cfg.state_dir) / HOSTKEY), "host key")
    finally:
        tpm.close()


def _manager_entries(h: E2EHost) -> tuple[bytes, dict[bytes, bytes]]:
    """(table key, {uuid: 64-byte entry}) from the manager's disk, unsealed with its ptpm."""
    sealer = PtpmSealer((h.dir / "run" / "ptpm.tcti").read_text().strip())
    try:
        disk = MgrDisk(h.dir / "images" / "vtpmmgr.img", sealer)
        table = disk.load()
    finally:
        sealer.close()
    assert table, "the manager's disk holds no table"
    return disk.key, {uid: e.data for uid, e in table.items()}


def _collect_ks(h: E2EHost, s: Secrets) -> None:
    """Every K the manager holds now; one of them must open the vTPM image (so it is the real K)."""
    table_key, entries = _manager_entries(h)
    s.keys["manager table key"] = table_key
    image = h.vtpm_image()
    opened = False
    for uid, data in entries.items():
        k = data[vtpmblk.HASH_SIZE:vtpmblk.HASHKEY_SIZE]
        assert any(k), "an entry without K"
        s.keys[f"K of entry {uid.hex()} ({len(s.keys)})"] = k
        with contextlib.suppress(vtpmblk.ChecksumError):
            vtpmblk.load(image, data)
            opened = True
    assert opened, "no manager entry decrypts the vTPM image: K was not found"


def _write_nv_secret(tcti: str) -> bytes:
    """As the guest: an NV index holding 32 random bytes (vTPM plaintext nobody else may see)."""
    value = secrets.token_bytes(32)
    attrs = TPMA_NV.OWNERWRITE | TPMA_NV.OWNERREAD | TPMA_NV.AUTHREAD | TPMA_NV.AUTHWRITE | TPMA_NV.NO_DA
    public = TPM2B_NV_PUBLIC(nvPublic=TPMS_NV_PUBLIC(nvIndex=NV_SECRET_INDEX, nameAlg=TPM2_ALG.SHA256,
                                                     attributes=attrs, dataSize=32))
    with esapi(tcti) as ectx:
        handle = ectx.nv_define_space(b"", public)
        ectx.nv_write(handle, value)
        assert bytes(ectx.nv_read(handle, 32)) == value
    return value


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[tuple[E2EHost, Secrets]]:
    with e2e_host(tmp_path_factory.mktemp("sec")) as h:
        s = Secrets()
        tcti = h.tcti()
        provision_guest_tpm(tcti)
        s.plaintext["vTPM NV value"] = _write_nv_secret(tcti)
        host_key = _host_key(h)
        s.keys["host key"] = host_key
        for name, value in vars(derive_keys(host_key)).items():
            s.keys[f"sub-key {name}"] = value
        _collect_ks(h, s)
        yield h, s


# --- where secrets could end up ------------------------------------------------------------

def _files(root: Path) -> Iterator[Path]:
    for dirpath, _, names in os.walk(root):
        for name in names:
            p = Path(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISREG(p.lstat().st_mode):
                    yield p


def _hits(data: bytes, needles: dict[bytes, str]) -> list[str]:
    return sorted({name for form, name in needles.items() if form in data})


def scan_files(roots: list[Path], s: Secrets) -> list[str]:
    found = []
    for root in roots:
        for p in _files(root):
            scratch = any(part.startswith(SCRATCH_PREFIX) for part in p.relative_to(root).parts[:-1])
            try:
                data = p.read_bytes()
            except (FileNotFoundError, PermissionError):
                continue
            found += [f"{p.relative_to(root)}: {n}" for n in _hits(data, s.needles(with_plaintext=not scratch))]
    return found


def scan_xenstore(h: E2EHost, s: Secrets) -> list[str]:
    proc = subprocess.run(["xenstore-ls", "-f", "-p"], env=dict(os.environ, XENSTORED_PATH=_sock(h)),
                          capture_output=True, timeout=30)
    assert proc.returncode == 0 and b"/local/domain" in proc.stdout, proc.stderr
    return [f"xenstore: {n}" for n in _hits(proc.stdout, s.needles(with_plaintext=True))]


def scan_processes(s: Secrets) -> list[str]:
    found = []
    needles = s.needles(with_plaintext=True)
    for pid in (p for p in os.listdir("/proc") if p.isdigit()):
        for what in ("cmdline", "environ"):
            with contextlib.suppress(OSError):
                data = Path("/proc", pid, what).read_bytes()
                found += [f"/proc/{pid}/{what}: {n}" for n in _hits(data, needles)]
    return found


def bad_modes(state_dir: Path) -> list[str]:
    bad = []
    for dirpath, _dirnames, names in os.walk(state_dir):
        for p in [Path(dirpath)] + [Path(dirpath, n) for n in names]:
            with contextlib.suppress(FileNotFoundError):
                mode = p.lstat().st_mode
                if stat.S_ISDIR(mode) and stat.S_IMODE(mode) & 0o077:
                    bad.append(f"{p.relative_to(state_dir.parent)}/: {oct(stat.S_IMODE(mode))}")
                elif not stat.S_ISDIR(mode) and stat.S_IMODE(mode) & 0o077:
                    bad.append(f"{p.relative_to(state_dir.parent)}: {oct(stat.S_IMODE(mode))}")
    return bad


def _sock(h: E2EHost) -> str:
    return str(h.dir / "xenstored.sock")


def _tool_async(h: E2EHost, *args: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "xen_vtpm", *args], env=h.env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _while_running(proc: subprocess.Popen, probe, every: float = 0.05) -> list[str]:
    """Run probe() repeatedly until proc exits (at least once); collect what it reports."""
    found: list[str] = []
    while True:
        done = proc.poll() is not None
        found += probe()
        if done:
            break
        time.sleep(every)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, f"exit {proc.returncode}: {err}"
    return found


# --- 1. no secret anywhere, during and after a snapshot and a rollback ------------------------

def test_no_secret_during_and_after_snapshot_and_rollback(host):
    h, s = host
    roots = [h.dir.parent]                 # the sim dir and the tool's own dir (config, xl records)
    found: list[str] = []
    ckpt = None
    for argv in (["snapshot", GUEST, "--name", "sec-1"], None):
        if argv is None:
            argv = ["rollback", GUEST, ckpt, "--yes"]
        proc = _tool_async(h, "--json", *argv)
        scans = [0]

        def probe() -> list[str]:
            scans[0] += 1
            MODE_PROBLEMS.update(bad_modes(h.state_dir))
            out = scan_processes(s) + scan_xenstore(h, s)
            if scans[0] % 10 == 1:         # the whole tree is slower to read: every tenth round
                out += scan_files(roots, s)
            return out

        found += _while_running(proc, probe)
        if ckpt is None:
            ckpt = json.loads(subprocess.run([sys.executable, "-m", "xen_vtpm", "--json", "checkpoints", GUEST],
                                             env=h.env, capture_output=True, text=True, check=True).stdout)
            ckpt = next(c["id"] for c in ckpt if c["name"] == "sec-1")
        _collect_ks(h, s)                   # the vTPM wrote new Ks meanwhile
        found += scan_files(roots, s) + scan_xenstore(h, s) + scan_processes(s)
        MODE_PROBLEMS.update(bad_modes(h.state_dir))
    assert not found, "secrets found:\n" + "\n".join(sorted(set(found)))


def test_scanner_finds_planted_secrets(host):
    """The scan is not vacuous: each secret planted in a log, a XenStore node and an argv is found."""
    h, s = host
    planted = h.dir / "logs" / "planted.log"
    needles = {"host key": s.keys["host key"].hex(), "K": next(v for k, v in s.keys.items() if k.startswith("K "))}
    try:
        planted.write_bytes(b"x" + needles["K"] + b"y")
        assert any("K of entry" in f for f in scan_files([h.dir.parent], s))
        with XenStore(_sock(h)) as xs:
            xs.write("/local/domain/0/planted", needles["host key"])
            try:
                assert any("host key" in f for f in scan_xenstore(h, s))
            finally:
                xs.rm("/local/domain/0/planted")
        nv = s.plaintext["vTPM NV value"].hex()
        sleeper = subprocess.Popen([sys.executable, "-c", "import sys,time; time.sleep(60)", nv])
        try:
            assert any("vTPM NV value" in f for f in scan_processes(s))
        finally:
            sleeper.kill()
            sleeper.wait()
    finally:
        planted.unlink(missing_ok=True)


def test_state_dir_is_0700(host):
    h, _ = host
    assert stat.S_IMODE(h.state_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE((h.state_dir / "sealed").stat().st_mode) == 0o700
    assert all(stat.S_IMODE(p.stat().st_mode) == 0o600 for p in (h.state_dir / "sealed").iterdir())


def test_every_state_file_0600_and_dir_0700(host):
    """Checked during the snapshot and rollback of the test above too (MODE_PROBLEMS)."""
    h, _ = host
    MODE_PROBLEMS.update(bad_modes(h.state_dir))
    assert any(p.suffix == ".pack" for p in _files(h.state_dir)), "no pack was checked"
    assert sorted(MODE_PROBLEMS) == []


# --- 2. XenStore: a domain cannot drive or watch the manager --------------------------------

def _domids(h: E2EHost) -> tuple[int, int, int]:
    ids = h.domids()
    return ids["vtpmmgr"], ids[GUEST], ids[f"vtpm-{GUEST}"]


def _refused(fn) -> bool:
    try:
        fn()
    except (XenStorePermission, XenStoreNotFound):
        return True
    return False


def test_domain_cannot_submit_manager_request(host):
    h, _ = host
    mgr, guest, stub = _domids(h)
    base = f"/local/domain/{mgr}/control/vtpmmgr"
    for domid in (guest, stub):
        with XenStore(f"{_sock(h)}.d{domid}") as xs:
            for path in (f"{base}/request/evil{domid}/op", f"{base}/request/evil{domid}", base,
                         f"/local/domain/{mgr}/data/vtpmmgr/response/evil{domid}/status"):
                assert _refused(lambda: xs.write(path, "checkpoint")), f"dom{domid} wrote {path}"
            assert _refused(lambda: xs.ls(f"{base}/request")), f"dom{domid} listed the request dir"
        env = dict(os.environ, XENSTORED_PATH=f"{_sock(h)}.d{domid}")
        for argv in (["xenstore-write", f"{base}/request/c{domid}/op", "restore"],
                     ["xenstore-write", f"{base}/request/c{domid}/state", "submitted"],
                     ["xenstore-read", f"{base}/request"], ["xenstore-ls", f"{base}"]):
            proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=30)
            assert proc.returncode != 0, f"dom{domid}: {argv} succeeded: {proc.stdout}"
        # ...while the same C client reaches its own domain's nodes (the socket works)
        own = subprocess.run(["xenstore-read", f"/local/domain/{domid}/name"], env=env, capture_output=True,
                             text=True, timeout=30)
        assert own.returncode == 0 and own.stdout.strip(), own.stderr
    with XenStore(_sock(h)) as xs:
        ours = {f"{prefix}{d}" for prefix in ("evil", "c") for d in (guest, stub)}
        leftovers = [i for i in (xs.ls(f"{base}/request") if xs.exists(f"{base}/request") else []) if i in ours]
    assert leftovers == []


def test_domain_cannot_read_checkpoint_nodes_during_snapshot(host):
    """dom0 watches the manager's tree through a real snapshot and records every request/response node
    and its perms; the guest and the vTPM stub domain try to read each one meanwhile, never succeeding."""
    h, _ = host
    mgr, guest, stub = _domids(h)
    ctl = f"/local/domain/{mgr}/control/vtpmmgr"
    req_dir, resp_dir = f"{ctl}/request", f"/local/domain/{mgr}/data/vtpmmgr/response"
    events: list[str] = []
    perms_seen: dict[str, list[str]] = {}
    leaks: list[str] = []
    # Per domain: reads tried, and how many of them aimed at a request/response node dom0 recorded.  A
    # reader that cannot connect or dies records why: the test must not pass on reads that never ran.
    attempts = {guest: 0, stub: 0}
    node_reads = {guest: 0, stub: 0}
    broken: list[str] = []
    stop = threading.Event()

    def dom0_recorder() -> None:
        with XenStore(_sock(h)) as xs, xs.watch(f"/local/domain/{mgr}", "rec") as watch:
            while not stop.is_set():
                event = watch.wait(0.1)
                if event is None or not event[0].startswith((req_dir + "/", resp_dir + "/")):
                    continue
                events.append(event[0])
                with contextlib.suppress(XenStoreNotFound):
                    perms_seen.setdefault(event[0], xs.get_perms(event[0]))

    def domain_reader(domid: int) -> None:
        try:
            with XenStore(f"{_sock(h)}.d{domid}") as xs:
                while not stop.is_set():
                    for path in [req_dir, resp_dir] + events[-16:]:
                        attempts[domid] += 1
                        node_reads[domid] += path not in (req_dir, resp_dir)
                        try:
                            value = xs.ls(path) if path in (req_dir, resp_dir) else xs.read(path)
                        except (XenStorePermission, XenStoreNotFound):
                            continue
                        leaks.append(f"dom{domid} read {path}: {value!r}")
        except Exception as exc:  # any failure of a reader must fail the test, not end it quietly
            broken.append(f"dom{domid}: {exc!r}")

    threads = [threading.Thread(target=dom0_recorder)] + [threading.Thread(target=domain_reader, args=(d,))
                                                         for d in (guest, stub)]
    for t in threads:
        t.start()
    try:
        h.snapshot("sec-xs")
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert any(e.startswith(req_dir + "/") for e in events), \
        "no manager request was seen during the snapshot: the check proved nothing"
    assert any(e.startswith(resp_dir + "/") for e in events), "no manager response was seen"
    assert not any(t.is_alive() for t in threads), "a reader or the recorder did not stop"
    assert broken == [], f"a domain reader failed, so its reads never ran: {broken}"
    assert all(node_reads.values()), f"a domain never tried a request/response node: {node_reads} of {attempts}"
    assert leaks == []
    print(f"{len(events)} watch events, perms read for {len(perms_seen)} nodes; reads tried {attempts}, "
          f"of them at recorded nodes {node_reads}")
    for path, perms in perms_seen.items():
        if path.startswith(req_dir + "/"):
            assert perms == ["n0", f"r{mgr}"], f"{path}: perms {perms}"
        else:
            assert perms[0] == f"n{mgr}" and all(p[1:] not in (str(guest), str(stub)) for p in perms[1:]), \
                f"{path}: perms {perms}"
    with XenStore(_sock(h)) as xs:   # the directories the tool leaves in place
        for path in (ctl, req_dir):
            assert xs.get_perms(path) == ["n0", f"r{mgr}"], f"{path}: perms {xs.get_perms(path)}"
