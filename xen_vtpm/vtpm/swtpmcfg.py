"""The xl config lines that give an HVM guest its swtpm vTPM, and the checks before writing them.

Xen 4.17's libxl has no TPM option, so the TPM reaches QEMU through ``device_model_args_hvm``
(libxl appends it to QEMU's argv, docs/xen-internals.md §11.6): ``vtpm add`` appends one marked
block to the guest's cfg, ``vtpm remove`` takes exactly that block out again::

    # xen-vtpm swtpm vTPM <uuid>: written by `xen-vtpm vtpm add`; remove it with `xen-vtpm vtpm remove`
    device_model_args_hvm += ["-chardev", "socket,id=xvtpm-chr,path=/run/xen-vtpm/<uuid>.sock", ...]
    # end xen-vtpm swtpm vTPM
"""
from __future__ import annotations

import re
import stat
from pathlib import Path
from typing import Any

from xen_vtpm.durable import write_atomic
from xen_vtpm.errors import PreconditionFailed, XlConfigError
from xen_vtpm.xen.devicemodel import emulator_sockets, tpm_args
from xen_vtpm.xen.xlcfg import parse_cfg

_BEGIN = "# xen-vtpm swtpm vTPM "
_END = "# end xen-vtpm swtpm vTPM"
_BLOCK = re.compile(rf"^{re.escape(_BEGIN)}(?P<uuid>[0-9a-f-]{{36}}):[^\n]*\n(?:[^\n]*\n)*?{re.escape(_END)}\n",
                    re.MULTILINE)
DEVICES = ("tpm-crb", "tpm-tis")


def is_hvm(cfg: dict[str, Any]) -> bool:
    """xl's rule (tools/xl/xl_parse.c): `type=` "hvm", or the deprecated `builder="hvm"`."""
    return cfg.get("type") == "hvm" or (cfg.get("type") is None and cfg.get("builder") == "hvm")


def block_uuid(text: str) -> str | None:
    m = _BLOCK.search(text)
    return m.group("uuid") if m else None


def check_can_add(cfg_path: Path, text: str, guest: str) -> dict[str, Any]:
    cfg = parse_cfg(text, str(cfg_path))
    if cfg.get("name") != guest:
        raise PreconditionFailed(f"{cfg_path}: its name= is {cfg.get('name')!r}, not {guest!r}; pass the guest's own "
                                 "cfg with --cfg")
    if not is_hvm(cfg):
        kind = cfg.get("type") or cfg.get("builder") or "pv"
        raise PreconditionFailed(f"{guest}: not an HVM guest (type={kind!r} in {cfg_path}); an swtpm vTPM is "
                                 "emulated by QEMU, which only HVM guests have — give a PV/PVH guest a vtpm stub "
                                 "domain instead (vtpm=[...], see docs/user-guide.md)")
    if cfg.get("vtpm"):
        raise PreconditionFailed(f"{guest}: {cfg_path} already gives it a vtpm stub domain (vtpm=...); "
                                 "one vTPM per guest")
    extra = [str(a) for a in cfg.get("device_model_args_hvm", [])]
    if block_uuid(text) or emulator_sockets(extra):
        raise PreconditionFailed(f"{guest}: {cfg_path} already wires a TPM into its device model; "
                                 f"`xen-vtpm vtpm remove {guest}` first")
    return cfg


def add_block(cfg_path: Path, text: str, vtpm_uuid: str, socket: Path, device: str) -> None:
    cfg = parse_cfg(text, str(cfg_path))
    op = "+=" if "device_model_args_hvm" in cfg else "="
    items = ", ".join('"' + a.replace("\\", "\\\\").replace('"', '\\"') + '"' for a in tpm_args(socket, device=device))
    block = (f"{_BEGIN}{vtpm_uuid}: written by `xen-vtpm vtpm add`; remove it with `xen-vtpm vtpm remove`\n"
             f"device_model_args_hvm {op} [{items}]\n{_END}\n")
    new = text + ("" if text.endswith("\n") or not text else "\n") + block
    parsed = parse_cfg(new, str(cfg_path))     # what xl will read: the block must parse and wire this socket
    if str(socket) not in emulator_sockets([str(a) for a in parsed.get("device_model_args_hvm", [])]):
        raise XlConfigError(f"{cfg_path}: the new device_model_args_hvm does not wire {socket}; not written")
    _write(cfg_path, new)


def remove_block(cfg_path: Path, text: str) -> str:
    """Take the block out; returns the vTPM UUID it named."""
    m = _BLOCK.search(text)
    if not m:
        raise PreconditionFailed(f"{cfg_path}: no xen-vtpm swtpm block in it; nothing to remove")
    _write(cfg_path, text[:m.start()] + text[m.end():])
    return m.group("uuid")


def _write(cfg_path: Path, text: str) -> None:
    write_atomic(cfg_path, text.encode("utf-8"), mode=stat.S_IMODE(cfg_path.stat().st_mode))
