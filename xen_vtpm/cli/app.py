"""The `xen-vtpm` command line: global options, the command groups, and the one place errors are printed.

No logic lives in the CLI.  Each command group module (``host``, ``checkpoints``, ``hook``)
registers its own subcommands; every command returns plain data that ``render`` prints as text
or, with ``--json``, as JSON.  Expected failures are ``XenVtpmError``s: one line on stderr and
their exit code.  Other packages may add command groups through the ``xen_vtpm.commands``
entry point group (the simulated host adds ``sim`` and ``demo`` that way), so the tool never
imports them.
"""
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, NoReturn, cast

from xen_vtpm import __version__
from xen_vtpm.config import Config
from xen_vtpm.errors import UsageError, XenVtpmError

from . import checkpoints, doctor, hook, host, move, render, schedule, vtpm

PLUGIN_GROUP = "xen_vtpm.commands"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # argparse exits 2 with usage; keep it one line
        raise UsageError(f"{message}; see `{self.prog} --help`")


if TYPE_CHECKING:
    _SubParsers = argparse._SubParsersAction[argparse.ArgumentParser]
else:
    _SubParsers = argparse._SubParsersAction   # not subscriptable at run time


class _Commands(_SubParsers):
    """Every command also accepts the global options after its name (`xen-vtpm checkpoints --json`)."""
    common: argparse.ArgumentParser

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        kwargs["parents"] = [*kwargs.get("parents", ()), self.common]
        return super().add_parser(name, **kwargs)


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="xen-vtpm", description="Synchronized, TPM-sealed checkpoints of Xen guests and their vTPMs.")
    p.add_argument("--version", action="version", version=f"xen-vtpm {__version__}")
    p.add_argument("--config", metavar="FILE",
                   help="config file (default: $XEN_VTPM_CONFIG or /etc/xen-vtpm/xen-vtpm.conf)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    # SUPPRESS keeps a command's copy of a global option from resetting a value given before the command.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser, action=_Commands)
    cast(_Commands, sub).common = common
    for group in (host, checkpoints, move, schedule, vtpm, hook, doctor):
        group.register(sub)
    for plugin in sorted(entry_points(group=PLUGIN_GROUP), key=lambda ep: ep.name):
        plugin.load()(sub)
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
            cfg = Config.load(args.config, missing_ok=getattr(args, "config_may_be_missing", False))
        return int(args.func(args, cfg) or 0)
    except XenVtpmError as exc:
        print(f"xen-vtpm: {render.clean(str(exc))}", file=sys.stderr)   # it may quote a name or a path
        return exc.exit_code
    except KeyboardInterrupt:
        print("xen-vtpm: interrupted; the next command finishes or undoes what was begun (or run "
              "`xen-vtpm recover`)", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except Exception as exc:  # noqa: BLE001 - last resort: one line, not a traceback
        if os.environ.get("XEN_VTPM_DEBUG"):
            raise
        print(f"xen-vtpm: unexpected error: {exc.__class__.__name__}: {render.clean(str(exc))} "
              "(rerun with XEN_VTPM_DEBUG=1 for a traceback and report it)", file=sys.stderr)
        return 1
