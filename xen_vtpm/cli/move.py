"""Commands that move a guest to another host: migrate, migrate-receive, host-key, trust."""
from __future__ import annotations

import argparse
import json
import os
import sys
import uuid as uuidlib
from typing import IO, Any

from xen_vtpm import wiring
from xen_vtpm.config import Config
from xen_vtpm.errors import Locked, UsageError, XenVtpmError
from xen_vtpm.host.session import read_secret
from xen_vtpm.host.trusted import TrustStore
from xen_vtpm.transfer.peer import HostKey, TrustedPeer
from xen_vtpm.transfer.session import send_error, send_outcome
from xen_vtpm.transfer.wire import Wire

from . import render


def _moved(result: dict[str, Any]) -> str:
    kept = result["checkpoints_kept"]
    lines = [f"{result['domain']}: moved to {result['host']} (trusted here as {result['peer']}), "
             f"transfer {result['transfer']}",
             f"checkpoints: {result['checkpoints_moved']} moved, {kept} stay on this host"
             + (" (--with-checkpoints moves them)" if kept else "")]
    return "\n".join(lines)


def cmd_migrate(args: argparse.Namespace, cfg: Config) -> int:
    secret = None if args.auth_file is None else read_secret(args.auth_file, "--auth-file")
    with wiring.coordinator(cfg) as coord:
        result = coord.migrate(args.domain, args.host, args.ssh, with_checkpoints=args.with_checkpoints,
                               auth_secret=secret, paused=args.paused)
    render.emit(args, result, _moved)
    return 0


def _protocol_streams() -> tuple[IO[bytes], IO[bytes]]:
    """This process's stdin/stdout for the protocol alone: anything else printed goes to stderr, and
    nothing this process starts can read the source's stream."""
    rfd, wfd = os.dup(0), os.dup(1)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    os.dup2(2, 1)
    return os.fdopen(rfd, "rb"), os.fdopen(wfd, "wb")


def cmd_migrate_receive(args: argparse.Namespace, cfg: Config) -> int:
    rfile, wfile = _protocol_streams()
    wire = Wire(rfile, wfile, "the source")
    with wiring.session(cfg) as (coord, ports):
        if args.outcome is not None:
            try:
                transfer = str(uuidlib.UUID(args.outcome))
                outcome = coord.outcome_of(transfer)
            except ValueError:
                error = UsageError(f"--outcome {args.outcome!r}: not a transfer id")
                send_error(wire, error)
                raise error from None
            except Locked as exc:
                send_error(wire, exc, busy=True)
                raise
            except XenVtpmError as exc:
                send_error(wire, exc)
                raise
            send_outcome(wire, ports.peers.identity, transfer, outcome)
            render.emit(args, {"transfer": transfer, "outcome": outcome})
            return 0
        coord.recover()
        link = ports.peers.accept(wire, lambda t: ports.lock(f"transfer-{t}", f"transfer {t}"))
        try:
            result = coord.receive(link)
        finally:
            link.close()
    render.emit(args, result, lambda r: f"{r['domain']}: moved in from {r['from']}, transfer {r['transfer']}, "
                                        f"{r['checkpoints_moved']} checkpoints moved")
    return 0


def cmd_host_key(args: argparse.Namespace, cfg: Config) -> int:
    with wiring.session(cfg) as (_, ports):
        doc = ports.peers.identity.host_key().to_doc()
    print(json.dumps(doc, indent=1, sort_keys=True))
    return 0


def _peer_row(peer: TrustedPeer) -> dict[str, Any]:
    return {"name": peer.name, "fingerprint": peer.key.fingerprint, "host": peer.key.host,
            "backends": ",".join(sorted(peer.key.backend_keys)) or "-",
            "pcrs": ("bound " if peer.bind_pcrs else "not bound ") + ",".join(map(str, peer.key.pcrs)),
            "added": peer.added}


def cmd_trust_add(args: argparse.Namespace, cfg: Config) -> int:
    try:
        with open(args.file, encoding="utf-8") as fh:
            doc = json.load(fh)
    except OSError as exc:
        raise UsageError(f"{args.file}: cannot read the host key ({exc.strerror}); check FILE") from None
    except ValueError:
        raise UsageError(f"{args.file}: not JSON; pass the output of `xen-vtpm host-key` on the other host") from None
    key = HostKey.from_doc(doc, args.file)
    with wiring.session(cfg) as (_, ports):
        own = ports.peers.identity.host_key()
        peer = TrustStore(cfg).add(args.name, key, bind_pcrs=args.bind_pcrs, own=own)
    render.emit(args, _peer_row(peer))
    return 0


def cmd_trust_list(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, [_peer_row(p) for p in TrustStore(cfg).list()])
    return 0


def cmd_trust_remove(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, _peer_row(TrustStore(cfg).remove(args.name)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    sp = sub.add_parser("migrate", help="move a guest and its vTPM to another host (like `xl migrate`)")
    sp.add_argument("-s", dest="ssh", metavar="SSHCOMMAND", default="ssh",
                    help="how to reach HOST, as for `xl migrate`: runs `SSHCOMMAND HOST xen-vtpm migrate-receive` "
                         "through sh (default: ssh)")
    sp.add_argument("-p", dest="paused", action="store_true", help="leave the guest paused on HOST after the move")
    sp.add_argument("--with-checkpoints", action="store_true",
                    help="move the guest's checkpoints too (by default they stay on this host)")
    sp.add_argument("--auth-file", metavar="F", help="file holding the rollback secret (a move needs it when set)")
    sp.add_argument("domain", metavar="DOMAIN")
    sp.add_argument("host", metavar="HOST")
    sp.set_defaults(func=cmd_migrate)
    sp = sub.add_parser("migrate-receive", help="the receiving end of `migrate` (run by it through SSHCOMMAND)")
    sp.add_argument("--outcome", metavar="TRANSFER", help="say what became of a transfer (asked by the source)")
    sp.set_defaults(func=cmd_migrate_receive)
    sp = sub.add_parser("host-key", help="print this host's public identity for `xen-vtpm trust add` elsewhere")
    sp.set_defaults(func=cmd_host_key)
    sp = sub.add_parser("trust", help="the hosts this one moves guests to and from")
    tsub = sp.add_subparsers(dest="trust_command", metavar="SUBCOMMAND", parser_class=type(sp))
    tp = tsub.add_parser("add", help="trust the host whose `xen-vtpm host-key` is in FILE")
    tp.add_argument("name", metavar="NAME")
    tp.add_argument("file", metavar="FILE")
    tp.add_argument("--bind-pcrs", action="store_true",
                    help="moves to it need a TPM quote of the boot PCRs in FILE")
    tp.set_defaults(func=cmd_trust_add)
    tp = tsub.add_parser("list", help="the trusted hosts")
    tp.set_defaults(func=cmd_trust_list)
    tp = tsub.add_parser("remove", help="stop trusting NAME")
    tp.add_argument("name", metavar="NAME")
    tp.set_defaults(func=cmd_trust_remove)
    sp.set_defaults(func=lambda args, cfg: _usage(sp))


def _usage(parser: argparse.ArgumentParser) -> int:
    parser.print_help(sys.stderr)
    return 2
