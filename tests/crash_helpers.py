"""Crash-at-every-step harness: find the journaled steps, kill the tool there, check the host after recover.

The step list is the coordinator's step table (``xen_vtpm.core.steps``), so a new step is covered without
editing the tests; ``test_crash_recover`` cross-checks it against the op_steps a clean run really records.
Kills and faults go through the test-only seam ``tests/faulty_tool.py`` (``xen_vtpm.faults``).

The VM/vTPM pair is tracked by values that must move together: a marker the test writes into the
guest's memory (bytes a guest would write; the simulated guest's own scribbling never touches them) and
PCR 16 of its vTPM, extended with a fresh value at the same time (and, on an swtpm vTPM, whose PCRs are
its volatile state, an NV counter of its permanent state, incremented with them).  After recover the
pair read back must be one of the pairs the sequence allows — old or new, never one half of each, never
the zero PCR of a vTPM that came up fresh.

guest1's vTPM is one of e2e_helpers.VTPMS (``prime_host``): a vTPM stub domain (TPM 2.0 stand-in or
Xen's TPM 1.2) or an swtpm in dom0 behind an HVM guest's device model; every check below has each
backend's own form of it (the stub's console verdict / the swtpm the tool started on its own state;
the vtpmmgr's checkpoint entry / nothing of the checkpoint kept outside the store).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import re
import secrets
import sqlite3
import stat
import subprocess
import sys
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

import tpm12
from e2e_helpers import VTPMS
from sim_fixture import SimHost, start_sim_host, stop_sim_host, swtpm_home, swtpm_pid

from xen_vtpm.config import Config
from xen_vtpm.core import steps
from xen_vtpm.vtpm import console, swtpmctl
from xen_vtpm.xen.devicemodel import pid_path
from xen_vtpm_sim import devicemodel, domains, host

# The store's own crash points (xen_vtpm/store/writer.py, repository.py) that a checkpoint write (snapshot,
# safety snapshot, save) and a delete pass.
_WRITE_POINTS = ("write.journaled", "write.pack-published", "write.manifest-published", "write.committed")
STORE_POINTS = {"snapshot": _WRITE_POINTS, "pre-rollback": _WRITE_POINTS, "save": _WRITE_POINTS,
                "delete": ("delete.committed", "delete.unlinked-one"),
                "prune": ("delete.committed", "delete.unlinked-one")}

MARK_OFFSET = 7 * 4096 + 2048     # the guest scribbles only the first 48 bytes of a page
MARK_LEN = 32
GUEST = "guest1"
BYSTANDER = "bystander"        # a second guest on the host: recover of guest1's op must not touch it
CONNECT_TIMEOUT = 30.0


# --- steps ----------------------------------------------------------------------------
def coordinator_steps() -> dict[str, list[str]]:
    """kind -> journaled step names in order, from the coordinator's step table (core/steps.py);
    ``test_crash_recover`` cross-checks it against the op_steps a clean run really records."""
    return {kind: list(names) for kind, names in steps.SEQUENCES.items()}


def crash_points(kind: str) -> list[str]:
    """Every point of `kind`'s forward sequence where the tool can be stopped, in order: each journaled
    step (``<step>``) and, after it, each point between two writes of that step (``<step>:<point>``)."""
    return [label for step in steps.SEQUENCES[kind]
            for label in (step, *(f"{step}:{p}" for p in steps.INNER_POINTS.get(step, ())))]


def recover_points(kind: str) -> list[str]:
    """Every point a `recover` of an interrupted `kind` may pass, as hook names: its forward sequence,
    the undo of an uncommitted capture, and the store's own points."""
    labels = crash_points(kind)
    if kind in steps.CAPTURING:
        labels += [steps.UNDO, *(f"{steps.UNDO}:{p}" for p in steps.INNER_POINTS[steps.UNDO])]
    return [f"{kind}:{label}" for label in labels] + [f"store:{p}" for p in STORE_POINTS.get(kind, ())]


def recorded_steps(state_dir: Path) -> dict[str, list[list[str]]]:
    """kind -> the step lists of every finished operation in the journal (op_steps)."""
    db = sqlite3.connect(f"file:{state_dir / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        out: dict[str, list[list[str]]] = {}
        for op_id, kind in db.execute("SELECT op_id, kind FROM op_journal ORDER BY op_id"):
            steps = [s for (s,) in db.execute("SELECT step FROM op_steps WHERE op_id=? ORDER BY seq", (op_id,))]
            out.setdefault(kind, []).append(steps)
        return out
    finally:
        db.close()


# --- the VM/vTPM pair --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Pair:
    marker: bytes
    pcr16: str
    counter: int | None = None      # swtpm: the NV counter (permanent state; PCRs are volatile state)

    def __str__(self) -> str:
        nv = "" if self.counter is None else f", nv {self.counter}"
        return f"(mem {self.marker[:4].hex()}…, pcr16 {self.pcr16[:12]}…{nv})"


def memfile(sim: SimHost, name: str = GUEST) -> Path:
    dom = domains.find(domains.snapshot(sim.dir), name)
    assert dom is not None and dom.get("memfile"), f"{name}: no such guest on the simulated host"
    return Path(dom["memfile"])


# guest name -> its vTPM (a key of VTPMS), per simulated host (prime_host sets it; a TPM 2.0 stub otherwise)
_vtpms: dict[Path, dict[str, str]] = {}


def vtpm_of(sim: SimHost, name: str = GUEST) -> str:
    return _vtpms.get(sim.dir, {}).get(name, "stubdom-tpm2.0")


def backend(sim: SimHost, name: str = GUEST) -> str:
    """"stubdom" or "swtpm": what serves guest `name`'s vTPM."""
    return VTPMS[vtpm_of(sim, name)][0]


def tpm_version(sim: SimHost, name: str = GUEST) -> str:
    return VTPMS[vtpm_of(sim, name)][1]


def _published(path: Path, what: str) -> str:
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while not path.exists():
        assert time.monotonic() < deadline, f"{what}: never published its TCTI ({path.name})"
        time.sleep(0.05)
    return path.read_text().strip()


def tcti(sim: SimHost, name: str = GUEST) -> str:
    """The TCTI of guest `name`'s vTPM (what `xen-vtpm sim tcti` prints): the one its vTPM stub domain
    published, which also answers while the guest itself is saved away; or, for an swtpm, its device
    model's (no device model, no TPM: the swtpm ends with it).  Waits for a vTPM that just started."""
    if backend(sim, name) == "swtpm":
        dom = domains.find(domains.snapshot(sim.dir), name)
        assert dom is not None, f"{name}: not running, so its swtpm vTPM has no device model to reach it by"
        return _published(devicemodel.tcti_file(sim.dir, dom["domid"]), f"{name}'s device model")
    return _published(sim.dir / "run" / f"vtpm-{name}.tcti", f"vtpm-{name}")


def read_pcr16(sim: SimHost, name: str = GUEST) -> str:
    if tpm_version(sim, name) == "1.2":
        return tpm12.pcr_read(tcti(sim, name), 16).hex()
    out = sim.run(["tpm2_pcrread", "-T", tcti(sim, name), "sha256:16"]).stdout
    m = re.search(r"16\s*:\s*0x([0-9A-Fa-f]{64})", out)
    assert m, f"tpm2_pcrread printed no PCR 16: {out!r}"
    return m.group(1).lower()


NV_COUNTER = "0x1500020"


def read_counter(sim: SimHost, name: str = GUEST) -> int:
    """The NV counter of an swtpm vTPM; prime_host defined it, so a TPM without it came up fresh."""
    proc = subprocess.run(["tpm2_nvread", "-T", tcti(sim, name), "-C", "o", "-s", "8", NV_COUNTER], env=sim.env,
                          capture_output=True, timeout=60)
    assert proc.returncode == 0 and len(proc.stdout) == 8, (
        f"{name}: its swtpm vTPM has no NV counter {NV_COUNTER} — it came up fresh, not from its state "
        f"({proc.stderr.decode(errors='replace').strip()[-120:]})")
    return int.from_bytes(proc.stdout, "big")


def read_pair(sim: SimHost, name: str = GUEST) -> Pair:
    with open(memfile(sim, name), "rb") as fh:
        fh.seek(MARK_OFFSET)
        marker = fh.read(MARK_LEN)
    counter = read_counter(sim, name) if backend(sim, name) == "swtpm" else None
    return Pair(marker, read_pcr16(sim, name), counter)


def new_state(sim: SimHost, name: str = GUEST) -> Pair:
    """Move the pair on: a new memory marker, a new PCR 16 value (and a new NV counter on swtpm)."""
    marker = secrets.token_bytes(MARK_LEN)
    with open(memfile(sim, name), "r+b") as fh:
        fh.seek(MARK_OFFSET)
        fh.write(marker)
    if tpm_version(sim, name) == "1.2":
        tpm12.pcr_extend(tcti(sim, name), 16, secrets.token_bytes(32))
    else:
        sim.run(["tpm2_pcrextend", "-T", tcti(sim, name), f"16:sha256={secrets.token_hex(32)}"])
    if backend(sim, name) == "swtpm":
        sim.run(["tpm2_nvincrement", "-T", tcti(sim, name), NV_COUNTER, "-C", "o"])
    pair = read_pair(sim, name)
    assert pair.marker == marker
    return pair


def advance_vtpm_nv(sim: SimHost, name: str = GUEST, index: str = NV_COUNTER) -> None:
    """Change the vTPM's persistent state (its disk image) without its guest: define + bump an NV counter."""
    t = tcti(sim, name)
    sim.run(["tpm2_nvdefine", "-T", t, index, "-s", "8", "-a", "ownerread|ownerwrite|nt=counter"],
            check=False)
    sim.run(["tpm2_nvincrement", "-T", t, index, "-C", "o"])


def move_vtpm_on_while_saved(sim: SimHost, save_file: Path, name: str = GUEST) -> None:
    """guest `name` is saved away in `save_file`; someone changes its vTPM meanwhile (a PCR and its
    permanent state), so a restore must put it back.  A vTPM stub domain serves anyone; an swtpm only
    a device model, so the file is restored with plain `xl` (the tool bypassed), used, and destroyed."""
    if backend(sim, name) == "swtpm":
        sim.tool("vtpm", "start", name)
        sim.xl("restore", str(save_file))
    advance_vtpm_nv(sim, name)
    sim.run(["tpm2_pcrextend", "-T", tcti(sim, name), "16:sha256=" + "5a" * 32])
    if backend(sim, name) == "swtpm":
        sim.xl("destroy", name)
        assert domains.wait_until(lambda: swtpm_pid(sim, name) is None, 30), \
            f"{name}: its swtpm outlived its device model"


# --- running the tool ----------------------------------------------------------------------
FAULTY_TOOL = Path(__file__).resolve().parent / "faulty_tool.py"


def sim_tool_argv() -> list[str]:
    return [sys.executable, "-m", "xen_vtpm"]


def faulty_argv(*, crash_at: Iterable[str] = (), faults: Iterable[tuple[str, str]] = (), log: Path | None = None,
                trace: bool = False) -> list[str]:
    """xen-vtpm with the test hook installed (tests/faulty_tool.py); the tool's arguments follow.
    `faults`: (point, command) pairs."""
    argv = [sys.executable, str(FAULTY_TOOL)]
    for point in crash_at:
        argv += ["--crash-at", point]
    for point, cmd in faults:
        argv += ["--fault-at", point, "--fault-cmd", cmd]
    if log is not None:
        argv += ["--log", str(log)]
    if trace:
        argv.append("--trace")
    return [*argv, "--"]


def hook_log(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def fresh_log(sim: SimHost) -> Path:
    """A new, empty hook log for one run of the tool (so every line in it is that run's)."""
    d = sim.dir / "hooklogs"
    d.mkdir(exist_ok=True)
    path = d / f"{time.monotonic_ns()}-{secrets.token_hex(4)}.log"
    path.touch()
    return path


def killed_at(proc: subprocess.CompletedProcess, log: Path, candidates: Iterable[str]) -> str | None:
    """The point the hook killed this run at, proved twice: the process died of SIGKILL and the hook's
    log (written just before the kill) names one of `candidates` as its last line.
    None if the run finished without reaching any of them; anything else fails the test."""
    lines = hook_log(log)
    last = lines[-1] if lines else ""
    point = last.removeprefix("reached ").removesuffix(" crash") if last.endswith(" crash") else None
    if proc.returncode == -9:
        assert point in set(candidates), (f"killed by SIGKILL, but the hook log does not show a kill at one of "
                                          f"the requested points: {lines[-3:]}")
        return point
    assert point is None, f"the hook logged a kill at {point}, but the process exited {proc.returncode}"
    return None


def crash(sim: SimHost, *argv: str, at: str | None = None, store_at: str | None = None) -> None:
    """Run xen-vtpm with a crash point; it must have been killed exactly there (else the case proves nothing)."""
    point = at or f"store:{store_at}"
    log = fresh_log(sim)
    proc = sim.run([*faulty_argv(crash_at=[point], log=log), *argv], check=False, timeout=120)
    assert killed_at(proc, log, [point]) == point, (
        f"{' '.join(argv)} with crash point {point} exited {proc.returncode} instead of being killed there: "
        f"{proc.stderr.strip()}")


def recover(sim: SimHost, kill_at: Iterable[str] = ()) -> list[str]:
    """`xen-vtpm recover`, first killed at each of `kill_at` it reaches, one kill per run in the order
    recover reaches them, until a run reaches none of the rest; that run must finish.  Returns the
    points it was killed at, each proved (SIGKILL and the hook's log line)."""
    left, killed = list(kill_at), []
    while left:
        log = fresh_log(sim)
        proc = sim.run([*faulty_argv(crash_at=left, log=log), "recover"], check=False, timeout=120)
        point = killed_at(proc, log, left)
        if point is None:
            assert proc.returncode == 0, f"recover (crash points {left}) exited {proc.returncode}: " \
                                         f"{proc.stderr.strip()}"
            break
        killed.append(point)
        left.remove(point)
    proc = sim.tool("--json", "recover", check=False, timeout=120)
    assert proc.returncode == 0, f"recover exited {proc.returncode}: {proc.stderr.strip()}"
    return killed


def tool_json(sim: SimHost, *argv: str) -> object:
    return json.loads(sim.tool("--json", *argv).stdout)


def checkpoint_ids(sim: SimHost) -> dict[str, str]:
    """name -> id of every checkpoint."""
    return {c["name"]: c["id"] for c in tool_json(sim, "checkpoints")}


def last_op(sim: SimHost) -> dict:
    db = sqlite3.connect(f"file:{state_dir(sim) / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        op_id, kind, params = db.execute(
            "SELECT op_id, kind, params FROM op_journal ORDER BY op_id DESC LIMIT 1").fetchone()
        return {"op_id": op_id, "kind": kind, **json.loads(params)}
    finally:
        db.close()


def op_outcome(sim: SimHost, op_id: int) -> str:
    db = sqlite3.connect(f"file:{state_dir(sim) / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        (outcome,) = db.execute("SELECT outcome FROM op_journal WHERE op_id=?", (op_id,)).fetchone()
        return outcome or ""
    finally:
        db.close()


def state_dir(sim: SimHost) -> Path:
    return sim.dir / "state"


# --- the checks after recover ------------------------------------------------------------
def xl_rows(sim: SimHost) -> dict[str, str]:
    """name -> state column of `xl list`."""
    rows = {}
    for line in sim.xl("list").stdout.splitlines()[1:]:
        parts = line.split()
        rows[parts[0]] = parts[4]
    return rows


def wait_connected(sim: SimHost, name: str) -> dict:
    """The guest's vTPM frontend and backend reach Connected (4) with a verified UUID, or (swtpm) its
    device model is wired to the vTPM's socket and serves the guest's TPM; returns its row."""
    deadline = time.monotonic() + CONNECT_TIMEOUT
    swtpm = backend(sim, name) == "swtpm"
    while True:
        rows = {r["name"]: r for r in tool_json(sim, "list")}
        row = rows.get(name)
        links = row["vtpms"] if row else []
        if swtpm and len(links) == 1 and devicemodel.tcti_file(sim.dir, row["domid"]).exists():
            return row
        if len(links) == 1 and links[0]["state"] == "4" and links[0]["backend_state"] == "4":
            return row
        assert time.monotonic() < deadline, f"{name}: vTPM link never reached Connected: {row}"
        time.sleep(0.1)


def vtpm_boot_ok(sim: SimHost, backend: str, domid: int) -> str:
    """The running vTPM instance's boot (the console after its own boot banner) loaded its state."""
    path = sim.dir / "logs" / f"guest-{backend}.log"
    deadline = time.monotonic() + CONNECT_TIMEOUT
    while True:   # xenconsoled writes the log a moment after the stub printed
        log = path.read_text(errors="replace")
        starts = list(re.finditer(r"vTPM stub domain \S+ \(domid (\d+)\) starting", log))
        assert starts, f"{backend}: no boot on its console"
        verdict = console.boot_verdict(log[starts[-1].end():])
        if int(starts[-1].group(1)) == domid and verdict.kind not in ("none", "pending"):
            break
        assert time.monotonic() < deadline, f"{backend}: the console's last boot is domid {starts[-1].group(1)} " \
                                            f"({verdict.reason}), running {domid}"
        time.sleep(0.05)
    assert verdict.loaded, f"{backend}: came up fresh ({verdict.reason})"
    return verdict.reason


def no_unfinished_ops(sim: SimHost, open_op: int | None = None) -> None:
    """Nothing half done: no unfinished operation (but `open_op`, one that waits for a component that
    stays dead), no store journal entry, store files and catalog agree, no temporary file left."""
    db = sqlite3.connect(f"file:{state_dir(sim) / 'catalog.sqlite'}?mode=ro", uri=True)
    try:
        left = db.execute("SELECT op_id, kind FROM op_journal WHERE finished IS NULL AND op_id IS NOT ?",
                          (open_op,)).fetchall()
        store_left = db.execute("SELECT id, op, checkpoint FROM journal").fetchall()
        packs = {n for (n,) in db.execute("SELECT name FROM packs")}
        ckpts = {i for (i,) in db.execute("SELECT id FROM checkpoints")}
    finally:
        db.close()
    assert not left, f"journal still has unfinished operations after recover: {left}"
    assert not store_left, f"store journal still has entries after recover: {store_left}"
    sd = state_dir(sim)
    pack_files = {p.name[:-len(".pack")] for p in (sd / "packs").glob("*.pack")}
    manifest_files = {p.name[:-len(".manifest")] for p in (sd / "manifests").glob("*.manifest")}
    assert pack_files == packs, f"packs on disk {sorted(pack_files ^ packs)} disagree with the catalog"
    assert manifest_files == ckpts, f"manifests on disk {sorted(manifest_files ^ ckpts)} disagree with the catalog"
    tmp_files = [p.name for d in ("packs", "manifests") for p in (sd / d).glob("*.tmp")]
    assert not tmp_files, f"temporary store files left: {tmp_files}"
    spool = sd / "tmp"
    fifos = [p.name for p in spool.iterdir() if stat.S_ISFIFO(p.lstat().st_mode)] if spool.is_dir() else []
    assert not fifos, f"fifos left in state_dir/tmp: {fifos}"
    half_written = [p.name for p in (sim.dir / "images").glob("*.xen-vtpm.tmp")]
    assert not half_written, f"half-written vTPM images left: {half_written}"


def no_stray_processes(sim: SimHost) -> None:
    """Every process of the host belongs to a domain `xl list` shows or to a host daemon."""
    table = domains.snapshot(sim.dir)["domains"]
    listed = xl_rows(sim)
    leaders = set()
    for dom in table.values():
        assert dom["name"] in listed, f"{dom['name']}: in the domain table but not in `xl list`"
        if dom.get("pid") and "c" not in listed[dom["name"]]:     # a crashed domain has no process
            assert domains.is_alive(dom["pid"]), f"{dom['name']}: its process {dom['pid']} is gone"
            leaders.add(dom["pid"])
        # An HVM guest's device model, where libxl records it.
        dm = sim.run(["xenstore-read", pid_path(dom["domid"])], check=False)
        if dm.returncode == 0:
            leaders.add(int(dm.stdout))
    for pidfile in [*(sim.dir / "run").glob("*.pid"), *(sim.dir / host.SWTPM_RUN).glob("*.pid")]:
        leaders.add(int(pidfile.read_text().strip()))      # host daemons; the tool's swtpms
    stray = []
    for pid in domains.owned_pids(sim.dir):
        try:
            sid = os.getsid(pid)
        except ProcessLookupError:
            continue
        if pid not in leaders and sid not in leaders:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            stray.append(f"{pid}: {cmd[:120]}")
    assert not stray, f"processes left beyond the host's domains: {stray}"


def swtpm_leftovers(sim: SimHost, guest: str = GUEST) -> list[str]:
    """What of a checkpoint an swtpm vTPM could hold outside the store: anything in its home beyond
    its record, its state files and its log, and libxl's device-model copy (qemu-save.<domid>, the
    blobs a capture read) left after the capture."""
    home = swtpm_home(sim, guest)
    extra = [str(p.relative_to(home)) for p in home.rglob("*")
             if str(p.relative_to(home)) not in ("vtpm.json", "state", "swtpm.log", "state/.lock", "migration.key",
                                                 *(f"state/{n}" for n in swtpmctl.STATE_FILES))]
    return extra + [p.name for p in Path(Config.load(sim.config).xen_lib_dir).glob("qemu-save.*")]


def backend_holds(sim: SimHost, checkpoint_id: str) -> bool:
    """Does guest1's vTPM backend still hold something of this checkpoint outside the store?  The
    vtpmmgr: its checkpoint entry (``manager_knows``); an swtpm keeps nothing per checkpoint, so any
    leftover (``swtpm_leftovers``) counts."""
    if backend(sim) == "swtpm":
        return bool(swtpm_leftovers(sim))
    return manager_knows(sim, checkpoint_id)


def backend_keeps(sim: SimHost, checkpoint_id: str) -> bool:
    """Does a live checkpoint still have what its backend needs to put the vTPM back?  The vtpmmgr's
    entry (``manager_keeps``); for swtpm, the vTPM image in the store, checked whole by `verify`."""
    if backend(sim) == "swtpm":
        return sim.tool("verify", checkpoint_id, check=False, timeout=150).returncode == 0
    return manager_keeps(sim, checkpoint_id)


def manager_knows(sim: SimHost, checkpoint_id: str) -> bool:
    """Probe: does the vtpmmgr still hold this checkpoint entry?  (A discard that succeeds: the probe
    removes a leaked entry, which is fine since the test then fails.)"""
    from xen_vtpm.errors import ManagerError
    from xen_vtpm.vtpm.manager import ManagerClient
    with ManagerClient(Config.load(sim.config)) as mgr:
        try:
            mgr.submit("discard", checkpoint_id)     # raw request: discard() treats unknown as done
        except ManagerError as exc:
            assert "unknown checkpoint" in str(exc), str(exc)
            return False
    return True


def manager_keeps(sim: SimHost, checkpoint_id: str, guest: str = GUEST) -> bool:
    """Probe that leaves a live entry alone (unlike ``manager_knows``): a checkpoint request under the
    same id is refused while the entry exists; where it is gone, the entry the probe made is discarded."""
    from xen_vtpm.errors import ManagerError
    from xen_vtpm.vtpm.manager import ManagerClient
    # The manager knows a vTPM by the UUID on its stub domain's own vtpm= line.
    vtpm_uuid = next(r for r in tool_json(sim, "list") if r["name"] == f"vtpm-{guest}")["vtpms"][0]["uuid"]
    with ManagerClient(Config.load(sim.config)) as mgr:
        try:
            mgr.submit("checkpoint", checkpoint_id, vtpm_uuid)
        except ManagerError as exc:
            assert "already exists" in str(exc), str(exc)
            return True
        mgr.submit("discard", checkpoint_id)
    return False


def swtpm_started_by_tool(sim: SimHost) -> int:
    """guest1's swtpm runs as the tool starts it: on the vTPM's own state directory, with its state and
    migration keys (so it decrypted that state: it never manufactures one, ``SwtpmBackend.prove``), and
    its permanent state is there, encrypted.  Returns its pid."""
    pid = swtpm_pid(sim)
    assert pid is not None, f"{GUEST}: runs, but its swtpm does not"
    argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    state = swtpm_home(sim) / "state"
    assert any(a.startswith(f"dir={state},".encode()) for a in argv), f"swtpm {pid} serves another state: {argv}"
    assert b"--key" in argv and b"--migration-key" in argv, f"swtpm {pid} runs without its keys: {argv}"
    permall = state / swtpmctl.PERMANENT
    assert permall.exists() and swtpmctl.encrypted_at_rest(permall.read_bytes()), \
        f"{permall.name}: missing or not encrypted"
    return pid


def no_paused_domains(sim: SimHost, guest_paused: bool = False) -> dict[str, str]:
    """The vTPM stub runs, loaded its state at its last boot (an swtpm vTPM: ``check_host`` checks it
    with its guest, the only one it serves); nothing is paused but a guest paused before."""
    rows = xl_rows(sim)
    stub = f"vtpm-{GUEST}"
    if backend(sim) == "stubdom":
        assert stub in rows, f"{stub}: the vTPM stub domain is not running after recover"
    for name, state in rows.items():
        if "p" in state and not (name == GUEST and guest_paused):
            raise AssertionError(f"{name}: left paused ({state}) after recover")
    if backend(sim) == "stubdom":
        table = domains.snapshot(sim.dir)["domains"]
        vtpm_boot_ok(sim, stub, next(d["domid"] for d in table.values() if d["name"] == stub))
    return rows


def check_host(sim: SimHost, allowed: dict[str, Pair], *, guest_expected: bool | None = True,
               paused: bool = False, open_op: int | None = None) -> str:
    """All the after-recover checks; returns the name of the allowed state the pair is in, or 'absent'.

    guest_expected: True (must run), False (must be gone), None (either).  open_op: the one operation
    allowed to stay unfinished (it needs a component that stays dead)."""
    no_unfinished_ops(sim, open_op)
    rows = no_paused_domains(sim, paused)
    present = GUEST in rows
    if guest_expected is not None:
        assert present == guest_expected, f"{GUEST}: {'running' if present else 'gone'} after recover"
    if present:
        if paused:
            # A paused guest has not run its frontend yet: its device must still name the live vTPM.
            assert "p" in rows[GUEST], f"{GUEST}: was paused before, runs after recover"
            row = next(r for r in tool_json(sim, "list") if r["name"] == GUEST)
        else:
            row = wait_connected(sim, GUEST)
        assert len(row["vtpms"]) == 1 and row["vtpms"][0]["uuid_check"] == "ok", row
        if backend(sim) == "swtpm":
            assert row["vtpms"][0]["backend_name"] == "swtpm", row
            assert row["vtpms"][0]["uuid"] == swtpm_home(sim).name, row
            swtpm_started_by_tool(sim)
        else:
            assert row["vtpms"][0]["backend_name"] == f"vtpm-{GUEST}", row
        pair = read_pair(sim)
        assert set(pair.pcr16) != {"0"}, f"{GUEST}: PCR 16 is zero — the vTPM came up fresh"
        matches = [k for k, v in allowed.items() if v == pair]
        assert matches, (f"{GUEST}: VM/vTPM pair {pair} is none of the allowed states "
                         f"{ {k: str(v) for k, v in allowed.items()} } (mixed or fresh)")
        outcome = matches[0]
    else:
        # The stub domain outlives its saved guest; an swtpm ends with the guest's device model.
        assert backend(sim) == "stubdom" or swtpm_pid(sim) is None, f"{GUEST} is gone, its swtpm still runs"
        outcome = "absent"
    if backend(sim) == "swtpm":
        assert not swtpm_leftovers(sim), f"{GUEST}'s swtpm vTPM left behind {swtpm_leftovers(sim)}"
    bystander_untouched(sim)
    sim.tool("verify", "--all")
    sim.tool("audit", "--verify")
    no_stray_processes(sim)
    return outcome


def rolls_back_to(sim: SimHost, checkpoint: str, expected: Pair) -> None:
    """A checkpoint that was kept must hold exactly the pair it was taken of: move the pair on, roll
    back to it, and find that pair again (with every other after-recover check)."""
    new_state(sim)
    sim.tool("rollback", GUEST, checkpoint, "--yes", "--no-safety-checkpoint", timeout=150)
    assert check_host(sim, {"checkpoint": expected}) == "checkpoint", f"checkpoint {checkpoint}: not its pair"


_bystanders: dict[Path, Pair] = {}


def bystander_untouched(sim: SimHost) -> None:
    """The other guest still runs, connected to its vTPM, with the pair it had before any crash."""
    expected = _bystanders.get(sim.dir)
    if expected is None:
        return
    wait_connected(sim, BYSTANDER)
    assert read_pair(sim, BYSTANDER) == expected, f"{BYSTANDER}: its VM/vTPM pair changed"


def prime_host(sim: SimHost, vtpm: str = "stubdom-tpm2.0") -> None:
    """guest1 (its vTPM one of VTPMS) and a bystander guest (a TPM 2.0 stub domain); guest1 gets a clean
    snapshot + rollback so its running vTPM booted from stored state (a first boot is fresh by design),
    then every later boot must load.  An swtpm vTPM gets the NV counter of its pairs first."""
    _vtpms.setdefault(sim.dir, {})[GUEST] = vtpm
    kind, version = VTPMS[vtpm]
    sim.create_guest(GUEST, memory=16, tpm_version=version, vtpm=kind)
    if kind == "swtpm":
        advance_vtpm_nv(sim)
    sim.create_guest(BYSTANDER, memory=16)
    _bystanders[sim.dir] = new_state(sim, BYSTANDER)
    sim.tool("snapshot", GUEST, "--name", "prime")
    sim.tool("rollback", GUEST, "prime", "--yes", "--no-safety-checkpoint")
    sim.tool("delete", "prime")


@contextlib.contextmanager
def primed_host(path: Path) -> Iterator[SimHost]:
    """A host in ``path`` after `init` and ``prime_host``; always taken down."""
    sim = start_sim_host(path)
    try:
        sim.tool("init")
        prime_host(sim)
        yield sim
    finally:
        stop_sim_host(sim)


def table(rows: Iterable[tuple[str, str, str]]) -> str:
    rows = list(rows)
    w = [max(len(r[i]) for r in rows + [("sequence", "step", "outcome")]) for i in range(3)]
    lines = [f"{'sequence':<{w[0]}}  {'step':<{w[1]}}  outcome", f"{'-' * w[0]}  {'-' * w[1]}  {'-' * 7}"]
    lines += [f"{a:<{w[0]}}  {b:<{w[1]}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def report(rows: list[tuple[str, str, str]], env_var: str) -> None:
    """Print a module's outcome table; also write it to the file ``$env_var`` names, if set."""
    if not rows:
        return
    text = table(rows)
    target = os.environ.get(env_var)
    if target:
        Path(target).write_text(text + "\n")
    print("\n" + text)
