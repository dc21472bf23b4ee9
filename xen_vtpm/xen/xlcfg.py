"""xl.cfg(5) syntax: the subset libxlu accepts that matters for our domains.

``KEY = VALUE`` settings separated by newlines or ``;``; values are strings
("…" or '…' with C-style escapes), numbers (decimal or 0x hex) or lists
``[v, v, …]`` that may span lines and end with a comma; ``#`` starts a comment.
Errors carry ``FILE:LINE`` like libxlu's, so a user can jump to the mistake.
"""
from __future__ import annotations

import re
import uuid as uuidlib
from typing import Any

from xen_vtpm.errors import XlConfigError

_TOKEN = re.compile(r"""
    (?P<ws>[ \t\r]+)
  | (?P<comment>\#[^\n]*)
  | (?P<nl>\n)
  | (?P<str>"(?:[^"\\\n]|\\.)*"|'(?:[^'\\\n]|\\.)*')
  | (?P<num>0[xX][0-9a-fA-F]+|[0-9]+(?:\.[0-9]+)?)
  | (?P<ident>[A-Za-z_][A-Za-z0-9_]*)
  | (?P<op>\+=|[=\[\],;])
""", re.VERBOSE)

# Longer numbers are not configs, and int() refuses over ~4300 digits anyway.
_MAX_NUMBER_DIGITS = 32


def _show(value: Any, limit: int = 60) -> str:
    """A value quoted in an error: one line, bounded, whatever the input held."""
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= limit else text[:limit - 1] + "…"


_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "\\": "\\", '"': '"', "'": "'", "0": "\0"}


def _unquote(tok: str) -> str:
    body = tok[1:-1]
    return re.sub(r"\\(.)", lambda m: _ESCAPES.get(m.group(1), m.group(1)), body)


def _tokens(text: str, filename: str) -> list[tuple[str, Any, int]]:
    out: list[tuple[str, Any, int]] = []
    pos, line = 0, 1
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if not m:
            bad = text[pos:].split("\n", 1)[0][:20]
            if bad[:1] in "\"'":
                raise XlConfigError(f"{filename}:{line}: config parsing error: unterminated string {_show(bad)}")
            raise XlConfigError(f"{filename}:{line}: config parsing error near {_show(bad)}: unexpected character")
        kind = m.lastgroup
        tok = m.group()
        if kind == "nl":
            out.append(("sep", "\n", line))
            line += 1
        elif kind == "str":
            out.append(("str", _unquote(tok), line))
        elif kind == "num":
            if len(tok) > _MAX_NUMBER_DIGITS:
                raise XlConfigError(f"{filename}:{line}: config parsing error: number {_show(tok, 20)} is too long")
            value: Any = int(tok, 16) if tok[:2].lower() == "0x" else (float(tok) if "." in tok else int(tok))
            out.append(("num", value, line))
        elif kind == "ident":
            out.append(("ident", tok, line))
        elif kind == "op":
            out.append(("sep", tok, line) if tok == ";" else ("op", tok, line))
        pos = m.end()
    out.append(("eof", None, line))
    return out


class _Parser:
    def __init__(self, text: str, filename: str) -> None:
        self.toks = _tokens(text, filename)
        self.i = 0
        self.filename = filename

    def peek(self) -> tuple[str, Any, int]:
        return self.toks[self.i]

    def take(self) -> tuple[str, Any, int]:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, tok: tuple[str, Any, int], cause: str) -> XlConfigError:
        near = "end of file" if tok[0] == "eof" else ("newline" if tok[1] == "\n" else _show(tok[1]))
        return XlConfigError(f"{self.filename}:{tok[2]}: config parsing error near {near}: {cause}")

    def skip_newlines(self) -> None:
        while self.peek()[0] == "sep" and self.peek()[1] == "\n":
            self.take()

    def value(self) -> Any:
        tok = self.take()
        if tok[0] in ("str", "num"):
            return tok[1]
        if tok[0] == "op" and tok[1] == "[":
            items: list[Any] = []
            while True:
                self.skip_newlines()
                if self.peek()[:2] == ("op", "]"):
                    self.take()
                    return items
                item = self.take()
                if item[0] not in ("str", "num"):
                    raise self.fail(item, "list items must be strings or numbers")
                items.append(item[1])
                self.skip_newlines()
                nxt = self.take()
                if nxt[:2] == ("op", "]"):
                    return items
                if nxt[:2] != ("op", ","):
                    raise self.fail(nxt, "expected `,' or `]' in list")
        raise self.fail(tok, "expected a string, a number or a list")

    def parse(self) -> dict[str, Any]:
        cfg: dict[str, Any] = {}
        while True:
            tok = self.take()
            if tok[0] == "eof":
                return cfg
            if tok[0] == "sep":
                continue
            if tok[0] != "ident":
                raise self.fail(tok, "expected a setting name")
            op = self.take()
            if op[:2] not in (("op", "="), ("op", "+=")):
                raise self.fail(op, "expected `=' after setting name")
            val = self.value()
            if op[1] == "+=":
                prev = cfg.get(tok[1], [] if isinstance(val, list) else "")
                if type(prev) is not type(val):
                    raise self.fail(op, f"cannot append to {tok[1]}: type mismatch")
                val = prev + val
            cfg[tok[1]] = val
            end = self.peek()
            if end[0] not in ("sep", "eof"):
                raise self.fail(end, "expected newline or `;' after value")


def parse_cfg(text: str, filename: str = "config") -> dict[str, Any]:
    """Parse xl.cfg text; numbers stay ints, ``memory`` is MiB."""
    cfg = _Parser(text, filename).parse()
    for key in ("disk", "vtpm", "vif", "iomem"):
        if key in cfg and not isinstance(cfg[key], list):
            raise XlConfigError(f"{filename}: config parsing error: {key} must be a list, e.g. {key}=[\"…\"]")
    if "memory" in cfg and not isinstance(cfg["memory"], int):
        raise XlConfigError(f"{filename}: config parsing error: memory must be an integer number of MiB")
    if "uuid" in cfg:
        cfg["uuid"] = _canonical_uuid(str(cfg["uuid"]), f"{filename}: uuid")
    return cfg


def load_cfg(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise XlConfigError(f"{path}: cannot read config file: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise XlConfigError(f"{path}: not a text config file (byte {exc.start} is not UTF-8); "
                            "check that FILE is an xl cfg") from None
    return parse_cfg(text, path)


def _canonical_uuid(text: str, what: str) -> str:
    try:
        return str(uuidlib.UUID(text))
    except ValueError:
        raise XlConfigError(f"{what}: invalid uuid {_show(text)}") from None


# libxlu's deprecated prefixes (tools/libs/util/libxlu_disk_l.l:231-262): `phy:`, `file:`, `tap:`, `aio:`
# only mark the spec as old-style and choose nothing; `raw:`, `qcow:`, `qcow2:`, `vhd:` set the format.
# Which backend serves the disk follows from the format (docs/xen-internals.md §5.6).
_DISK_PREFIXES = ("tapdisk:", "tap2:", "tap:", "aio:", "ioemu:", "file:", "phy:")
_DISK_FORMATS = ("raw", "qcow", "qcow2", "vhd", "qed")


def _strip_prefixes(target: str) -> tuple[str, str | None, bool]:
    """(target, format named by a prefix, whether any deprecated prefix was there)."""
    fmt, prefixed = None, False
    while True:
        head, sep, rest = target.partition(":")
        if sep and (head + ":") in _DISK_PREFIXES:
            target, prefixed = rest, True
        elif sep and head in ("raw", "qcow", "qcow2", "vhd"):
            target, prefixed, fmt = rest, True, head
        else:
            return target, fmt, prefixed


def parse_disk(spec: str) -> dict[str, str]:
    """``[PREFIX:]TARGET,VDEV,ACCESS``, ``TARGET,FORMAT,VDEV,ACCESS`` or ``format=…,vdev=…,access=…,target=…``
    (xl-disk-configuration); ``format`` is the image format (raw unless a prefix or key names another)."""
    target = vdev = fmt = None
    access = "rw"
    positional: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        key, sep, val = part.partition("=")
        if sep and key in ("target", "vdev", "access", "format", "devtype", "backendtype", "backend"):
            if key == "target":
                target = val
            elif key == "vdev":
                vdev = val
            elif key == "access":
                access = val
            elif key == "format":
                fmt = val
        else:
            positional.append(part)
    names = ["target", "vdev", "access"]
    if target is not None:
        names.remove("target")
    elif len(positional) == 4 and fmt is None and _strip_prefixes(positional[0])[2] is False:
        names.insert(1, "format")
    if len(positional) > len(names):
        raise XlConfigError(f"disk spec {_show(spec)}: too many positional parameters")
    for name, val in zip(names, positional, strict=False):  # fewer positionals than names is fine
        if name == "target":
            target = val
        elif name == "vdev":
            vdev = val
        elif name == "format":
            fmt = val
        else:
            access = val
    if target:
        target, prefix_fmt, _ = _strip_prefixes(target)
        fmt = fmt or prefix_fmt
    if not target or not vdev:
        raise XlConfigError(f"disk spec {_show(spec)}: needs a target and a vdev, e.g. \"file:/img,hda,w\"")
    mode = {"w": "rw", "rw": "rw", "r": "ro", "ro": "ro"}.get(access)
    if mode is None:
        raise XlConfigError(f"disk spec {_show(spec)}: access must be r, ro, w or rw")
    fmt = fmt or "raw"
    if fmt not in _DISK_FORMATS:
        raise XlConfigError(f"disk spec {_show(spec)}: unknown format {_show(fmt)}; "
                            f"use one of {', '.join(_DISK_FORMATS)}")
    return {"target": target, "vdev": vdev, "access": mode, "format": fmt}


def parse_vtpm(spec: str) -> dict[str, str | None]:
    """``backend=NAME|DOMID[,uuid=UUID]``; like xl_parse.c, no other key is accepted."""
    out: dict[str, str | None] = {"backend": None, "uuid": None}
    for part in (p.strip() for p in spec.split(",") if p.strip()):
        key, sep, val = part.partition("=")
        if not sep or key not in ("backend", "uuid"):
            raise XlConfigError(f"vtpm spec {_show(spec)}: invalid parameter {_show(part)} (only backend= and uuid=)")
        out[key] = _canonical_uuid(val, f"vtpm spec {_show(spec)}") if key == "uuid" else val
    if not out["backend"]:
        raise XlConfigError(f"vtpm spec {_show(spec)}: backend= is required")
    return out


def disk_target(cfg: dict[str, Any]) -> str:
    """The image behind a stub domain's first disk (the vTPM's `hda`)."""
    disks = cfg.get("disk") or []
    if not disks:
        raise XlConfigError(f"{cfg.get('name', 'config')}: no disk= entry; a vTPM stub domain needs its image as hda")
    return parse_disk(disks[0])["target"]


def _format_value(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, (str, int, float, list)):
        raise XlConfigError(f"cannot write {_show(value)} to an xl cfg: not a string, number or list")
    if isinstance(value, list):
        return "[" + ", ".join(_format_value(v) for v in value) + "]"
    if isinstance(value, str):
        escaped = value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n").replace("\t", "\\t")
        return f'"{escaped}"'
    return str(value)


def format_cfg(cfg: dict[str, Any]) -> str:
    """xl.cfg text that ``parse_cfg`` reads back as ``cfg`` (one ``KEY = VALUE`` per line)."""
    return "".join(f"{key} = {_format_value(value)}\n" for key, value in cfg.items())
