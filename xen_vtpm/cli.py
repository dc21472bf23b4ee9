"""Command line: parse arguments, call one function, print its result.

No logic lives here.  Every command returns plain data (dicts and lists);
this module renders it as text or, with ``--json``, as JSON.  Expected
failures are ``XenVtpmError``s: one line on stderr and their exit code.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Callable, Sequence

from . import __version__
from .config import Config
from .errors import UsageError, XenVtpmError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse exits 2 with usage; keep it one line
        raise UsageError(f"{self.prog}: {message}; see `{self.prog} --help`")


def _emit(args: argparse.Namespace, data: Any, render: Callable[[Any], str] | None = None) -> None:
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True, default=str))
    elif not args.quiet:
        text = render(data) if render else _render_default(data)
        if text:
            print(text)


def _render_default(data: Any) -> str:
    if isinstance(data, list):
        return render_table(data)
    if isinstance(data, dict):
        width = max((len(str(k)) for k in data), default=0)
        return "\n".join(f"{k:<{width}}  {v}" for k, v in data.items())
    return "" if data is None else str(data)


def render_table(rows: list[dict], columns: Sequence[str] | None = None) -> str:
    if not rows:
        return "(none)"
    columns = list(columns or rows[0].keys())
    cells = [[("-" if r.get(c) is None else str(r.get(c))) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in cells]
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------

def cmd_list(args: argparse.Namespace, cfg: Config) -> int:
    from . import topology
    rows = topology.list_domains(cfg)
    _emit(args, rows, topology.render)
    return 0


def cmd_init(args: argparse.Namespace, cfg: Config) -> int:
    from . import provision
    _emit(args, provision.init(cfg, rollback_auth_file=args.rollback_auth_file))
    return 0


def cmd_status(args: argparse.Namespace, cfg: Config) -> int:
    from . import provision
    _emit(args, provision.status(cfg))
    return 0


def cmd_audit(args: argparse.Namespace, cfg: Config) -> int:
    from . import audit
    if args.verify:
        _emit(args, audit.verify(cfg))
    else:
        _emit(args, audit.records(cfg), audit.render)
    return 0


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from . import demo
    return demo.run(json_mode=args.json, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xen-vtpm", description="Synchronized, TPM-sealed checkpoints of Xen guests and their vTPMs.")
    p.add_argument("--version", action="version", version=f"xen-vtpm {__version__}")
    p.add_argument("--config", metavar="FILE", help="config file (default: $XEN_VTPM_CONFIG or /etc/xen-vtpm/xen-vtpm.conf)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    sp = sub.add_parser("list", help="domains, their vTPMs and backends")
    sp.set_defaults(func=cmd_list)
    sp = sub.add_parser("init", help="create the state dir, provision TPM objects, write the config")
    sp.add_argument("--rollback-auth-file", metavar="F", help="file holding the rollback secret")
    sp.set_defaults(func=cmd_init)
    sp = sub.add_parser("status", help="config, TPM, counter, catalog head and audit chain state")
    sp.set_defaults(func=cmd_status)
    sp = sub.add_parser("audit", help="show the audit log")
    sp.add_argument("--verify", action="store_true", help="check the hash chain and its binding to the TPM counter")
    sp.set_defaults(func=cmd_audit)
    sp = sub.add_parser("demo", help="run the demonstration on a throwaway simulated host")
    sp.set_defaults(func=cmd_demo)

    from .sim import cli as sim_cli
    sim_cli.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if not getattr(args, "func", None):
            parser.print_help()
            return 2
        if not getattr(args, "needs_config", True):
            cfg = Config()
        else:
            cfg = Config.load(args.config, missing_ok=args.func is cmd_init)
        return args.func(args, cfg) or 0
    except XenVtpmError as exc:
        print(f"xen-vtpm: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("xen-vtpm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if os.environ.get("XEN_VTPM_DEBUG"):
            raise
        print(f"xen-vtpm: unexpected error: {exc.__class__.__name__}: {exc} "
              "(rerun with XEN_VTPM_DEBUG=1 for a traceback and report it)", file=sys.stderr)
        return 1
