"""Simulated vtpmmgr: Xen 4.17's own manager code with the xen-vtpm patch series, built natively.

`python -m xen_vtpm_sim.vtpmmgr --sim-dir DIR --domid M --name NAME --config CFGJSON`

This process only turns the domain's config into the command line of ``vtpmmgr/build/vtpmmgr-native``
and becomes it (exec): Xen's main(), init and TPM 2.0 code, SAVEHASHKEY/LOADHASHKEY handler and
sealed disk table, as patched by ``vtpmmgr/patches/`` (checkpoint extension, TPM 2.0 persistence, NV
counter), with the mini-os/TPM/disk shim in ``vtpmmgr/shim/`` (see vtpmmgr/README.md).  The binary
is built by ``make setup`` with AddressSanitizer and UBSan; a sanitizer report ends the manager (its
console log says why).

Console log = the process output, as for every simulated domain.  ``extra=`` words go to the manager
as its mini-os command line (``checkpoint=0`` = stock manager).  What Xen leaves to the host comes
from the simulated platform (``platform.py``: `sim up --unprovisioned`, `--xsm none`,
`--release-delay`) and, for one manager, from simulator-only keys of its xl cfg (a real xl ignores
them; a key wins over the platform):

  sim_xsm = "flask" | "none"          XSM/FLASK on the host
  sim_xsm_label = "LABEL"             the label of every vTPM stub domain under FLASK
  sim_unprovisioned = 1               nobody provisioned group 0 (provisioning words ignored);
                                      the ``extra=`` word ``provision=0`` does the same
  sim_release_delay = S               libxl removes the backend S seconds before the manager frees it
  sim_crash_before_tpm_command = "CC[:N]"   die before the Nth TPM command CC (tests)

Each becomes an option of the native manager (vtpmmgr/README.md).
"""
from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from xen_vtpm.xen.xlcfg import disk_target

from . import domain_args, platform

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "vtpmmgr" / "build" / "vtpmmgr-native"
SANITIZER_ENV = {
    # Leaks are not errors for a domain that keeps its table for its whole life and ends by exit.
    "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=1:halt_on_error=1",
    "UBSAN_OPTIONS": "halt_on_error=1:print_stacktrace=1",
}
# xl cfg key -> option of vtpmmgr-native
SIM_OPTIONS = {"sim_xsm": "--xsm", "sim_xsm_label": "--xsm-label", "sim_release_delay": "--release-delay",
               "sim_crash_before_tpm_command": "--crash-before-tpm-command"}


def sim_options(sim_dir: Path, cfg: dict[str, Any]) -> list[str]:
    """The host behaviours the platform and the domain's cfg ask for, as options of the native manager."""
    host = platform.load(sim_dir)
    chosen = {"sim_xsm": host.xsm}
    if host.release_delay:
        chosen["sim_release_delay"] = f"{host.release_delay:g}"
    chosen.update({key: str(cfg[key]) for key in SIM_OPTIONS if key in cfg})
    argv = []
    for key, option in SIM_OPTIONS.items():
        if key in chosen:
            argv += [option, chosen[key]]
    if cfg.get("sim_unprovisioned") or "provision=0" in str(cfg.get("extra", "")).split() or not host.provisioned:
        argv.append("--no-provision")
    return argv


def command(sim_dir: Path, domid: int, cfg: dict[str, Any]) -> list[str]:
    """The native manager's argv for this domain."""
    tcti = (sim_dir / "run" / "ptpm.tcti").read_text().strip()
    words = [w for w in str(cfg.get("extra", "")).split() if w != "provision=0"]
    return [str(BINARY), "--domid", str(domid), "--disk", str(disk_target(cfg)), "--tcti", tcti,
            "--run-dir", str(sim_dir / "run"), *sim_options(sim_dir, cfg), "--", *words]


def main(argv: list[str] | None = None) -> int:
    args, cfg = domain_args.parse("vtpmmgr", argv)
    if not os.access(BINARY, os.X_OK):
        print(f"vtpmmgr: {BINARY} is missing; build it with `make setup` (or `make -C vtpmmgr`)", flush=True)
        return 1
    (args.sim_dir / "run" / "tpmif").mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, **SANITIZER_ENV)
    # ASan keeps freed blocks in a quarantine (256 MiB by default) to catch a use after free: the
    # manager's RSS grows with it although nothing leaks.  bench/soak.py sets 0 to watch for leaks.
    quarantine = os.environ.get("XEN_VTPM_SIM_ASAN_QUARANTINE_MB", "")
    if quarantine.isdigit():
        env["ASAN_OPTIONS"] += f":quarantine_size_mb={quarantine}"
    sys.stdout.flush()
    os.execve(BINARY, command(args.sim_dir, args.domid, cfg), env)
    return 1   # not reached


if __name__ == "__main__":
    sys.exit(main())
