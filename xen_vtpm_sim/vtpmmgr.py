"""Simulated vtpmmgr: Xen 4.17's own manager code with the checkpoint extension, built natively.

`python -m xen_vtpm_sim.vtpmmgr --sim-dir DIR --domid M --name NAME --config CFGJSON`

This process only turns the domain's config into the command line of ``vtpmmgr/build/vtpmmgr-native``
and becomes it (exec): the SAVEHASHKEY/LOADHASHKEY handler, the sealed disk table and every
checkpoint request run in C -- Xen's vtpm_cmd_handler.c and disk code as patched by
``vtpmmgr/patches/``, the extension in ``vtpmmgr/src/``, the mini-os/TPM/disk shim in
``vtpmmgr/shim/`` (see vtpmmgr/README.md).  The binary is built by ``make setup`` with
AddressSanitizer and UBSan; a sanitizer report ends the manager (its console log says why).

Console log = the process output, as for every simulated domain.  ``extra=`` words go to the manager
as its mini-os command line (``checkpoint=0`` = stock manager); ``provision=0`` (simulator only)
leaves a fresh manager's group 0 unprovisioned, so it never writes its disk, as on Xen.  The simulated
platform (``platform.py``: `sim up --unprovisioned`, `--xsm none`, `--release-delay`) adds the shim
options that make Xen 4.17's own manager code meet those traps (vtpmmgr/README.md).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from xen_vtpm.xen.xlcfg import disk_target

from . import domain_args, platform

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "vtpmmgr" / "build" / "vtpmmgr-native"
SANITIZER_ENV = {
    # Leaks are not errors for a domain that keeps its table for its whole life and ends by exit.
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}


def command(sim_dir: Path, domid: int, cfg: dict) -> list[str]:
    """The native manager's argv for this domain."""
    words = str(cfg.get("extra", "")).split()
    tcti = (sim_dir / "run" / "ptpm.tcti").read_text().strip()
    argv = [str(BINARY), "--domid", str(domid), "--disk", str(disk_target(cfg)), "--tcti", tcti,
            "--run-dir", str(sim_dir / "run")]
    host = platform.load(sim_dir)
    if "provision=0" in words or not host.provisioned:
        argv.append("--no-provision")
    if host.xsm == "none":
        argv += ["--xsm", "none"]
    if host.release_delay:
        argv += ["--release-delay", f"{host.release_delay:g}"]
    return argv + ["--"] + [w for w in words if w != "provision=0"]


def main(argv: list[str] | None = None) -> int:
    args, cfg = domain_args.parse("vtpmmgr", argv)
    if not os.access(BINARY, os.X_OK):
        print(f"vtpmmgr: {BINARY} is missing; build it with `make setup` (or `make -C vtpmmgr`)", flush=True)
        return 1
    (args.sim_dir / "run" / "tpmif").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **SANITIZER_ENV)
    sys.stdout.flush()
    os.execve(BINARY, command(args.sim_dir, args.domid, cfg), env)
    return 1   # not reached


if __name__ == "__main__":
    sys.exit(main())
