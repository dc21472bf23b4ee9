"""`xen-vtpm vtpm add|import|remove|start`: give an HVM guest an swtpm vTPM and run it.

``add`` makes a new vTPM (swtpm manufactures a TPM 2.0, encrypted with the vTPM's keys) and wires
it into the guest's xl cfg; ``import`` does the same with an existing swtpm state directory;
``remove`` unwires it and deletes its state; ``start`` runs its swtpm and proves it loaded its
state (the xl-hooks wrapper runs it before `xl create`).  The checkpoints are the coordinator's.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from xen_vtpm import wiring
from xen_vtpm.config import Config
from xen_vtpm.errors import PreconditionFailed, UsageError, XlConfigError
from xen_vtpm.model import VtpmRef
from xen_vtpm.vtpm import swtpmcfg
from xen_vtpm.vtpm.swtpm import KIND, new_uuid
from xen_vtpm.xen.domains import domid_of
from xen_vtpm.xen.xlcfg import parse_cfg

from . import render


def _cfg_path(cfg: Config, guest: str, given: str | None) -> Path:
    path = Path(given) if given else Path(cfg.domain_cfg_dir) / f"{guest}.cfg"
    if not path.is_file():
        raise UsageError(f"{guest}: its xl cfg {path} does not exist; pass it with --cfg FILE")
    return path


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise XlConfigError(f"{path}: cannot read the xl cfg ({exc}); check the file") from None


def _key(path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise UsageError(f"{path}: cannot read the swtpm key ({exc.strerror}); check --swtpm-key") from None
    text = raw.strip().lower().removeprefix(b"0x")
    if len(text) in (32, 64):
        try:
            return bytes.fromhex(text.decode("ascii"))
        except (UnicodeDecodeError, ValueError):
            pass
    if len(raw) in (16, 32):
        return raw
    raise UsageError(f"{path}: not an swtpm key (16 or 32 bytes, binary or hex); check --swtpm-key")


def _add(args: argparse.Namespace, cfg: Config, source: Path | None) -> int:
    path = _cfg_path(cfg, args.guest, args.cfg)
    text = _read(path)
    swtpmcfg.check_can_add(path, text, args.guest)
    if source is not None and not (source / "tpm2-00.permall").is_file():
        raise PreconditionFailed(f"{source}: no tpm2-00.permall in it; not the state directory of a TPM 2.0 swtpm")
    key = _key(getattr(args, "swtpm_key", None))
    with wiring.swtpm_backend(cfg) as backend:
        vtpm_uuid = new_uuid()
        p = backend.register(vtpm_uuid, args.guest)
        try:
            if source is None:
                backend.manufacture(vtpm_uuid)
            else:
                backend.adopt_state(vtpm_uuid, source, key)
            swtpmcfg.add_block(path, text, vtpm_uuid, p.socket, args.device)
        except BaseException:
            backend.unregister(vtpm_uuid)
            raise
    out: dict[str, Any] = {"guest": args.guest, "backend": KIND, "vtpm_uuid": vtpm_uuid, "cfg": str(path),
                           "socket": str(p.socket), "state": str(p.state)}
    if source is not None:
        out["note"] = (f"{source} still holds this TPM's state as it was; xen-vtpm keeps its own encrypted copy — "
                       "delete or shred the original")
    render.emit(args, out)
    return 0


def cmd_add(args: argparse.Namespace, cfg: Config) -> int:
    if args.backend != KIND:
        raise UsageError(f"vtpm add {args.guest}: only --backend swtpm is set up by xen-vtpm; a stub-domain vTPM "
                         "is a vtpm=[...] line and a vtpm-stubdom domain (docs/user-guide.md)")
    return _add(args, cfg, None)


def cmd_import(args: argparse.Namespace, cfg: Config) -> int:
    return _add(args, cfg, Path(args.swtpm_state).resolve())


def cmd_remove(args: argparse.Namespace, cfg: Config) -> int:
    path = _cfg_path(cfg, args.guest, args.cfg)
    text = _read(path)
    vtpm_uuid = swtpmcfg.block_uuid(text)
    if vtpm_uuid is None:
        raise PreconditionFailed(f"{args.guest}: {path} has no xen-vtpm swtpm vTPM; nothing to remove")
    if not args.yes:
        raise UsageError(f"vtpm remove {args.guest}: this deletes vTPM {vtpm_uuid} and every secret in it "
                         "(its checkpoints can no longer be rolled back); add --yes to confirm")
    with wiring.swtpm_backend(cfg) as backend:
        if domid_of(backend.xs, args.guest) is not None:
            raise PreconditionFailed(f"{args.guest}: the guest is running on this vTPM; shut it down first")
        swtpmcfg.remove_block(path, text)
        backend.unregister(vtpm_uuid)
    render.emit(args, {"guest": args.guest, "removed": vtpm_uuid, "cfg": str(path)})
    return 0


def start_for_cfg(cfg: Config, path: Path) -> dict[str, Any]:
    """Run the swtpm a guest cfg names, proven to have loaded its state; nothing if it already runs."""
    text = _read(path)
    vtpm_uuid = swtpmcfg.block_uuid(text)
    guest = str(parse_cfg(text, str(path)).get("name") or "")
    if vtpm_uuid is None:
        raise PreconditionFailed(f"{path}: no xen-vtpm swtpm vTPM in it; add one with `xen-vtpm vtpm add {guest}`")
    ref = VtpmRef(guest=guest, devid=0, backend=f"swtpm-{guest}", uuid=vtpm_uuid, backend_kind=KIND)
    with wiring.swtpm_backend(cfg) as backend:
        started = not backend.is_running(ref)
        if started:
            backend.start_verified(ref)
        return {"guest": guest, "vtpm_uuid": vtpm_uuid, "started": started,
                "socket": str(backend.paths(vtpm_uuid).socket)}


def cmd_start(args: argparse.Namespace, cfg: Config) -> int:
    render.emit(args, start_for_cfg(cfg, _cfg_path(cfg, args.guest, args.cfg)))
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    vt = sub.add_parser("vtpm", help="give HVM guests an swtpm vTPM (add, import, remove, start)")
    vsub = vt.add_subparsers(dest="vtpm_command", metavar="VTPMCOMMAND", parser_class=type(vt))

    def add(name: str, func: Any, help_text: str) -> argparse.ArgumentParser:
        p = vsub.add_parser(name, help=help_text)
        p.add_argument("guest", metavar="GUEST")
        p.add_argument("--cfg", metavar="FILE", help="the guest's xl cfg (default: <domain_cfg_dir>/GUEST.cfg)")
        p.set_defaults(func=func)
        return p

    p = add("add", cmd_add, "a new TPM 2.0 for an HVM guest, wired into its xl cfg")
    p.add_argument("--backend", required=True, choices=["swtpm", "stubdom"])
    p.add_argument("--device", choices=swtpmcfg.DEVICES, default="tpm-crb", help="the guest's TPM interface")
    p = add("import", cmd_import, "adopt an existing swtpm state directory as GUEST's vTPM")
    p.add_argument("--swtpm-state", required=True, metavar="DIR", help="a TPM 2.0 swtpm state directory")
    p.add_argument("--swtpm-key", metavar="FILE", help="the key DIR is encrypted with (swtpm --key), if any")
    p.add_argument("--device", choices=swtpmcfg.DEVICES, default="tpm-crb", help="the guest's TPM interface")
    p = add("remove", cmd_remove, "unwire GUEST's swtpm vTPM and delete its state")
    p.add_argument("--yes", action="store_true", help="confirm")
    add("start", cmd_start, "run GUEST's swtpm before its device model (the xl wrapper does this for `xl create`)")
    vt.set_defaults(func=lambda args, cfg: _help(vt))


def _help(parser: argparse.ArgumentParser) -> int:
    parser.print_help()
    return 2
