"""`xen-vtpm sim ...`: run and drive the simulated Xen host."""
from __future__ import annotations

import argparse
import hashlib
import os
import shlex
from pathlib import Path

from xen_vtpm.errors import DomainNotFound, NotFound, UsageError

from . import boot, domains, host, reboot, ssh, xenstored


def _sim_dir(args: argparse.Namespace) -> Path:
    d = args.dir or os.environ.get("XEN_VTPM_SIM_DIR")
    if not d:
        raise UsageError("sim: no simulated host directory; pass --dir DIR or set XEN_VTPM_SIM_DIR")
    return Path(d).resolve()


def cmd_up(args: argparse.Namespace, cfg) -> int:
    env = host.up(_sim_dir(args), stock_manager=args.stock_manager, xsm=args.xsm,
                  provisioned=not args.unprovisioned, console_log=args.console_log,
                  release_delay=args.release_delay)
    if not args.quiet:
        for key, val in env.items():
            print(f"export {key}={shlex.quote(val)}")
    return 0


def cmd_down(args: argparse.Namespace, cfg) -> int:
    host.down(_sim_dir(args))
    return 0


def cmd_reboot(args: argparse.Namespace, cfg) -> int:
    changes = [boot.parse_change(text) for text in args.measure]
    info = reboot.reboot(_sim_dir(args), changes)
    if not args.quiet:
        print("started " + " ".join(info["started"]))
    return 0


def cmd_create(args: argparse.Namespace, cfg) -> int:
    info = host.create_guest(_sim_dir(args), args.name, memory=args.memory,
                             vtpm=False if args.no_vtpm else args.vtpm, tpm_version=args.tpm_version,
                             startup=args.startup, vtpm_disk=args.vtpm_disk, swtpm_state=args.swtpm_state)
    if not args.quiet:
        print(" ".join(f"{k}={v}" for k, v in info.items()))
    return 0


def cmd_xenstored(args: argparse.Namespace, cfg) -> int:
    xenstored.run(args.socket)
    return 0


def _domain(args: argparse.Namespace, ident: str) -> dict:
    dom = domains.find(domains.snapshot(_sim_dir(args)), ident)
    if dom is None:
        raise DomainNotFound(f"{ident}: no such domain on the simulated host in {_sim_dir(args)}; "
                             "see `xl list`")
    return dom


def cmd_tcti(args: argparse.Namespace, cfg) -> int:
    dom = _domain(args, args.guest)
    dm_tcti = _sim_dir(args) / "run" / f"dm-{dom['domid']}.tcti"   # its TPM is in its device model (swtpm)
    if not dom.get("vtpms") and dm_tcti.exists():
        print(dm_tcti.read_text().strip())
        return 0
    if not dom.get("vtpms"):
        raise NotFound(f"{dom['name']}: guest has no vTPM; create it without --no-vtpm")
    backend = dom["vtpms"][0]["backend_domname"]
    tcti_file = _sim_dir(args) / "run" / f"{backend}.tcti"
    try:
        print(tcti_file.read_text().strip())
    except OSError:
        raise NotFound(f"{backend}: vTPM domain has not published a TCTI ({tcti_file.name} missing); "
                       f"check logs/guest-{backend}.log") from None
    return 0


def cmd_memdigest(args: argparse.Namespace, cfg) -> int:
    dom = _domain(args, args.guest)
    if not dom.get("memfile"):
        raise NotFound(f"{dom['name']}: domain has no guest memory image (stub domain)")
    h = hashlib.sha256()
    with open(dom["memfile"], "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    print(h.hexdigest())
    return 0


def cmd_ssh(args: argparse.Namespace, cfg) -> int:
    return ssh.run(args.host, args.command)


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="the simulated Xen host (for tests and the demo)")
    ssub = sim.add_subparsers(dest="sim_command", metavar="SIMCOMMAND", parser_class=type(sim))

    def add(name: str, func, help_text: str, dir_arg: bool = True) -> argparse.ArgumentParser:
        p = ssub.add_parser(name, help=help_text)
        if dir_arg:
            p.add_argument("--dir", help="simulated host directory (default $XEN_VTPM_SIM_DIR)")
        p.set_defaults(func=func, needs_config=False)
        return p

    p = add("up", cmd_up, "start a simulated host in DIR and print export lines for eval")
    p.add_argument("--stock-manager", action="store_true", help="vtpmmgr without the checkpoint extension")
    # Each option below reproduces one way a real Xen 4.17 host differs from the correctly configured default.
    p.add_argument("--xsm", choices=("flask", "none"), default="flask",
                   help="none: a hypervisor without XSM (x86 Xen 4.17's default), so no vTPM can reload its state")
    p.add_argument("--unprovisioned", action="store_true",
                   help="the manager's group 0 is not provisioned: it never writes its disk and refuses reloads")
    p.add_argument("--console-log", choices=("guest", "none"), default="guest",
                   help="xenconsoled --log: none (Xen's default) writes no guest-*.log, only the consoles' ptys")
    p.add_argument("--release-delay", type=float, default=0.0, metavar="S",
                   help="the manager clears a destroyed vTPM's OPEN flag S seconds after its backend dir is gone")
    add("down", cmd_down, "stop every process of the simulated host")
    p = add("reboot", cmd_reboot, "power-cycle the host: TPMs reset, boot measured again, every domain re-created")
    p.add_argument("--measure", action="append", default=[], metavar="PCR=TEXT",
                   help="what PCR measures from this boot on (a firmware or Xen update); repeatable")
    p = add("create", cmd_create, "create a guest and its vTPM stub domain")
    p.add_argument("name")
    p.add_argument("--memory", type=int, default=64, metavar="MiB")
    p.add_argument("--no-vtpm", action="store_true", help="guest without a vTPM")
    p.add_argument("--vtpm", choices=["stubdom", "swtpm"], default="stubdom",
                   help="a vTPM stub domain (default), or an HVM guest whose QEMU has an swtpm TPM 2.0")
    p.add_argument("--tpm-version", choices=("1.2", "2.0"), default="2.0",
                   help="1.2: Xen's vTPM (TPM 1.2 emulator); 2.0: the simulator's TPM 2.0 stand-in (default)")
    p.add_argument("--startup", choices=("save", "clear"), default="save",
                   help="the vTPM stub's startup mode: save (keeps PCRs across restarts) or clear (Xen's default)")
    p.add_argument("--swtpm-state", metavar="DIR",
                   help="with --vtpm swtpm: adopt this swtpm TPM 2.0 state directory (`xen-vtpm vtpm import`)")
    p.add_argument("--vtpm-disk", metavar="TARGET",
                   help="the vTPM stub's disk instead of a new image file, e.g. phy:/dev/loop3 (blanked by you)")
    p = add("xenstored", cmd_xenstored, "run the simulated xenstored in the foreground", dir_arg=False)
    p.add_argument("--socket", required=True)
    p = add("tcti", cmd_tcti, "print the TCTI of GUEST's vTPM")
    p.add_argument("guest")
    p = add("memdigest", cmd_memdigest, "print the SHA-256 of GUEST's current memory")
    p.add_argument("guest")
    p = add("ssh", cmd_ssh, "run COMMAND with the simulated host in directory HOST (`migrate -s` stand-in)",
            dir_arg=False)
    p.add_argument("host", metavar="HOST")
    p.add_argument("command", metavar="COMMAND", nargs=argparse.REMAINDER)
    sim.set_defaults(func=lambda args, cfg: _help(sim), needs_config=False)


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
