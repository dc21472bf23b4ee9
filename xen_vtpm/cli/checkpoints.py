"""Commands on checkpoints: snapshot, checkpoints, verify, rollback, delete, save, restore, recover."""
from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

from xen_vtpm import wiring
from xen_vtpm.config import Config
from xen_vtpm.core.coordinator import Coordinator
from xen_vtpm.errors import UsageError

from . import render
from .progress import Progress


def _run(args: argparse.Namespace, cfg: Config, call: Callable[[Coordinator], Any],
         show: render.Renderer | None = None) -> int:
    """Progress bars only on a terminal, and never with --json or -q."""
    bars = not (args.json or args.quiet)
    with wiring.coordinator(cfg, progress=(lambda label, total: Progress(label, total)) if bars else None) as coord:
        render.emit(args, call(coord), show)
    return 0


def read_secret(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as fh:
            return fh.read()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the rollback secret ({exc.strerror}); check --auth-file") from None


def cmd_snapshot(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: c.snapshot(args.domain, name=args.name), lambda r: r["id"])


def cmd_checkpoints(args: argparse.Namespace, cfg: Config) -> int:
    return _run(args, cfg, lambda c: render.checkpoint_rows(c.checkpoints(args.domain)), render.checkpoints)


def cmd_verify(args: argparse.Namespace, cfg: Config) -> int:
    if not args.all and not args.checkpoint:
        raise UsageError("verify: name a CHECKPOINT or pass --all")
    return _run(args, cfg, lambda c: c.verify(None if args.all else args.checkpoint))


def cmd_rollback(args: argparse.Namespace, cfg: Config) -> int:
    if not args.yes:
        raise UsageError(f"rollback {args.domain} {args.checkpoint}: a rollback discards the guest's current "
                         "state and rolls its vTPM back; add --yes to confirm")
    secret = read_secret(args.auth_file)
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
    return _run(args, cfg, lambda c: c.recover(ask_peers=True))


def register(sub: argparse._SubParsersAction) -> None:
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
