"""What a persisting vtpmmgr costs a guest: the latency of a guest TPM command, and the NV writes it
causes on the physical TPM, with the manager of the xen-vtpm series on a TPM 2.0 (swtpm) that writes
its table and advances its NV counter at every vTPM save, against the same manager unprovisioned
(it keeps its table in memory and writes nothing).

A vTPM stub domain saves after every successful guest command (docs/xen-internals.md §6.1): its own
disk slot, then SAVEHASHKEY, so every command below costs a manager write when the manager persists.
Runs of the two modes alternate, so a noisy neighbour hits both alike.

    python bench/vtpmmgr_save.py [-n COMMANDS] [--rounds R]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from sim_fixture import start_sim_host, stop_sim_host  # noqa: E402
from test_vtpm_stubdom import VtpmLab, wait_manager_console  # noqa: E402
from tpm2_pytss import ESAPI, TCTILdr, TSS2_Exception  # noqa: E402
from tpm2_pytss.constants import ESYS_TR  # noqa: E402

COUNTER_INDEX = 0x0100A100        # tpm2_counter.h TPM2_COUNTER_DEFAULT_INDEX


def _counter(tcti: str) -> int | None:
    """The manager's NV counter (OWNERREAD), None when the manager has none."""
    name, _, conf = tcti.partition(":")
    with ESAPI(TCTILdr(name, conf)) as ectx:
        try:
            handle = ectx.tr_from_tpmpublic(COUNTER_INDEX)
        except TSS2_Exception:         # no such index: an unprovisioned manager
            return None
        return int.from_bytes(bytes(ectx.nv_read(handle, 8, 0, auth_handle=ESYS_TR.OWNER)), "big")


def _restart(lab: VtpmLab, cfg_text: str) -> None:
    cfg = lab.sim.dir / "images" / "vtpmmgr.cfg"
    old = lab.mgr.info().domid
    lab.sim.xl("destroy", "vtpmmgr")
    lab.xs.wait_for(lambda: not lab.xs.is_introduced(old), ["@releaseDomain"], 20)
    cfg.write_text(cfg_text)
    log = lab.sim.dir / "logs" / "guest-vtpmmgr.log"
    offset = log.stat().st_size
    lab.sim.xl("create", str(cfg))
    wait_manager_console(log, offset)


def _run(lab: VtpmLab, name: str, commands: int) -> tuple[list[float], int | None]:
    """Per-command latencies (ms) of GetRandom through a fresh vTPM, and NV increments meanwhile."""
    dom = lab.create(name)
    ptpm = (lab.sim.dir / "run" / "ptpm.tcti").read_text().strip()
    samples = []
    with lab.tpm(dom) as tpm:
        tpm.ctx.get_random(8)                  # the first save creates the manager's entry
        before = _counter(ptpm)
        for _ in range(commands):
            t = time.perf_counter()
            tpm.ctx.get_random(8)
            samples.append((time.perf_counter() - t) * 1000)
        after = _counter(ptpm)
    lab.destroy(dom)
    return samples, None if before is None or after is None else after - before


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--commands", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    results: dict[str, list[float]] = {"persistent": [], "unprovisioned": []}
    increments: dict[str, list[int | None]] = {"persistent": [], "unprovisioned": []}
    with tempfile.TemporaryDirectory(prefix="vb") as tmp:
        sim = start_sim_host(Path(tmp) / "h")
        try:
            lab = VtpmLab(sim)
            images = sim.dir / "images"
            persistent = (images / "vtpmmgr.cfg").read_text()
            blank = images / "blank.img"
            blank.write_bytes(bytes(2 << 20))
            unprovisioned = (persistent.replace(str(images / "vtpmmgr.img"), str(blank))
                             + "sim_unprovisioned=1\n")
            for r in range(args.rounds):
                for mode, text in (("persistent", persistent), ("unprovisioned", unprovisioned)):
                    _restart(lab, text)
                    samples, nv = _run(lab, f"vtpm-{mode}-{r}", args.commands)
                    results[mode] += samples
                    increments[mode].append(nv)
            lab.close()
        finally:
            stop_sim_host(sim)
    print(f"guest TPM2_GetRandom through a vTPM stub domain, {args.rounds} x {args.commands} commands per mode")
    print(f"{'manager':<16}{'median ms':>10}{'p90 ms':>9}{'NV increments / command':>26}")
    for mode, samples in results.items():
        samples.sort()
        counted = [n for n in increments[mode] if n is not None]
        per = f"{sum(counted) / (len(counted) * args.commands):.2f}" if counted else "none"
        print(f"{mode:<16}{statistics.median(samples):>10.2f}{samples[int(0.9 * (len(samples) - 1))]:>9.2f}{per:>26}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
