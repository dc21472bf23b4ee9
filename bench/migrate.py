"""Moving a guest to another host: `xen-vtpm migrate` against bare `xl save` + copy + `xl restore`.

For each size it starts two simulated hosts on this machine (A and B, each with its own xenstored,
xl, vtpmmgr and TPMs; taken down after), trusts each to the other, creates on A a guest with a vTPM
and, for the baseline, a guest of the same size without one, fills both memories with pseudo-random
bytes, and measures

  bare      `xl save` on A (the domain is gone after it), copy of the file to B's directory,
            `xl restore` on B: the memory move of `xl migrate` without any vTPM (a guest with a vTPM
            cannot be moved this way at all: its vTPM would come up fresh, or not at all, on B);
  ours      `xen-vtpm migrate -s "xen-vtpm sim ssh" GUEST B`, wall time (a cold move: the guest is
            down from its suspend on A, after the two hosts' handshake, until B commits, so nearly
            all of it); then the move back with one checkpoint (`--with-checkpoints`: the checkpoint
            read from B's store and written, re-encrypted, into A's);
  swtpm     the same two moves for an HVM guest of the same size whose TPM 2.0 is an swtpm in dom0
            (its state re-encrypted under the destination's key on the way, and the checkpoint's
            capture too: docs/migration.md §6), made once the first guest is gone.

    python bench/migrate.py [--sizes 1,4] [--dir DIR] [--json]

Put --dir on a real disk: the save files and spools go there.
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

GUEST, PLAIN, HVM = "mg", "mgplain", "mghvm"
BLOCK = 64 << 20
SSH = "xen-vtpm sim ssh"


class Host:
    def __init__(self, sim_dir: Path) -> None:
        env = dict(os.environ, **host.up(sim_dir))
        # The remote end runs `xen-vtpm migrate-receive` by name, as xl runs `xl migrate-receive`.
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"
        self.dir, self.env = Path(env["XEN_VTPM_SIM_DIR"]), env

    def run(self, argv: list[str]) -> tuple[float, subprocess.CompletedProcess]:
        os.sync()     # no dirty pages queued by the step before: each measure pays only for its own
        t0 = time.perf_counter()
        proc = subprocess.run(argv, env=self.env, capture_output=True, text=True, timeout=3600)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"bench: {' '.join(argv)} exited {proc.returncode}: {proc.stderr.strip()[-400:]}")
        return wall, proc

    def xl(self, *args: str) -> float:
        return self.run([str(self.dir / "bin" / "xl"), *args])[0]

    def tool(self, *args: str) -> float:
        return self.run([sys.executable, "-m", "xen_vtpm", *args])[0]

    def fill(self, name: str, seed: int) -> None:
        self.xl("pause", name)
        memfile = Path(domains.find(domains.snapshot(self.dir), name)["memfile"])
        rng = random.Random(seed)
        with open(memfile, "r+b") as fh, mmap.mmap(fh.fileno(), 0) as mm:
            for off in range(0, len(mm), BLOCK):
                n = min(BLOCK, len(mm) - off)
                mm[off:off + n] = rng.randbytes(n)
            mm.flush()
        self.xl("unpause", name)


def measure(size_gib: float, base: Path) -> dict[str, Any]:
    work = Path(tempfile.mkdtemp(prefix="xvm-", dir=base))
    mib = str(int(size_gib * 1024))
    r: dict[str, Any] = {"size": int(size_gib * (1 << 30))}
    hosts: list[Host] = []
    try:
        a, b = Host(work / "A"), Host(work / "B")
        hosts += [a, b]
        for name, h in (("A", a), ("B", b)):
            h.tool("init")
            (work / f"{name}.key").write_text(h.run([sys.executable, "-m", "xen_vtpm", "host-key"])[1].stdout)
        a.tool("trust", "add", "B", str(work / "B.key"))
        b.tool("trust", "add", "A", str(work / "A.key"))
        a.tool("sim", "create", GUEST, "--memory", mib)
        a.tool("sim", "create", PLAIN, "--memory", mib, "--no-vtpm")
        a.fill(GUEST, 1)
        a.fill(PLAIN, 2)

        save = work / "A" / "plain.save"
        r["bare_save_s"] = a.xl("save", PLAIN, str(save))
        t0 = time.perf_counter()
        shutil.copyfile(save, work / "B" / "plain.save")
        os.sync()
        r["bare_copy_s"] = time.perf_counter() - t0
        r["bare_restore_s"] = b.xl("restore", str(work / "B" / "plain.save"))
        r["bare_s"] = r["bare_save_s"] + r["bare_copy_s"] + r["bare_restore_s"]
        b.xl("destroy", PLAIN)

        r["move_s"] = a.tool("migrate", "-s", SSH, GUEST, str(b.dir))
        b.tool("snapshot", GUEST, "--name", "on-b")
        r["move_back_ckpt_s"] = b.tool("migrate", "-s", SSH, "--with-checkpoints", GUEST, str(a.dir))
        a.xl("destroy", GUEST)

        a.tool("sim", "create", HVM, "--memory", mib, "--vtpm", "swtpm")
        a.fill(HVM, 3)
        r["swtpm_move_s"] = a.tool("migrate", "-s", SSH, HVM, str(b.dir))
        b.tool("snapshot", HVM, "--name", "hvm-on-b")
        r["swtpm_move_back_ckpt_s"] = b.tool("migrate", "-s", SSH, "--with-checkpoints", HVM, str(a.dir))
    finally:
        for h in hosts:
            host.down(h.dir)
        shutil.rmtree(work, ignore_errors=True)
    return r


def table(results: list[dict[str, Any]]) -> str:
    rows: list[tuple[str, list[str]]] = []

    def row(label: str, cell) -> None:
        rows.append((label, [cell(r) for r in results]))

    row("bare `xl save` (plain guest, no vTPM)", lambda r: f"{r['bare_save_s']:.2f} s")
    row("copy of the save file to the other host's disk", lambda r: f"{r['bare_copy_s']:.2f} s")
    row("bare `xl restore` there", lambda r: f"{r['bare_restore_s']:.2f} s")
    row("bare total: save + copy + restore", lambda r: f"{r['bare_s']:.2f} s")
    row("`xen-vtpm migrate` (guest with its vTPM)", lambda r: (
        f"{r['move_s']:.2f} s = {r['move_s'] / r['bare_s']:.2f}× bare"))
    row("`xen-vtpm migrate --with-checkpoints` (1 checkpoint)", lambda r: (
        f"{r['move_back_ckpt_s']:.2f} s = {r['move_back_ckpt_s'] / r['bare_s']:.2f}× bare"))
    row("`xen-vtpm migrate`, swtpm vTPM (HVM guest)", lambda r: (
        f"{r['swtpm_move_s']:.2f} s = {r['swtpm_move_s'] / r['bare_s']:.2f}× bare"))
    row("`xen-vtpm migrate --with-checkpoints`, swtpm vTPM (1 checkpoint)", lambda r: (
        f"{r['swtpm_move_back_ckpt_s']:.2f} s = {r['swtpm_move_back_ckpt_s'] / r['bare_s']:.2f}× bare"))
    head = ["measure", *(f"{r['size'] / (1 << 30):g} GiB guest" for r in results)]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join([label, *cells]) + " |" for label, cells in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sizes", default="1,4", help="guest sizes in GiB, comma-separated (default 1,4)")
    p.add_argument("--dir", default=None, help="where the simulated hosts live (a real disk; default $TMPDIR)")
    p.add_argument("--json", action="store_true", help="print the raw measurements too")
    args = p.parse_args(argv)
    base = Path(args.dir or tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    results = []
    for size in (float(s) for s in args.sizes.split(",")):
        print(f"bench: {size:g} GiB guest ...", file=sys.stderr, flush=True)
        results.append(measure(size, base))
    if args.json:
        print(json.dumps(results, indent=2))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
