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
        raise UsageError(f"{message}; see `{self.prog} --help`")


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


def _coordinator(args: argparse.Namespace, cfg: Config):
    """Open the ports for one command; progress bars only on a terminal and never with --json or -q."""
    from .coordinator import Coordinator
    from .ports import open_ports
    from .progress import Progress
    show = not (args.json or args.quiet)
    ports = open_ports(cfg, progress=(lambda label, total: Progress(label, total)) if show else None)
    return Coordinator(ports), ports


def _run(args: argparse.Namespace, cfg: Config, call, render=None) -> int:
    coord, ports = _coordinator(args, cfg)
    try:
        _emit(args, call(coord), render)
    finally:
        ports.close()
    return 0


def _secret(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return open(path, "rb").read()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the rollback secret ({exc.strerror}); check --auth-file") from None


def cmd_snapshot(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: c.snapshot(args.domain, name=args.name), lambda r: r["id"])


def cmd_checkpoints(args: argparse.Namespace, cfg: Config) -> int:
    from .ports import checkpoints_table
    return _run(args, cfg, lambda c: c.checkpoints(args.domain),
                lambda rows: render_table(rows, checkpoints_table))


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    if not args.all and not args.checkpoint:
        raise UsageError("verify: name a CHECKPOINT or pass --all")
    return _run(args, cfg, lambda c: c.verify(None if args.all else args.checkpoint))


def cmd_rollback(args: argparse.Namespace, cfg: Config) -> int:
    if not args.yes:
        raise UsageError(f"rollback {args.domain} {args.checkpoint}: a rollback discards the guest's current "
                         "state and rolls its vTPM back; add --yes to confirm")
    secret = _secret(args.auth_file)
    return _run(args, cfg, lambda c: c.rollback(args.domain, args.checkpoint, auth_secret=secret,
                                                safety_checkpoint=not args.no_safety_checkpoint,
                                                paused=args.paused))


def cmd_delete(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: c.delete(args.checkpoint))


def cmd_save(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: c.save(args.domain, args.file))


def cmd_restore(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: c.restore(args.file, paused=args.paused))


def cmd_recover(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: c.recover())


def cmd_xl_hook(args: argparse.Namespace, cfg: Config) -> int:
    from . import hooks
    return hooks.main(args.xl_args, cfg, json_mode=args.json)


def cmd_demo(args: argparse.Namespace, cfg: Config) -> int:
    from . import demo
    return demo.run(json_mode=args.json, quiet=args.quiet)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xen-vtpm", description="Synchronized, TPM-sealed checkpoints of Xen guests and their vTPMs.")
    p.add_argument("--version", action="version", version=f"xen-vtpm {__version__}")
    p.add_argument("--config", metavar="FILE", help="config file (default: $XEN_VTPM_CONFIG or /etc/xen-vtpm/xen-vtpm.conf)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    # The global options are also accepted after the command (`xen-vtpm checkpoints --json`);
    # SUPPRESS keeps a sub-parser from resetting a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add = sub.add_parser
    sub.add_parser = lambda *a, **kw: _add(*a, parents=[common], **kw)  # type: ignore[method-assign]

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
    sp.set_defaults(func=cmd_demo, needs_config=False)
    sp = sub.add_parser("snapshot", help="checkpoint a running guest and its vTPM together")
    sp.add_argument("domain", metavar="DOMAIN")
    sp.add_argument("--name", help="a name unique within the domain (default: snapshot-<time>)")
    sp.set_defaults(func=cmd_snapshot)
    sp = sub.add_parser("checkpoints", help="list checkpoints")
    sp.add_argument("domain", metavar="DOMAIN", nargs="?")
    sp.set_defaults(func=cmd_checkpoints)
    sp = sub.add_parser("verify", help="check every MAC and digest against the TPM; changes nothing")
    sp.add_argument("checkpoint", metavar="CHECKPOINT", nargs="?")
    sp.add_argument("--all", action="store_true")
    sp.set_defaults(func=cmd_verify)
    sp = sub.add_parser("rollback", help="roll a guest and its vTPM back to a checkpoint")
    sp.add_argument("domain", metavar="DOMAIN")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.add_argument("--auth-file", metavar="F", help="file holding the rollback secret")
    sp.add_argument("--no-safety-checkpoint", action="store_true",
                    help="do not checkpoint the current state first (the rollback cannot be undone)")
    sp.add_argument("--paused", action="store_true", help="leave the restored guest paused")
    sp.add_argument("--yes", action="store_true", help="confirm")
    sp.set_defaults(func=cmd_rollback)
    sp = sub.add_parser("delete", help="delete a checkpoint and free what nothing else uses")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.set_defaults(func=cmd_delete)
    sp = sub.add_parser("save", help="xl save plus a vTPM checkpoint bound to FILE")
    sp.add_argument("domain", metavar="DOMAIN")
    sp.add_argument("file", metavar="FILE")
    sp.set_defaults(func=cmd_save)
    sp = sub.add_parser("restore", help="xl restore FILE with its vTPM state")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--paused", action="store_true")
    sp.set_defaults(func=cmd_restore)
    sp = sub.add_parser("recover", help="finish or undo sequences a crash interrupted")
    sp.set_defaults(func=cmd_recover)
    sp = sub.add_parser("xl-hook")  # called by xl-hooks/xl, not listed
    sp.add_argument("xl_args", nargs=argparse.REMAINDER)
    sp.set_defaults(func=cmd_xl_hook)

    from .sim import cli as sim_cli
    sim_cli.register(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Everything xen-vtpm creates (state dir, packs, manifests, the catalog and its WAL, locks,
    # fifos) is for root only; one umask covers every writer, SQLite's included.
    os.umask(0o077)
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
