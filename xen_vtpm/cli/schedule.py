"""`xen-vtpm schedule install|remove|list|run`: the systemd timers of scheduled checkpoints."""
from __future__ import annotations

import argparse
from pathlib import Path

from xen_vtpm import schedule
from xen_vtpm.api import Host
from xen_vtpm.config import Config

from . import render


def cmd_install(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, schedule.install(cfg, args.guest, args.root))
    return 0


def cmd_remove(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, schedule.remove(cfg, args.guest, args.root))
    return 0


def cmd_list(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, schedule.listing(cfg, args.root), render.schedules)
    return 0


def cmd_run(args: argparse.Namespace, cfg: Config) -> int:
    run = Host(cfg).run_schedule(args.guest)
    render.emit(args, run, lambda r: r["snapshot"]["id"] if r["prune"] is None else
                f"{r['snapshot']['id']}\n{render.prune([r['prune']])}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("schedule", help="systemd timers that snapshot and prune a guest")
    ssub = sp.add_subparsers(dest="schedule_command", metavar="ACTION", parser_class=type(sp), required=True)

    def add(name: str, func, help_text: str, guest: bool = True, root: bool = True) -> None:
        p = ssub.add_parser(name, help=help_text)
        if guest:
            p.add_argument("guest", metavar="GUEST")
        if root:
            p.add_argument("--root", type=Path, metavar="DIR",
                           help="work on the units under DIR, as `systemctl --root` does (an image)")
        p.set_defaults(func=func)

    add("install", cmd_install, "install and enable GUEST's timer ([schedule] and [retention] of the config)")
    add("remove", cmd_remove, "disable and remove GUEST's timer")
    add("list", cmd_list, "the installed timers and their last runs", guest=False)
    add("run", cmd_run, "what the timer runs: snapshot GUEST, then prune it", root=False)
