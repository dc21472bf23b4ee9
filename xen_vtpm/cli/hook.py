"""`xen-vtpm xl-hook`: the `xl` wrapper of xl-hooks/ (not listed in --help).

Routing is ``xen.wrapper.route``; this module only runs what it decides."""
from __future__ import annotations

import argparse
import json
import os

from xen_vtpm import wiring
from xen_vtpm.config import Config
from xen_vtpm.xen.wrapper import domain_has_vtpm, file_has_vtpm, real_xl, route


def cmd_xl_hook(args: argparse.Namespace, cfg: Config) -> int:
    argv = args.xl_args[1:] if args.xl_args[:1] == ["--"] else args.xl_args
    xl_bin = real_xl(cfg.xl)
    decision = route(argv, has_vtpm_domain=lambda n: domain_has_vtpm(cfg, n), has_vtpm_file=file_has_vtpm)
    if decision.action == "passthrough":
        os.execv(xl_bin, [xl_bin, *argv])
    # xen-vtpm's own xl calls must reach the real xl, never this wrapper again.
    cfg.xl = xl_bin
    with wiring.coordinator(cfg) as coord:
        if decision.action == "save":
            assert decision.domain is not None and decision.file is not None
            result = coord.save(decision.domain, decision.file)
        elif decision.action == "migrate":
            assert decision.domain is not None and decision.host is not None
            result = coord.migrate(decision.domain, decision.host, decision.ssh, paused=decision.paused)
        else:
            assert decision.file is not None
            result = coord.restore(decision.file, paused=decision.paused)
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("xl-hook")  # called by xl-hooks/xl, not listed
    sp.add_argument("xl_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_xl_hook)
