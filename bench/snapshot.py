"""Snapshot and rollback cost against bare `xl`, side by side for several guest sizes.

For each size it starts a simulated host (one per size, taken down after),
creates a guest with a vTPM, fills its memory with pseudo-random bytes (no
page dedups against another: the worst case for the store) and measures

  baselines   bare `xl save -p` + `xl unpause` (no vTPM handling);
              by hand: `xl save -p` + copy of the vTPM image + `xl unpause`;
  ours        `xen-vtpm snapshot`: pause window (the coordinator's
              pause_window_s) and wall time;
              second snapshots: after the guest ran idle (its own writes only),
              after 5% of its memory was rewritten in clustered runs, and in
              scattered single pages — new bytes stored / image size;
              `xen-vtpm rollback --no-safety-checkpoint` against bare `xl restore`,
              to the first snapshot and to the scattered one (delta chunks);
              peak RSS of the xen-vtpm process itself (RUSAGE_SELF, so not the
              sim `xl`, which stands in for the real C one).

The 5% change is made by pausing the guest and writing into its memory file
(the sim guest's RAM is a shared file mapping), then unpausing it.

    python bench/snapshot.py [--sizes 1,4] [--dir DIR] [--run-kib 256] [--markdown]

Put --dir on a real disk (not tmpfs): the images are written where a dom0
would write them, and tmpfs would also eat the RAM the guests need.
"""
from __future__ import annotations

import argparse
import json
import mmap
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xen_vtpm_sim import domains, host  # noqa: E402

GUEST = "bg"
PAGE = 4096
BLOCK = 64 << 20
# Runs the CLI and reports the peak RSS of this process alone: VmHWM of its own address space
# (ru_maxrss would also carry the RSS the bench had when it forked, and the xl it spawns).
LAUNCH = ("import re, sys\nfrom xen_vtpm.cli import main\nrc = main(sys.argv[1:])\nsys.stdout.flush()\n"
          "hwm = re.search(r'VmHWM:\\s+(\\d+)', open('/proc/self/status').read()).group(1)\n"
          "print(f'maxrss_kib={hwm}', file=sys.stderr)\nsys.exit(rc)\n")


class Bench:
    def __init__(self, sim_dir: Path, env: dict[str, str]) -> None:
        self.dir, self.env = sim_dir, env

    def _run(self, argv: list[str], sync: bool = True) -> tuple[float, subprocess.CompletedProcess]:
        # Start every measure with no dirty pages queued: otherwise whichever runs after a big write
        # pays for the kernel's writeback throttling of the one before.
        if sync:
            os.sync()
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        return wall, proc

    def xl(self, *args: str, sync: bool = True) -> float:
        return self._run([str(self.dir / "bin" / "xl"), *args], sync=sync)[0]

    def tool(self, *args: str) -> tuple[float, Any, int]:
        """(wall s, parsed --json output, peak RSS KiB) of one `xen-vtpm` command."""
        wall, proc = self._run([sys.executable, "-c", LAUNCH, "--json", *args])
        rss = int(proc.stderr.rsplit("maxrss_kib=", 1)[1].split()[0])
        return wall, json.loads(proc.stdout), rss

    def memfile(self) -> Path:
        return Path(domains.find(domains.snapshot(self.dir), GUEST)["memfile"])

    def vtpm_image(self) -> Path:
        return self.dir / "images" / f"vtpm-{GUEST}.img"

    def while_paused(self, write) -> None:
        """Change guest RAM as the guest would, but deterministically: pause, write, unpause."""
        self.xl("pause", GUEST)
        try:
            with open(self.memfile(), "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
                write(mm)
                mm.flush()
        finally:
            self.xl("unpause", GUEST)


def fill_random(mm: mmap.mmap, seed: int = 1) -> None:
    rng = random.Random(seed)
    for off in range(0, len(mm), BLOCK):
        n = min(BLOCK, len(mm) - off)
        mm[off:off + n] = rng.randbytes(n)


def dirty(mm: mmap.mmap, fraction: float, run_pages: int, seed: int) -> int:
    """Rewrite `fraction` of the pages in runs of run_pages (1 = scattered single pages); returns bytes."""
    rng = random.Random(seed)
    slots = len(mm) // PAGE // run_pages
    runs = max(1, round(len(mm) // PAGE * fraction / run_pages))
    span = run_pages * PAGE
    for slot in rng.sample(range(slots), runs):
        mm[slot * span:(slot + 1) * span] = rng.randbytes(span)
    return runs * span


def measure(size_gib: float, base: Path, run_kib: int) -> dict[str, Any]:
    sim_dir = Path(tempfile.mkdtemp(prefix="xvb-", dir=base))
    r: dict[str, Any] = {"size": int(size_gib * (1 << 30))}
    try:
        env = dict(os.environ, **host.up(sim_dir))
        b = Bench(Path(env["XEN_VTPM_SIM_DIR"]), env)
        b.tool("init")
        b._run([sys.executable, "-m", "xen_vtpm", "sim", "create", GUEST, "--memory", str(int(size_gib * 1024))])
        b.while_paused(fill_random)
        files = b.dir / "bench-files"
        files.mkdir()
        bare = files / "bare.save"

        # Baseline 1: bare xl save -p + unpause.
        r["bare_save_s"] = b.xl("save", "-p", GUEST, str(bare))
        r["bare_pause_s"] = r["bare_save_s"] + b.xl("unpause", GUEST, sync=False)
        # Baseline 2: by hand, the vTPM image copied while the guest is held paused.
        os.sync()
        t0 = time.perf_counter()
        b.xl("save", "-p", GUEST, str(files / "hand.save"), sync=False)
        shutil.copyfile(b.vtpm_image(), files / "hand-vtpm.img")
        b.xl("unpause", GUEST, sync=False)
        r["hand_s"] = time.perf_counter() - t0
        (files / "hand.save").unlink()

        wall, out, rss = b.tool("snapshot", GUEST, "--name", "s1")
        r.update(snap_s=wall, snap_pause_s=out["pause_window_s"], snap_stored=out["stored_bytes"],
                 image_size=out["size"], snap_rss_kib=rss)
        wall, out, rss = b.tool("snapshot", GUEST, "--name", "idle")
        r.update(idle_s=wall, idle_stored=out["stored_bytes"], idle_rss_kib=rss)
        for label, run_pages, seed in (("clustered", max(1, run_kib * 1024 // PAGE), 2), ("scattered", 1, 3)):
            changed = {}
            b.while_paused(lambda mm: changed.setdefault("bytes", dirty(mm, 0.05, run_pages, seed)))
            wall, out, rss = b.tool("snapshot", GUEST, "--name", label)
            r.update({f"{label}_s": wall, f"{label}_stored": out["stored_bytes"], f"{label}_changed": changed["bytes"],
                      f"{label}_rss_kib": rss})

        wall, out, rss = b.tool("rollback", GUEST, "s1", "--yes", "--no-safety-checkpoint")
        r.update(rollback_s=wall, rollback_rss_kib=rss)
        # The scattered checkpoint is mostly delta chunks against its parent: each opens its bases too.
        wall, out, rss = b.tool("rollback", GUEST, "scattered", "--yes", "--no-safety-checkpoint")
        r.update(rollback_delta_s=wall)
        b.xl("destroy", GUEST)
        r["bare_restore_s"] = b.xl("restore", str(bare))
    finally:
        host.down(sim_dir)
        shutil.rmtree(sim_dir, ignore_errors=True)
    return r


def _mib(n: float) -> str:
    return f"{n / (1 << 20):,.0f} MiB"


def table(results: list[dict[str, Any]], run_kib: int) -> str:
    """One markdown table: a row per measure, a column per size, targets checked per cell."""
    rows: list[tuple[str, list[str], str]] = []

    def row(label: str, target: str, cell) -> None:
        rows.append((label, [cell(r) for r in results], target))

    def verdict(ok: bool) -> str:
        return "pass" if ok else "**FAIL**"

    row("bare `xl save -p` to a file", "", lambda r: f"{r['bare_save_s']:.2f} s")
    row("bare `xl save -p` + `xl unpause` (pause window)", "", lambda r: f"{r['bare_pause_s']:.2f} s")
    row("by hand: `xl save -p` + copy vTPM image + unpause", "", lambda r: f"{r['hand_s']:.2f} s")
    row("`xen-vtpm snapshot` pause window", "≤ 1.1× bare + 50 ms", lambda r: (
        f"{r['snap_pause_s']:.2f} s = {r['snap_pause_s'] / r['bare_pause_s']:.2f}× "
        f"{verdict(r['snap_pause_s'] <= 1.1 * r['bare_pause_s'] + 0.05)}"))
    row("`xen-vtpm snapshot` wall", "≤ 1.15× bare save", lambda r: (
        f"{r['snap_s']:.2f} s = {r['snap_s'] / r['bare_save_s']:.2f}× {verdict(r['snap_s'] <= 1.15 * r['bare_save_s'])}"))
    row("first snapshot: stored / image", "", lambda r: f"{_mib(r['snap_stored'])} / {_mib(r['image_size'])}")
    row("2nd snapshot, guest idle (its own writes only)", "", lambda r: (
        f"{r['idle_stored'] / r['image_size'] * 100:.2f}% new ({_mib(r['idle_stored'])}), {r['idle_s']:.2f} s"))
    for label, what in (("clustered", f"{run_kib} KiB runs"), ("scattered", "single 4 KiB pages")):
        row(f"2nd snapshot after 5% rewritten, {what}", "≤ 10% new", lambda r, k=label: (
            f"{r[k + '_stored'] / r['image_size'] * 100:.1f}% new ({_mib(r[k + '_stored'])}), {r[k + '_s']:.2f} s "
            f"{verdict(r[k + '_stored'] <= 0.10 * r['image_size'])}"))
    row("bare `xl restore`", "", lambda r: f"{r['bare_restore_s']:.2f} s")
    row("`xen-vtpm rollback --no-safety-checkpoint` wall", "≤ 1.3× bare restore", lambda r: (
        f"{r['rollback_s']:.2f} s = {r['rollback_s'] / r['bare_restore_s']:.2f}× "
        f"{verdict(r['rollback_s'] <= 1.3 * r['bare_restore_s'])}"))
    row("same, to the scattered-pages checkpoint (delta chunks)", "≤ 1.3× bare restore", lambda r: (
        f"{r['rollback_delta_s']:.2f} s = {r['rollback_delta_s'] / r['bare_restore_s']:.2f}× "
        f"{verdict(r['rollback_delta_s'] <= 1.3 * r['bare_restore_s'])}"))
    row("peak RSS of xen-vtpm: snapshot / rollback", "bounded, size-independent", lambda r: (
        f"{r['snap_rss_kib'] / 1024:.0f} / {r['rollback_rss_kib'] / 1024:.0f} MiB"))

    head = ["measure", *(f"{r['size'] / (1 << 30):g} GiB guest" for r in results), "target"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *cells, target]) + " |" for label, cells, target in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4", help="guest sizes in GiB, comma-separated (default 1,4)")
    p.add_argument("--dir", default=None, help="where the simulated hosts live (a real disk; default $TMPDIR)")
    p.add_argument("--run-kib", type=int, default=256, help="run length of the clustered 5%% change (KiB)")
    p.add_argument("--json", action="store_true", help="print the raw measurements too")
    args = p.parse_args(argv)
    base = Path(args.dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for size in (float(s) for s in args.sizes.split(",")):
        print(f"bench: {size:g} GiB guest ...", file=sys.stderr, flush=True)
        results.append(measure(size, base, args.run_kib))
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results, args.run_kib))
    return 0


if __name__ == "__main__":
    sys.exit(main())
