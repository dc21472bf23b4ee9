"""Soak: many snapshot/rollback cycles on one guest, watching for slow leaks.

One simulated host, one guest with a vTPM.  Each cycle runs `xen-vtpm snapshot`,
then `xen-vtpm rollback --yes` to that snapshot (with its safety checkpoint, as
an administrator would), then `xen-vtpm delete` for every checkpoint but the
newest --keep, so the store holds a bounded set by design and any growth of
the state dir is a leak.

Every --every cycles it samples the long-lived processes of the host
(xenstored, the host TPM's and the vtpmmgr's swtpm, vtpmmgr, the vTPM stub
domain with its swtpm, the guest): open file descriptors and RSS; the number of
processes the simulated host owns (and, for information, on the whole machine);
the state dir size and the catalog size.  The vTPM stub domain and the guest
are new processes after each rollback: their figures staying flat shows that
nothing accumulates in what they inherit or re-open.

At the end it prints the samples, throughput and latency percentiles, and
exits 1 if fds, RSS, the host's process count or the state dir (without the
catalog, whose audit log and op journal grow by design) grew beyond a
small tolerance between the first sample after warm-up and the last.

    python bench/soak.py [--cycles 500] [--every 25] [--keep 3] [--memory 16] [--dir DIR] [--markdown]
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from xen_vtpm_sim import domains, host  # noqa: E402

GUEST = "soak"
# name in the table -> how to find its pid: a host daemon pid file, or a domain name.
LONG_LIVED = (("xenstored", "pid:xenstored"), ("hosttpm-swtpm", "pid:hosttpm"), ("ptpm-swtpm", "pid:ptpm"),
              ("vtpmmgr", "dom:vtpmmgr"), ("vtpm-stubdom", f"dom:vtpm-{GUEST}"), ("guest", f"dom:{GUEST}"))
# Allowed growth from the first sample after warm-up to the last.
FD_SLACK = 2
RSS_SLACK_KIB, RSS_SLACK_FRAC = 4096, 0.10
STATE_SLACK_BYTES, STATE_SLACK_FRAC = 2 << 20, 0.25


class Soak:
    def __init__(self, sim_dir: Path, env: dict[str, str]) -> None:
        self.dir, self.env = sim_dir, env

    def tool(self, *args: str) -> tuple[float, str]:
        t0 = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "xen_vtpm", *args], env=self.env, capture_output=True,
                              text=True, timeout=300)
        took = time.monotonic() - t0
        if proc.returncode != 0:
            raise SystemExit(f"soak: xen-vtpm {' '.join(args)} exited {proc.returncode}: {proc.stderr.strip()}")
        return took, proc.stdout

    def pid_of(self, where: str) -> int | None:
        kind, name = where.split(":", 1)
        if kind == "pid":
            try:
                return int((self.dir / "run" / f"{name}.pid").read_text())
            except (OSError, ValueError):
                return None
        dom = domains.find(domains.snapshot(self.dir), name)
        return dom["pid"] if dom else None

    def prune(self, keep: int) -> tuple[int, float]:
        """Delete all but the newest `keep` checkpoints; (deleted, seconds)."""
        _, out = self.tool("--json", "checkpoints", GUEST)
        rows = sorted(json.loads(out), key=lambda r: (r["time"], r["id"]))
        took = 0.0
        for row in rows[:-keep] if keep else rows:
            t, _ = self.tool("delete", row["id"])
            took += t
        return max(0, len(rows) - keep), took

    def sample(self, cycle: int) -> dict[str, Any]:
        row: dict[str, Any] = {"cycle": cycle}
        for label, where in LONG_LIVED:
            pids = _with_children(self.pid_of(where))
            row[f"{label}.fds"] = sum(_fds(p) for p in pids) if pids else None
            row[f"{label}.rss_kib"] = sum(_rss_kib(p) for p in pids) if pids else None
        row["sim_procs"] = len(domains.owned_pids(self.dir))
        row["host_procs"] = sum(1 for e in os.listdir("/proc") if e.isdigit())
        # The catalog keeps the audit log and the op journal, which grow by design; the rest must not.
        row["catalog_bytes"] = sum(_size(self.dir / "state" / f"catalog.sqlite{s}") for s in ("", "-wal", "-journal"))
        row["store_bytes"] = _du(self.dir / "state") - row["catalog_bytes"]
        return row


def _with_children(pid: int | None) -> list[int]:
    """pid and its direct children (the vTPM stub domain runs its swtpm as a child)."""
    if pid is None or not domains.is_alive(pid):
        return []
    kids = []
    for task in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(c) for c in task.read_text().split()]
        except OSError:
            pass
    return [pid, *kids]


def _fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def _rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


def _du(path: Path) -> int:
    """Allocated bytes under path (what the disk really gives up)."""
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_blocks * 512
            except OSError:
                pass
    return total


def percentiles(values: list[float]) -> dict[str, float]:
    s = sorted(values)

    def at(q: float) -> float:  # nearest-rank
        return s[min(len(s) - 1, max(0, int(-(-q * len(s) // 1)) - 1))]

    return {"n": len(s), "p50": at(0.50), "p90": at(0.90), "p99": at(0.99), "max": s[-1]}


def check_growth(first: dict[str, Any], last: dict[str, Any]) -> list[str]:
    """Growth beyond tolerance between two samples, one line per problem."""
    bad = []
    for key, a in first.items():
        b = last.get(key)
        if a is None or b is None or key in ("cycle", "host_procs", "catalog_bytes"):
            continue
        if key.endswith(".fds") and b > a + FD_SLACK:
            bad.append(f"{key}: {a} -> {b} open fds")
        elif key.endswith(".rss_kib") and b > a * (1 + RSS_SLACK_FRAC) + RSS_SLACK_KIB:
            bad.append(f"{key}: {a} -> {b} KiB RSS")
        elif key == "sim_procs" and b > a:
            bad.append(f"processes of the simulated host: {a} -> {b}")
        elif key == "store_bytes" and b > a * (1 + STATE_SLACK_FRAC) + STATE_SLACK_BYTES:
            bad.append(f"state dir without the catalog: {a} -> {b} bytes with at most the same number of checkpoints")
    return bad


def render(samples: list[dict[str, Any]], markdown: bool) -> str:
    cols = ["cycle"] + [f"{label}.{m}" for label, _ in LONG_LIVED for m in ("fds", "rss_kib")] + \
        ["sim_procs", "host_procs", "store_bytes", "catalog_bytes"]
    heads = [c.replace(".rss_kib", " RSS KiB").replace(".fds", " fds") for c in cols]
    rows = [["-" if s.get(c) is None else str(s[c]) for c in cols] for s in samples]
    if markdown:
        out = ["| " + " | ".join(heads) + " |", "|" + "---|" * len(heads)]
        out += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(out)
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(heads)]
    return "\n".join("  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in [heads, *rows])


def run(args: argparse.Namespace, base: Path) -> int:
    sim_dir = base / "h"
    # The simulator's vtpmmgr is built with AddressSanitizer, whose quarantine of freed blocks grows its
    # RSS by up to 256 MiB without any leak: without the quarantine, growth is the manager's own.
    os.environ.setdefault("XEN_VTPM_SIM_ASAN_QUARANTINE_MB", "0")
    soak = Soak(sim_dir, dict(os.environ, **host.up(sim_dir)))
    try:
        soak.tool("init")
        soak.tool("sim", "create", GUEST, "--memory", str(args.memory))
        lat: dict[str, list[float]] = {"snapshot": [], "rollback": [], "delete": []}
        samples = [soak.sample(0)]
        t_start = time.monotonic()
        done = 0
        try:
            for cycle in range(1, args.cycles + 1):
                took, _ = soak.tool("snapshot", GUEST, "--name", f"c{cycle}")
                lat["snapshot"].append(took)
                took, _ = soak.tool("rollback", GUEST, f"c{cycle}", "--yes")
                lat["rollback"].append(took)
                n, took = soak.prune(args.keep)
                if n:
                    lat["delete"].append(took / n)
                done = cycle
                if cycle % args.every == 0 or cycle == args.cycles:
                    samples.append(soak.sample(cycle))
                    if not args.quiet:
                        print(f"soak: cycle {cycle}/{args.cycles}, {time.monotonic() - t_start:.0f} s: "
                              f"{json.dumps(samples[-1])}", file=sys.stderr)
        except KeyboardInterrupt:  # a long soak stopped by hand still reports what it saw
            print(f"soak: interrupted after cycle {done}", file=sys.stderr)
            if done != samples[-1]["cycle"]:
                samples.append(soak.sample(done))
        elapsed = time.monotonic() - t_start
        if not done:
            return 130
        soak.tool("verify", "--all")
        soak.tool("audit", "--verify")
    finally:
        host.down(sim_dir)
    left = domains.owned_pids(sim_dir)

    print(render(samples, args.markdown))
    print()
    print(f"{done} cycles in {elapsed:.1f} s: {done / elapsed * 60:.1f} cycles/min "
          f"({elapsed / done:.2f} s per snapshot + rollback + prune)")
    for op, values in lat.items():
        if values:
            p = percentiles(values)
            print(f"{op:9s} n={p['n']:4d}  p50 {p['p50']:.3f} s  p90 {p['p90']:.3f} s  "
                  f"p99 {p['p99']:.3f} s  max {p['max']:.3f} s")
    # The first cycles fill caches and the catalog; growth is judged from the first sample after them.
    baseline = samples[1] if len(samples) > 2 else samples[0]
    # The store breathes: dead pack space builds up until a delete compacts it (live < 50%), so a
    # point sample can sit at a trough or a peak.  Compare the peak of the later half with the
    # peak of the earlier half instead: a leak still raises the later one.
    later = samples[len(samples) // 2:]
    earlier = [s for s in samples if baseline["cycle"] <= s["cycle"] < later[0]["cycle"]] or [baseline]
    first = dict(baseline, store_bytes=max(s["store_bytes"] for s in earlier))
    last = dict(samples[-1], store_bytes=max(s["store_bytes"] for s in later))
    problems = check_growth(first, last)
    if left:
        problems.append(f"sim down left {len(left)} processes behind")
    for p in problems:
        print(f"soak: FAIL: {p}", file=sys.stderr)
    if not problems:
        print(f"soak: ok, no growth from cycle {baseline['cycle']} to {samples[-1]['cycle']}")
    return 1 if problems else 0 if done == args.cycles else 130


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cycles", type=int, default=500)
    ap.add_argument("--every", type=int, default=0, help="sample every K cycles (default: cycles/20)")
    ap.add_argument("--keep", type=int, default=3, help="checkpoints kept after each cycle")
    ap.add_argument("--memory", type=int, default=16, help="guest memory in MiB")
    ap.add_argument("--dir", help="where the simulated host lives (default: a new temporary directory)")
    ap.add_argument("--markdown", action="store_true", help="print the sample table as Markdown")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args()
    if args.cycles < 1 or args.keep < 1:
        ap.error("--cycles and --keep must be at least 1")
    args.every = args.every or max(1, args.cycles // 20)
    if args.dir:
        base = Path(args.dir)
        base.mkdir(parents=True, exist_ok=True)
        return run(args, base)
    with tempfile.TemporaryDirectory(prefix="soak.") as tmp:
        return run(args, Path(tmp))


if __name__ == "__main__":
    sys.exit(main())
