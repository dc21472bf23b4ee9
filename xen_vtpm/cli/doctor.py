"""`xen-vtpm doctor`: every precondition of a real Xen 4.17 host, each with pass/fail and its exact fix.

The checks live with what they check (``vtpm.preflight`` for XSM, the manager, consoles and the vTPM
stub domains; ``host.preflight`` for dom0's TPM and the state directory); this module only runs them
and reports.  Exit 0 only when every check passes, 4 (a precondition is not met) otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import PreconditionFailed, XenVtpmError
from xen_vtpm.host import preflight as host_preflight
from xen_vtpm.model import Check
from xen_vtpm.vtpm import preflight as vtpm_preflight
from xen_vtpm.vtpm.manager import ManagerClient
from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm.xen.xl import Xl

from . import render


def run_checks(cfg: Config) -> list[Check]:
    checks = host_preflight.host_checks(cfg)
    try:
        xs = XenStore(cfg.xenstore_path or None, timeout=cfg.xenstore_timeout)
    except XenVtpmError as exc:
        return [Check("xenstore", False, str(exc), "run xen-vtpm in dom0 with xenstored running"), *checks]
    with xs:
        return vtpm_preflight.vtpm_checks(cfg, xs, Xl(cfg), ManagerClient(cfg, xs)) + checks


def summary(checks: list[Check]) -> str:
    failed = [c.name for c in checks if not c.passed]
    head = f"{len(checks) - len(failed)} of {len(checks)} checks pass"
    return head + (f"; failing: {', '.join(failed)} (see `xen-vtpm doctor`)" if failed else "")


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    checks = run_checks(cfg)
    rows: list[dict[str, Any]] = [dataclasses.asdict(c) for c in checks]
    render.emit(args, rows, render.checks)
    return 0 if all(c.passed for c in checks) else PreconditionFailed.exit_code


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("doctor", help="check every precondition of a real Xen host, with the fix for each")
    sp.set_defaults(func=cmd_doctor, config_may_be_missing=True)
