"""`xen-vtpm doctor`: every precondition of a real Xen 4.17 host, each with pass/fail and its exact fix.

The checks live with what they check (``vtpm.preflight`` for XSM, the manager, consoles and the vTPM
stub domains; ``host.preflight`` for dom0's TPM and the state directory) and run through
``api.Host.doctor``; this module only reports them.  Exit 0 only when every check passes, 4 (a
precondition is not met) otherwise.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from xen_vtpm.api import Host
from xen_vtpm.config import Config
from xen_vtpm.errors import PreconditionFailed

from . import render


def cmd_doctor(args: argparse.Namespace, cfg: Config) -> int:
    checks = Host(cfg).doctor()
    rows: list[dict[str, Any]] = [dataclasses.asdict(c) for c in checks]
    render.emit(args, rows, render.checks)
    return 0 if all(c.passed for c in checks) else PreconditionFailed.exit_code


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("doctor", help="check every precondition of a real Xen host, with the fix for each")
    sp.set_defaults(func=cmd_doctor, config_may_be_missing=True)
