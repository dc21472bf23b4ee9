"""An HVM guest's device model (QEMU) as libxl started it: its pid, its argv, its emulated TPM.

libxl records the device model's pid in ``/local/domain/<domid>/image/device-model-pid`` and
appends the guest config's ``device_model_args_hvm`` (libxl's ``b_info.extra_hvm``) to QEMU's
argv (docs/xen-internals.md §11.6).  A TPM backed by swtpm is wired there as QEMU documents it:
``-chardev socket,id=C,path=P -tpmdev emulator,id=T,chardev=C -device tpm-crb,tpmdev=T``, P being
swtpm's control socket (§14).  Both nodes and argv are written by dom0's toolstack: the guest
cannot change them.
"""
from __future__ import annotations

import uuid as uuidlib
from pathlib import Path

from .xenstore import XenStore

TPM_DEVICES = ("tpm-tis", "tpm-crb")


def pid_path(domid: int) -> str:
    return f"/local/domain/{domid}/image/device-model-pid"


def split_opts(text: str) -> list[str]:
    """QEMU's option syntax: comma-separated, a doubled comma is a literal one."""
    parts, cur, i = [], "", 0
    while i < len(text):
        if text[i] == ",":
            if text[i + 1:i + 2] == ",":
                cur += ","
                i += 2
                continue
            parts.append(cur)
            cur = ""
        else:
            cur += text[i]
        i += 1
    parts.append(cur)
    return parts


def quote_opt(value: str) -> str:
    return value.replace(",", ",,")


def _options(text: str) -> tuple[str, dict[str, str]]:
    """(the leading word, key=value options) of one QEMU option argument."""
    parts = split_opts(text)
    head = parts[0] if parts and "=" not in parts[0] else ""
    opts = dict(p.split("=", 1) for p in parts if "=" in p)
    return head, opts


def emulator_sockets(argv: list[str]) -> list[str]:
    """The swtpm control socket of every emulator TPM that a TPM device of this QEMU uses."""
    chardevs: dict[str, str] = {}
    tpmdevs: dict[str, str] = {}
    devices: list[str] = []
    for opt, val in zip(argv, argv[1:], strict=False):
        if opt == "-chardev":
            kind, o = _options(val)
            if kind == "socket" and "id" in o and "path" in o:
                chardevs[o["id"]] = o["path"]
        elif opt == "-tpmdev":
            kind, o = _options(val)
            if kind == "emulator" and "id" in o and "chardev" in o:
                tpmdevs[o["id"]] = o["chardev"]
        elif opt == "-device":
            kind, o = _options(val)
            if kind in TPM_DEVICES and "tpmdev" in o:
                devices.append(o["tpmdev"])
    return [chardevs[tpmdevs[t]] for t in devices if t in tpmdevs and tpmdevs[t] in chardevs]


def rewire_socket(argv: list[str], socket_name: str, socket: str) -> list[str]:
    """``argv`` with every socket chardev whose path ends in ``socket_name`` on ``socket`` instead."""
    out = list(argv)
    for i, (opt, val) in enumerate(zip(argv, argv[1:], strict=False)):
        kind, o = _options(val) if opt == "-chardev" else ("", {})
        if kind == "socket" and Path(o.get("path", "")).name == socket_name:
            out[i + 1] = ",".join(quote_opt(f"path={socket}" if part.startswith("path=") else part)
                                  for part in split_opts(val))
    return out


def tpm_args(socket: Path, tag: str = "xvtpm", device: str = "tpm-crb") -> list[str]:
    """The ``device_model_args_hvm`` that give a guest an emulator TPM on swtpm's socket."""
    return ["-chardev", f"socket,id={tag}-chr,path={quote_opt(str(socket))}",
            "-tpmdev", f"emulator,id={tag},chardev={tag}-chr",
            "-device", f"{device},tpmdev={tag}"]


def argv_of(pid: int) -> list[str] | None:
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0")[:-1]] or None


def device_model(xs: XenStore, domid: int) -> tuple[int, list[str]] | None:
    """(pid, argv) of the domain's running device model, None if it has none."""
    raw = xs.read_or(pid_path(domid))
    if not raw or not raw.strip().isdigit():
        return None
    pid = int(raw.strip())
    argv = argv_of(pid)
    return None if argv is None else (pid, argv)


def tpm_sockets(xs: XenStore, domid: int) -> list[str]:
    """swtpm control sockets the domain's device model is wired to ([] without one)."""
    dm = device_model(xs, domid)
    return emulator_sockets(dm[1]) if dm else []


# --- the swtpm sockets xen-vtpm manages: <swtpm_run_dir>/<vtpm uuid>.sock ---------------------------

def swtpm_socket(run_dir: Path, vtpm_uuid: str) -> Path:
    return Path(run_dir) / f"{vtpm_uuid}.sock"


def managed_uuid(run_dir: Path, socket: str) -> str | None:
    """The vTPM UUID a socket path names, if it is one of xen-vtpm's swtpm sockets."""
    path = Path(socket)
    if path.parent != Path(run_dir) or path.suffix != ".sock":
        return None
    try:
        return str(uuidlib.UUID(path.stem)) if str(uuidlib.UUID(path.stem)) == path.stem else None
    except ValueError:
        return None
