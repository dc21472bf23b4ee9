"""Commands about this host: list, init, status, audit."""
from __future__ import annotations

import argparse

from xen_vtpm.api import Host
from xen_vtpm.config import Config
from xen_vtpm.host import provision, session
from xen_vtpm.xen import topology

from . import render


def cmd_list(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, topology.list_domains(cfg), render.domains)
    return 0


def cmd_init(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, provision.init(cfg, rollback_auth_file=args.rollback_auth_file))
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, Host(cfg).status())
    return 0


def cmd_audit(args: argparse.Namespace, cfg: Config) -> int:
    if args.verify:
        render.emit(args, session.audit_verify(cfg))
    else:
        render.emit(args, session.audit_records(cfg), render.audit)
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("list", help="domains, their vTPMs and backends")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("init", help="create the state dir, provision TPM objects, write the config")
    sp.add_argument("--rollback-auth-file", metavar="F", help="file holding the rollback secret")
    sp.set_defaults(func=cmd_init, config_may_be_missing=True)
    sp = sub.add_parser("status", help="config, TPM, counter, catalog head and audit chain state")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("audit", help="show the audit log")
    sp.add_argument("--verify", action="store_true", help="check the hash chain and its binding to the TPM counter")
    sp.set_defaults(func=cmd_audit)
