"""Routing for the `xl` wrapper in xl-hooks/: which xl commands xen-vtpm must handle.

`save`, `restore` and `migrate` of a guest that has a vTPM are taken over (or
refused with the reason); everything else is handed to the real xl with its
arguments untouched.  The decision is a pure function of the arguments and two
lookups (does the domain / save file have a vTPM), so it is testable alone.
"""
from __future__ import annotations

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from xen_vtpm.config import Config
from xen_vtpm.errors import MalformedSaveFile, PreconditionFailed, UsageError, XlError

from .devicemodel import tpm_sockets
from .domains import domid_of
from .savefile import read_save_header
from .topology import vtpm_links
from .xenstore import XenStore

# Flags the wrapper understands for a guest with a vTPM; any other is refused rather than dropped.
_SAVE_FLAGS = {"-c", "-p"}
_RESTORE_FLAGS = {"-p"}


@dataclass
class Route:
    action: str                  # "passthrough" | "save" | "restore" | "migrate" | "create" (start its swtpm, then xl)
    domain: str | None = None
    file: str | None = None
    paused: bool = False
    host: str | None = None      # migrate: the destination
    ssh: str = "ssh"             # migrate: -s SSHCOMMAND


def _split(args: list[str], flags: set[str], cmd: str) -> tuple[set[str], list[str]]:
    opts, pos = set(), []
    for a in args:
        if a.startswith("-") and len(a) > 1:
            for ch in a[1:]:
                flag = "-" + ch
                if flag not in flags:
                    raise UsageError(f"xl {cmd}: option {flag} is not supported by the xen-vtpm wrapper "
                                     "for a guest with a vTPM; run the real xl if you accept an unpaired vTPM")
                opts.add(flag)
        else:
            pos.append(a)
    return opts, pos


def route(argv: list[str], *, has_vtpm_domain, has_vtpm_file, has_swtpm_cfg=lambda path: False) -> Route:
    """Decide; `has_vtpm_domain(name)`, `has_vtpm_file(path)` and `has_swtpm_cfg(path)` are the lookups."""
    if not argv:
        return Route("passthrough")
    cmd, args = argv[0], argv[1:]
    if cmd == "create":
        # The swtpm must serve before QEMU starts: the wrapper starts it, then hands `create` to xl.
        pos = [a for a in args if not a.startswith("-") and "=" not in a]
        if pos and has_swtpm_cfg(pos[0]):
            return Route("create", file=pos[0])
        return Route("passthrough")
    if cmd == "save":
        pos = [a for a in args if not a.startswith("-")]
        if not pos or not has_vtpm_domain(pos[0]):
            return Route("passthrough")
        opts, pos = _split(args, _SAVE_FLAGS, cmd)
        if opts & {"-c", "-p"}:
            raise PreconditionFailed(
                f"{pos[0]}: `xl save -c/-p` keeps the guest running with its vTPM, so restoring that file later "
                f"would attach two guests to one vTPM; use `xen-vtpm snapshot {pos[0]}` instead")
        if len(pos) != 2:
            raise UsageError(f"xl save {pos[0]}: a config override is not supported for a guest with a vTPM; "
                             "usage: xl save DOMAIN FILE")
        return Route("save", domain=pos[0], file=pos[1])
    if cmd == "restore":
        pos = [a for a in args if not a.startswith("-")]
        if not pos or not has_vtpm_file(pos[-1]):
            return Route("passthrough")
        opts, pos = _split(args, _RESTORE_FLAGS, cmd)
        if len(pos) != 1:
            raise UsageError(f"xl restore {pos[-1]}: a config override would re-point the guest's vTPM; "
                             "not supported by the wrapper; usage: xl restore [-p] FILE")
        return Route("restore", file=pos[0], paused="-p" in opts)
    if cmd == "migrate":
        return _migrate(args, has_vtpm_domain)
    return Route("passthrough")


def _migrate(args: list[str], has_vtpm_domain) -> Route:
    """`xl migrate [-s SSHCOMMAND] [-p] [-e] DOMAIN HOST` (xl_cmdtable.c): a guest with a vTPM moves
    with `xen-vtpm migrate`; an option that would change what moves is refused."""
    opts, pos, ssh = set(), [], "ssh"
    it = iter(args)
    for a in it:
        if a.startswith("-s"):
            ssh = a[2:] or next(it, "")
        elif a.startswith("-C"):            # -C CONFIG takes a value, like -s
            opts.add("-C")
            if a == "-C":
                next(it, None)
        elif a.startswith("-") and len(a) > 1 and not a.startswith("--"):
            opts.update("-" + ch for ch in a[1:])
        elif a.startswith("--"):
            opts.add(a)
        else:
            pos.append(a)
    if not pos or not has_vtpm_domain(pos[0]):
        return Route("passthrough")
    unsupported = opts - {"-p", "-e"}
    if unsupported:
        raise UsageError(f"xl migrate {pos[0]}: option {sorted(unsupported)[0]} is not supported by the xen-vtpm "
                         "wrapper for a guest with a vTPM (a cold move: -s, -p and -e only)")
    if len(pos) != 2:
        raise UsageError(f"xl migrate {pos[0]}: usage: xl migrate [-s SSHCOMMAND] [-p] DOMAIN HOST")
    # -e (do not wait on HOST for the domain's death) changes nothing here: the move ends on HOST.
    return Route("migrate", domain=pos[0], host=pos[1], ssh=ssh, paused="-p" in opts)


def _is_wrapper(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            head = fh.read(4096)
        return b"xen-vtpm" in head and b"xl-hook" in head
    except OSError:
        return False


def real_xl(configured: str) -> str:
    """The real xl binary: the configured one, unless that is the xen-vtpm wrapper.

    With the wrapper first in PATH a bare `xl` would reach it again, and it refuses the
    very `xl save -p` a snapshot needs, so both the wrapper and xen-vtpm resolve past it."""
    me = os.environ.get("XEN_VTPM_HOOK_SELF")
    me_real = Path(me).resolve() if me else None
    candidates = [configured] if os.sep in configured else []
    for d in os.environ.get("PATH", "").split(os.pathsep):
        candidates.append(os.path.join(d, Path(configured).name))
    for c in candidates:
        found = shutil.which(c)
        if found and Path(found).resolve() != me_real and not _is_wrapper(found):
            return found
    raise XlError(f"{configured}: the real xl was not found (only the xen-vtpm wrapper is in PATH); "
                  "set `xl =` in the xen-vtpm config to its full path")


def domain_has_vtpm(cfg: Config, name: str) -> bool:
    """Whether the domain (by name or domid) has a vTPM device."""
    with XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout) as xs:
        domid = int(name) if name.isdigit() else domid_of(xs, name)
        return domid is not None and bool(vtpm_links(xs, domid) or tpm_sockets(xs, domid))


def file_has_vtpm(path: str) -> bool:
    try:
        header = read_save_header(path)
        return bool(header.vtpms or header.emulator_tpms)
    except MalformedSaveFile:
        return False  # not ours to judge: the real xl reports a bad file in its own words
