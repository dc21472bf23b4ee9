"""Snapshot and rollback against the same work done by hand, durably, side by side in one run.

For each guest size it starts a simulated host (taken down after), creates a guest with a vTPM, fills
its memory with pseudo-random bytes (no page dedups against another: the worst case for the store)
and measures, every measure starting after `sync`:

  baselines   bare `xl save -p` + `xl unpause` (its wall time is also its pause window);
              by hand, durable: `xl save -p` + copy of the vTPM image + `sync -f` of both + `xl unpause`;
              by hand rollback: `xl destroy` the guest, destroy and re-create the vTPM stub domain and
              wait until it serves (its console says it loaded its state), `xl restore` of the bare save;
  ours        `xen-vtpm snapshot` (wall, pause window), a second one of the idle guest, one after 5% of
              the guest's pages were rewritten as scattered single 4 KiB pages (the bench pauses the
              guest and writes into its RAM, a shared file mapping in the sim dir);
              `xen-vtpm rollback --no-safety-checkpoint` (wall, downtime: the guest's destruction to the
              new guest running), to the first snapshot and to the scattered one (delta chunks);
              `xen-vtpm delete`;
              peak RSS of the xen-vtpm process (VmHWM; its spools are memory files it never maps);
              CPU seconds per stage (xen_vtpm.timings: the store and its C pipelines count them);
              TPM commands and NV writes per operation, counted on the wire by a proxy in front of the
              host TPM the tool uses and of the one the vTPM manager uses.

Sizes in --sizes make the main table; sizes in --growth add rows of wall time against guest size.

    python bench/snapshot.py [--sizes 1,4] [--growth 8] [--dir DIR]

Put --dir on a real disk (not tmpfs): the images go where a dom0 would write them, and tmpfs would
also eat the RAM the guests and the spools need (about twice the largest guest).
"""
from __future__ import annotations

import argparse
import collections
import json
import mmap
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xen_vtpm.config import Config  # noqa: E402
from xen_vtpm.vtpm.console import watch_boot  # noqa: E402
from xen_vtpm.vtpm.stubdom import wait_released  # noqa: E402
from xen_vtpm.xen.consoles import PtyReader, console_tty, tty_node  # noqa: E402
from xen_vtpm.xen.domains import domid_of  # noqa: E402
from xen_vtpm.xen.xenstore import XenStore  # noqa: E402
from xen_vtpm_sim import domains, host  # noqa: E402

GUEST = "bg"
VTPM = f"vtpm-{GUEST}"
PAGE = 4096
BLOCK = 64 << 20
GIB = 1 << 30
STAGES = ("read", "chunk", "hash", "lookup", "delta", "seal", "write", "fsync", "commit", "catalog", "open")
# Runs the CLI in this process and reports what it cost: its own CPU time (not the sim `xl` it spawns,
# which stands in for Xen's C one), xen_vtpm.timings, VmHWM, and the peak of its anonymous and file
# pages sampled every 10 ms -- its RSS without the spool's shared memory pages it maps (VmHWM counts them).
LAUNCH = """
import json, re, resource, sys, threading, time
from xen_vtpm import timings
from xen_vtpm.cli import main
peak = [0]
def sample():
    while True:
        s = open('/proc/self/status').read()
        peak[0] = max(peak[0], sum(int(re.search(k + r':\\s+(\\d+)', s).group(1)) for k in ('RssAnon', 'RssFile')))
        time.sleep(0.01)
threading.Thread(target=sample, daemon=True).start()
rc = main(sys.argv[1:])
sys.stdout.flush()
ru = resource.getrusage(resource.RUSAGE_SELF)
hwm = int(re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1))
print('bench=' + json.dumps({'maxrss_kib': peak[0], 'vmhwm_kib': hwm, 'cpu_s': ru.ru_utime + ru.ru_stime,
                             'stages': timings.totals()}), file=sys.stderr)
sys.exit(rc)
"""

# TPM 2.0 command codes (TPM 2.0 Part 2, table 12) of commands that write NV memory.
NV_WRITES = {0x11F: "NV_UndefineSpaceSpecial", 0x120: "EvictControl", 0x122: "NV_UndefineSpace",
             0x126: "Clear", 0x127: "ClearControl", 0x129: "HierarchyChangeAuth", 0x12A: "NV_DefineSpace",
             0x132: "NV_GlobalWriteLock", 0x134: "NV_Increment", 0x135: "NV_SetBits", 0x136: "NV_Extend",
             0x137: "NV_Write", 0x138: "NV_WriteLock", 0x139: "DictionaryAttackLockReset",
             0x13A: "DictionaryAttackParameters", 0x13B: "NV_ChangeAuth", 0x145: "Shutdown"}


class TpmTap:
    """A TCP proxy in front of a swtpm (data port P, control port P + 1) that counts the TPM commands
    going through it: the tool cannot tell it from the TPM."""

    def __init__(self, port: int) -> None:
        self.target = port
        self.counts: collections.Counter[int] = collections.Counter()
        self._lock = threading.Lock()
        self.port = self._listen_pair()

    def _listen_pair(self) -> int:
        for _ in range(100):
            a, b = socket.socket(), socket.socket()
            for s in (a, b):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                a.bind(("127.0.0.1", 0))
                b.bind(("127.0.0.1", a.getsockname()[1] + 1))
            except OSError:
                a.close()
                b.close()
                continue
            for s, target, count in ((a, self.target, True), (b, self.target + 1, False)):
                s.listen(8)
                threading.Thread(target=self._accept, args=(s, target, count), daemon=True).start()
            return a.getsockname()[1]
        raise SystemExit("bench: no free port pair for the TPM proxy")

    def _accept(self, server: socket.socket, target: int, count: bool) -> None:
        while True:
            client, _ = server.accept()
            upstream = socket.create_connection(("127.0.0.1", target))
            threading.Thread(target=self._pipe, args=(client, upstream, count), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, count: bool) -> None:
        pending = b""
        try:
            while data := src.recv(1 << 16):
                if count:
                    pending += data
                    while len(pending) >= 10:        # tag u16 | size u32 | command code u32, big-endian
                        size = int.from_bytes(pending[2:6], "big")
                        if size < 10 or len(pending) < size:
                            break
                        with self._lock:
                            self.counts[int.from_bytes(pending[6:10], "big")] += 1
                        pending = pending[size:]
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def take(self) -> tuple[int, int]:
        """(commands, NV writes) since the last take."""
        with self._lock:
            counts, self.counts = self.counts, collections.Counter()
        return sum(counts.values()), sum(n for cc, n in counts.items() if cc in NV_WRITES)


class Bench:
    def __init__(self, sim_dir: Path, env: dict[str, str], taps: dict[str, TpmTap]) -> None:
        self.dir, self.env, self.taps = sim_dir, env, taps

    def _run(self, argv: list[str], sync: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        # Start every measure with no dirty pages queued: otherwise whichever runs after a big write
        # pays for the kernel's writeback throttling of the one before.
        if sync:
            os.sync()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        return wall, proc

    def xl(self, *args: str, sync: bool = True) -> float:
        return self._run([str(self.dir / "bin" / "xl"), *args], sync=sync)[0]

    def tool(self, *args: str) -> dict[str, Any]:
        """One `xen-vtpm` command: wall s, its --json output, what LAUNCH reports, TPM counts."""
        for tap in self.taps.values():
            tap.take()
        wall, proc = self._run([sys.executable, "-c", LAUNCH, "--json", *args])
        r = json.loads(proc.stderr.rsplit("bench=", 1)[1].splitlines()[0])
        r.update(wall=wall, out=json.loads(proc.stdout) if proc.stdout.strip() else None)
        r["tpm"] = {name: tap.take() for name, tap in self.taps.items()}
        return r

    def memfile(self) -> Path:
        return Path(domains.find(domains.snapshot(self.dir), GUEST)["memfile"])

    def while_paused(self, write: Any) -> None:
        """Change guest RAM as the guest would, but deterministically: pause, write, unpause."""
        self.xl("pause", GUEST)
        try:
            with open(self.memfile(), "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
                write(mm)
                mm.flush()
        finally:
            self.xl("unpause", GUEST)

    def restart_vtpm(self) -> None:
        """By hand: destroy the vTPM stub domain, wait until the manager released it, create it again
        (paused, so its console is read from the first line: `xl create -p`, `xl console`, `xl unpause`)
        and wait until it serves (its console says it loaded its state)."""
        with XenStore(self.env["XENSTORED_PATH"]) as xs:
            domid = domid_of(xs, VTPM)
            manager = domid_of(xs, "vtpmmgr")
            self.xl("destroy", VTPM, sync=False)
            if domid is not None and manager is not None:
                wait_released(xs, domid, manager, 60)
            self.xl("create", "-p", str(self.dir / "images" / f"{VTPM}.cfg"), sync=False)
            new = domid_of(xs, VTPM)
            assert new is not None, f"{VTPM}: not created"
            assert xs.wait_for(lambda: console_tty(xs, new) is not None, [tty_node(new)], 10), f"{VTPM}: no console"
            with PtyReader(str(console_tty(xs, new))) as pty:
                self.xl("unpause", VTPM, sync=False)
                verdict = watch_boot(pty, None, 60, lambda: True)
        assert verdict.loaded, f"{VTPM}: {verdict.reason}"


def fill_random(mm: mmap.mmap, seed: int = 1) -> None:
    rng = random.Random(seed)
    for off in range(0, len(mm), BLOCK):
        n = min(BLOCK, len(mm) - off)
        mm[off:off + n] = rng.randbytes(n)


def scatter(mm: mmap.mmap, fraction: float, seed: int) -> None:
    """Rewrite ``fraction`` of the pages, chosen one by one anywhere in the image."""
    rng = random.Random(seed)
    pages = len(mm) // PAGE
    for p in rng.sample(range(pages), round(pages * fraction)):
        mm[p * PAGE:(p + 1) * PAGE] = rng.randbytes(PAGE)


def _tap_tpms(sim_dir: Path, env: dict[str, str]) -> dict[str, TpmTap]:
    """Put a counting proxy in front of both TPMs: the tool's (its config) and the manager's (it reads
    run/ptpm.tcti when it starts, so it is restarted once, as a dom0 reboot would)."""
    cfg_path = Path(env["XEN_VTPM_CONFIG"])
    cfg = Config.load(cfg_path)
    tool = TpmTap(int(cfg.tcti.rsplit("port=", 1)[1]))
    cfg.tcti = f"swtpm:host=127.0.0.1,port={tool.port}"
    cfg.save(cfg_path)
    ptcti = sim_dir / "run" / "ptpm.tcti"
    manager = TpmTap(int(ptcti.read_text().strip().rsplit("port=", 1)[1]))
    ptcti.write_text(f"swtpm:host=127.0.0.1,port={manager.port}\n")
    xl = [str(sim_dir / "bin" / "xl")]
    subprocess.run([*xl, "destroy", "vtpmmgr"], env=env, check=True, capture_output=True)
    subprocess.run([*xl, "create", str(sim_dir / "images" / "vtpmmgr.cfg")], env=env, check=True,
                   capture_output=True)
    return {"host TPM": tool, "manager's TPM": manager}


def measure(size_gib: float, base: Path, full: bool) -> dict[str, Any]:
    """Every measure for one guest size; ``full=False`` only those of the growth rows."""
    sim_dir = Path(tempfile.mkdtemp(prefix="xvb-", dir=base))
    r: dict[str, Any] = {"size": int(size_gib * GIB)}
    try:
        env = dict(os.environ, **host.up(sim_dir))
        taps = _tap_tpms(sim_dir, env)
        b = Bench(Path(env["XEN_VTPM_SIM_DIR"]), env, taps)
        b.tool("init")
        b._run([sys.executable, "-m", "xen_vtpm", "sim", "create", GUEST, "--memory", str(int(size_gib * 1024))])
        b.while_paused(fill_random)
        files = b.dir / "bench-files"
        files.mkdir()
        bare, image = files / "bare.save", b.dir / "images" / f"{VTPM}.img"

        r["bare_save"] = b.xl("save", "-p", GUEST, str(bare))
        r["bare_pause"] = r["bare_save"] + b.xl("unpause", GUEST, sync=False)
        os.sync()
        t0 = time.perf_counter()
        b.xl("save", "-p", GUEST, str(files / "hand.save"), sync=False)
        shutil.copyfile(image, files / "hand-vtpm.img")
        subprocess.run(["sync", "-f", str(files / "hand.save"), str(files / "hand-vtpm.img")], check=True)
        b.xl("unpause", GUEST, sync=False)
        r["hand_save"] = time.perf_counter() - t0
        (files / "hand.save").unlink()

        r["first"] = b.tool("snapshot", GUEST, "--name", "s1")
        r["idle"] = b.tool("snapshot", GUEST, "--name", "idle")
        if full:
            b.while_paused(lambda mm: scatter(mm, 0.05, seed=3))
            r["scattered"] = b.tool("snapshot", GUEST, "--name", "scattered")
        r["rollback"] = b.tool("rollback", GUEST, "s1", "--yes", "--no-safety-checkpoint")
        if full:
            r["rollback_delta"] = b.tool("rollback", GUEST, "scattered", "--yes", "--no-safety-checkpoint")
            r["delete"] = b.tool("delete", r["idle"]["out"]["id"])
        # By hand: the guest goes, its vTPM is re-created and serves, the bare save comes back.
        os.sync()
        t0 = time.perf_counter()
        b.xl("destroy", GUEST, sync=False)
        b.restart_vtpm()
        b.xl("restore", str(bare), sync=False)
        r["hand_rollback"] = time.perf_counter() - t0
    finally:
        host.down(sim_dir)
        shutil.rmtree(sim_dir, ignore_errors=True)
    return r


def median_of(runs: list[Any]) -> Any:
    """The median of every number across runs of the same measures (anything else: the first run's)."""
    first = runs[0]
    if isinstance(first, bool) or not isinstance(first, (int, float, dict)):
        return first
    if isinstance(first, dict):
        return {k: median_of([r[k] for r in runs if k in r]) for k in first}
    return statistics.median_low(runs)   # one run's value: integers stay integers


def _cell(ours: float, base: float, limit: float, extra: float = 0.0) -> str:
    ok = ours <= limit * base + extra
    return f"{ours:.2f} s = {ours / base:.2f}× {'pass' if ok else '**FAIL**'}"


def main_table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, list[str], str]] = []

    def row(label: str, target: str, cell: Any) -> None:
        rows.append((label, [cell(r) for r in results], target))

    row("bare `xl save -p` + `xl unpause` (its pause window)", "", lambda r: f"{r['bare_pause']:.2f} s")
    row("by hand, durable: `xl save -p` + copy vTPM image + `sync -f` both + unpause", "",
        lambda r: f"{r['hand_save']:.2f} s")
    row("first snapshot, wall", "≤ 1.5× by hand", lambda r: _cell(r["first"]["wall"], r["hand_save"], 1.5))
    row("second snapshot, guest idle, wall", "≤ 1.3× bare", lambda r: _cell(r["idle"]["wall"], r["bare_pause"], 1.3))
    row("second snapshot after 5% of pages rewritten (scattered 4 KiB), wall", "≤ 1.5× bare",
        lambda r: _cell(r["scattered"]["wall"], r["bare_pause"], 1.5))
    row("… new bytes stored / image", "", lambda r: (
        f"{r['scattered']['out']['stored_bytes'] / r['first']['out']['size'] * 100:.1f}% "
        f"({r['scattered']['out']['stored_bytes'] >> 20} MiB)"))
    row("guest pause window (first snapshot)", "≤ 1.1× bare + 50 ms", lambda r: _cell(
        r["first"]["out"]["pause_window_s"], r["bare_pause"], 1.1, 0.05))
    row("… (second snapshot, idle)", "≤ 1.1× bare + 50 ms", lambda r: _cell(
        r["idle"]["out"]["pause_window_s"], r["bare_pause"], 1.1, 0.05))
    row("by hand rollback: destroy guest, re-create vTPM until it serves, `xl restore`", "",
        lambda r: f"{r['hand_rollback']:.2f} s")
    row("rollback (`--no-safety-checkpoint`), wall", "≤ 1.5× by hand",
        lambda r: _cell(r["rollback"]["wall"], r["hand_rollback"], 1.5))
    row("… to the scattered checkpoint (delta chunks)", "≤ 1.5× by hand",
        lambda r: _cell(r["rollback_delta"]["wall"], r["hand_rollback"], 1.5))
    row("guest downtime in a rollback", "≤ 1.2× by hand",
        lambda r: _cell(r["rollback"]["out"]["downtime_s"], r["hand_rollback"], 1.2))
    row("peak RSS of xen-vtpm, without the spool: snapshot / rollback (VmHWM)", "≤ 100 MiB at 8 GiB", lambda r: (
        f"{max(r[k]['maxrss_kib'] for k in ('first', 'idle', 'scattered')) >> 10} / "
        f"{max(r[k]['maxrss_kib'] for k in ('rollback', 'rollback_delta')) >> 10} MiB "
        f"({max(r[k]['vmhwm_kib'] for k in ('first', 'idle', 'scattered')) >> 10} / "
        f"{max(r[k]['vmhwm_kib'] for k in ('rollback', 'rollback_delta')) >> 10} MiB)"))
    for op, key in (("snapshot", "first"), ("rollback", "rollback"), ("delete", "delete")):
        row(f"TPM commands / NV writes per {op}: host TPM; manager's TPM", "NV writes ≤ 2", lambda r, k=key: "; ".join(
            f"{c} / {nv}" for c, nv in r[k]["tpm"].values()))
    head = ["measure", *(f"{r['size'] / GIB:g} GiB guest" for r in results), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *cells, target]) + " |" for label, cells, target in rows]
    return "\n".join(lines)


def growth_table(results: list[dict[str, Any]]) -> str:
    head = ["guest", "bare save + unpause", "by hand, durable", "first snapshot", "idle snapshot",
            "by hand rollback", "rollback", "rollback downtime", "peak RSS snapshot / rollback"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        lines.append("| " + " | ".join([
            f"{r['size'] / GIB:g} GiB", f"{r['bare_pause']:.2f} s", f"{r['hand_save']:.2f} s",
            f"{r['first']['wall']:.2f} s", f"{r['idle']['wall']:.2f} s", f"{r['hand_rollback']:.2f} s",
            f"{r['rollback']['wall']:.2f} s", f"{r['rollback']['out']['downtime_s']:.2f} s",
            f"{r['first']['maxrss_kib'] >> 10} / {r['rollback']['maxrss_kib'] >> 10} MiB"]) + " |")
    return "\n".join(lines)


def stage_table(results: list[dict[str, Any]]) -> str:
    """CPU seconds per GiB of guest memory, per stage, as the tool counted them."""
    ops = [("first snapshot", "first"), ("idle snapshot", "idle"), ("scattered snapshot", "scattered"),
           ("rollback", "rollback"), ("rollback to deltas", "rollback_delta")]
    head = ["guest", "operation", *STAGES, "rest", "all (CPU s / GiB)", "fsync wall s / GiB"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        gib = r["size"] / GIB
        for label, key in ops:
            if key not in r:
                continue
            stages = r[key]["stages"]
            cpu = [stages.get(s, {}).get("cpu_s", 0.0) / gib for s in STAGES]
            total = r[key]["cpu_s"] / gib
            fsync_wall = stages.get("fsync", {}).get("wall_s", 0.0) / gib
            lines.append("| " + " | ".join([f"{gib:g} GiB", label, *(f"{c:.2f}" for c in cpu),
                                            f"{total - sum(cpu):.2f}", f"{total:.2f}", f"{fsync_wall:.2f}"]) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4", help="guest sizes in GiB of the main table (default 1,4)")
    p.add_argument("--growth", default="8", help="more sizes for the wall time against size (default 8; '' none)")
    p.add_argument("--dir", default=None, help="where the simulated hosts live (a real disk; default $TMPDIR)")
    p.add_argument("--reps", type=int, default=1, help="runs per size; every cell is their median (default 1)")
    p.add_argument("--json", action="store_true", help="print the raw measurements too")
    args = p.parse_args(argv)
    # An installed tool (and Xen's xl, which the sim's stands in for) starts from compiled code.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    base = Path(args.dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    main_sizes = [float(s) for s in args.sizes.split(",") if s]
    more = [float(s) for s in args.growth.split(",") if s]
    load = os.getloadavg()[0]
    t0 = time.monotonic()
    results = []
    for size in main_sizes + more:
        print(f"bench: {size:g} GiB guest ...", file=sys.stderr, flush=True)
        results.append(median_of([measure(size, base, full=size in main_sizes) for _ in range(args.reps)]))
    print(f"`snapshot and rollback, {os.cpu_count()} CPUs; {args.reps} run(s) per size, medians; "
          f"{time.monotonic() - t0:.0f} s; load average before {load:.2f}, after {os.getloadavg()[0]:.2f}`\n")
    if args.json:
        print(json.dumps(results, indent=2) + "\n")
    full = [r for r in results if "scattered" in r]
    print(main_table(full) + "\n")
    print(growth_table(sorted(results, key=lambda r: r["size"])) + "\n")
    print(stage_table(full))
    return 0


if __name__ == "__main__":
    sys.exit(main())
