"""`xen-vtpm xl-hook`: the `xl` wrapper of xl-hooks/ (not listed in --help).

Routing is ``xen.wrapper.route``; this module only runs what it decides."""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
from pathlib import Path
from typing import Any

from xen_vtpm import wiring
from xen_vtpm.api import Host
from xen_vtpm.config import Config
from xen_vtpm.vtpm.swtpmcfg import block_uuid
from xen_vtpm.xen.wrapper import domain_has_vtpm, file_has_vtpm, real_xl, route

from .inputs import check_save_target
from .vtpm import start_for_cfg


def cfg_has_swtpm(path: str) -> bool:
    try:
        return block_uuid(Path(path).read_text(encoding="utf-8")) is not None
    except (OSError, UnicodeDecodeError):
        return False   # not ours to judge: xl reports an unreadable cfg in its own words


def cmd_xl_hook(args: argparse.Namespace, cfg: Config) -> int:
    argv = args.xl_args[1:] if args.xl_args[:1] == ["--"] else args.xl_args
    xl_bin = real_xl(cfg.xl)
    decision = route(argv, has_vtpm_domain=lambda n: domain_has_vtpm(cfg, n), has_vtpm_file=file_has_vtpm,
                     has_swtpm_cfg=cfg_has_swtpm)
    if decision.action == "create":
        assert decision.file is not None
        start_for_cfg(cfg, Path(decision.file))   # its swtpm serves before QEMU connects to it
    if decision.action in ("passthrough", "create"):
        os.execv(xl_bin, [xl_bin, *argv])
    # xen-vtpm's own xl calls must reach the real xl, never this wrapper again.
    cfg.xl = xl_bin
    result: dict[str, Any]
    if decision.action == "migrate":
        assert decision.domain is not None and decision.host is not None
        with wiring.coordinator(cfg) as coord:   # a move is not part of the API (docs/api.md)
            result = coord.migrate(decision.domain, decision.host, decision.ssh, paused=decision.paused)
    elif decision.action == "save":
        assert decision.domain is not None and decision.file is not None
        # `xl save` replaces an existing FILE; the tool's own files it never does.
        result = dataclasses.asdict(Host(cfg).save(decision.domain,
                                                   check_save_target(cfg.state_dir, decision.file, force=True)))
    else:
        assert decision.file is not None
        result = dataclasses.asdict(Host(cfg).restore(decision.file, paused=decision.paused))
    if args.json:
        print(json.dumps(result, sort_keys=True))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("xl-hook")  # called by xl-hooks/xl, not listed
    sp.add_argument("xl_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_xl_hook)
