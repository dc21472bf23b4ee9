"""Simulated vtpmmgr: Xen 4.17's own manager code with the xen-vtpm patch series, built natively.

`python -m xen_vtpm_sim.vtpmmgr --sim-dir DIR --domid M --name NAME --config CFGJSON`

This process only turns the domain's config into the command line of ``vtpmmgr/build/vtpmmgr-native``
and becomes it (exec): Xen's main(), init and TPM 2.0 code, SAVEHASHKEY/LOADHASHKEY handler and
sealed disk table, as patched by ``vtpmmgr/patches/`` (checkpoint extension, TPM 2.0 persistence, NV
counter), with the mini-os/TPM/disk shim in ``vtpmmgr/shim/`` (see vtpmmgr/README.md).  The binary
is built by ``make setup`` with AddressSanitizer and UBSan; a sanitizer report ends the manager (its
console log says why).

Console log = the process output, as for every simulated domain.  ``extra=`` words go to the manager
as its mini-os command line.  What Xen leaves to the host is chosen by simulator-only keys of the
domain's xl cfg (a real xl ignores them):

  sim_xsm = "flask" | "none"          XSM/FLASK on the host (default "flask")
  sim_xsm_label = "LABEL"             the label of every vTPM stub domain under FLASK
  sim_unprovisioned = 1               nobody provisioned group 0 (provisioning words ignored)
  sim_release_race_ms = MS            libxl removes the backend before the manager frees it
  sim_crash_before_tpm_command = "CC[:N]"   die before the Nth TPM command CC (tests)
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from . import domain_args
from xen_vtpm.xen.xlcfg import disk_target

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "vtpmmgr" / "build" / "vtpmmgr-native"
SANITIZER_ENV = {
    # Leaks are not errors for a domain that keeps its table for its whole life and ends by exit.
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
# xl cfg key -> option of vtpmmgr-native
SIM_OPTIONS = {"sim_xsm": "--xsm", "sim_xsm_label": "--xsm-label", "sim_release_race_ms": "--release-race",
               "sim_crash_before_tpm_command": "--crash-before-tpm-command"}


def sim_options(cfg: dict[str, Any]) -> list[str]:
    """The host behaviours the domain's cfg asks for, as options of the native manager."""
    argv = []
    for key, option in SIM_OPTIONS.items():
        if key in cfg:
            argv += [option, str(cfg[key])]
    if cfg.get("sim_unprovisioned"):
        argv.append("--unprovisioned")
    return argv


def command(sim_dir: Path, domid: int, cfg: dict[str, Any]) -> list[str]:
    """The native manager's argv for this domain."""
    tcti = (sim_dir / "run" / "ptpm.tcti").read_text().strip()
    return [str(BINARY), "--domid", str(domid), "--disk", str(disk_target(cfg)), "--tcti", tcti,
            "--run-dir", str(sim_dir / "run"), *sim_options(cfg), "--", *str(cfg.get("extra", "")).split()]


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
