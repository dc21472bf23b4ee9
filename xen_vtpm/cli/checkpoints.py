"""Commands on checkpoints: snapshot, checkpoints, verify, rollback, delete, keep, unkeep, prune, save,
restore, recover.  Each is one call of the Python API (``xen_vtpm.api``)."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from xen_vtpm.api import Host
from xen_vtpm.config import Config
from xen_vtpm.errors import UsageError
from xen_vtpm.host.session import read_secret
from xen_vtpm.model import RetentionPolicy

from . import render
from .inputs import check_name, check_ref, check_save_target
from .progress import Progress


def _run(args: argparse.Namespace, cfg: Config, call: Callable[[Host], Any],
         show: render.Renderer | None = None) -> int:
    """Progress bars only on a terminal, and never with --json or -q."""
    bars = not (args.json or args.quiet)
    host = Host(cfg, progress=(lambda label, total: Progress(label, total)) if bars else None)
    render.emit(args, call(host), show)
    return 0


def cmd_snapshot(args: argparse.Namespace, cfg: Config) -> int:
    name = None if args.name is None else check_name(args.name)
    return _run(args, cfg, lambda h: h.snapshot(args.domain, name=name), lambda r: r["id"])


def cmd_checkpoints(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda h: h.checkpoints(args.domain), render.checkpoints)


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    if not args.all and not args.checkpoint:
        raise UsageError("verify: name a CHECKPOINT or pass --all")
    if args.checkpoint:
        check_ref(args.checkpoint)
    return _run(args, cfg, lambda h: h.verify(None if args.all else args.checkpoint))


def cmd_rollback(args: argparse.Namespace, cfg: Config) -> int:
    if not args.yes:
        raise UsageError(f"rollback {args.domain} {args.checkpoint}: a rollback discards the guest's current "
                         "state and rolls its vTPM back; add --yes to confirm")
    check_ref(args.checkpoint)
    secret = None if args.auth_file is None else read_secret(args.auth_file, "--auth-file")
    return _run(args, cfg, lambda h: h.rollback(args.domain, args.checkpoint, auth_secret=secret,
                                                safety_checkpoint=not args.no_safety_checkpoint,
                                                paused=args.paused))


def cmd_delete(args: argparse.Namespace, cfg: Config) -> int:
    check_ref(args.checkpoint)
    return _run(args, cfg, lambda h: h.delete(args.checkpoint))


def cmd_keep(args: argparse.Namespace, cfg: Config) -> int:
    check_ref(args.checkpoint)
    return _run(args, cfg, lambda h: h.keep(args.checkpoint))


def cmd_unkeep(args: argparse.Namespace, cfg: Config) -> int:
    check_ref(args.checkpoint)
    return _run(args, cfg, lambda h: h.unkeep(args.checkpoint))


def cmd_prune(args: argparse.Namespace, cfg: Config) -> int:
    if (args.domain is None) == (not args.all):
        raise UsageError("prune: name one DOMAIN or pass --all")
    given: dict[str, int | None] = {f"keep_{rule}": getattr(args, f"keep_{rule}") for rule in RetentionPolicy.RULES}
    policy = None   # each VM's rules from the config file, unless rules given here replace them
    if any(n is not None for n in given.values()):
        counts: dict[str, Any] = {key: n or 0 for key, n in given.items()}
        policy = RetentionPolicy(**counts)
    return _run(args, cfg, lambda h: h.prune(args.domain, policy, include_saves=args.include_saves or None,
                                             dry_run=args.dry_run), render.prune)


def cmd_save(args: argparse.Namespace, cfg: Config) -> int:
    check_save_target(cfg.state_dir, args.file, force=args.force)
    return _run(args, cfg, lambda h: h.save(args.domain, args.file))


def cmd_restore(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda h: h.restore(args.file, paused=args.paused))


def cmd_recover(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda h: h.recover())


def _count(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid count {text!r} (a whole number >= 0)")
    return value


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("snapshot", help="checkpoint a running guest and its vTPM together")
    sp.add_argument("domain", metavar="DOMAIN")
    sp.add_argument("--name", help="a name unique within the domain: 1-64 letters, digits and . _ - + : @ "
                                   "(default: snapshot-<time>)")
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
    sp = sub.add_parser("keep", help="mark a checkpoint so that prune and delete leave it alone")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.set_defaults(func=cmd_keep)
    sp = sub.add_parser("unkeep", help="remove the mark keep set")
    sp.add_argument("checkpoint", metavar="CHECKPOINT")
    sp.set_defaults(func=cmd_unkeep)
    sp = sub.add_parser("prune", help="delete the checkpoints the retention rules do not keep")
    sp.add_argument("domain", metavar="DOMAIN", nargs="?")
    sp.add_argument("--all", action="store_true", help="every VM that has checkpoints")
    for rule in RetentionPolicy.RULES:
        what = "newest checkpoints" if rule == "last" else f"{rule} checkpoints (the newest of each period)"
        sp.add_argument(f"--keep-{rule}", type=_count, metavar="N", help=f"keep N {what}")
    sp.add_argument("--include-saves", action="store_true",
                    help="checkpoints a save file is bound to are candidates too")
    sp.add_argument("--dry-run", action="store_true", help="say what would go; change nothing")
    sp.set_defaults(func=cmd_prune)
    sp = sub.add_parser("save", help="xl save plus a vTPM checkpoint bound to FILE")
    sp.add_argument("domain", metavar="DOMAIN")
    sp.add_argument("file", metavar="FILE", help="outside the state dir")
    sp.add_argument("--force", action="store_true", help="replace FILE if it exists")
    sp.set_defaults(func=cmd_save)
    sp = sub.add_parser("restore", help="xl restore FILE with its vTPM state")
    sp.add_argument("file", metavar="FILE")
    sp.add_argument("--paused", action="store_true")
    sp.set_defaults(func=cmd_restore)
    sp = sub.add_parser("recover", help="finish or undo sequences a crash interrupted")
    sp.set_defaults(func=cmd_recover)
