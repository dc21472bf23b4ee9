"""The tool's side of `xl`: run it with a timeout and parse what it prints."""
from __future__ import annotations

import builtins
import os
import re
import subprocess
from typing import Any

from xen_vtpm.config import Config
from xen_vtpm.errors import XlError

_LIST_ROW = re.compile(r"^(?P<name>\S.*?)\s+(?P<domid>\d+)\s+(?P<mem>\d+)\s+(?P<vcpus>\d+)\s+"
                       r"(?P<state>[rbpscd-]{6})\s+(?P<time>\d+(?:\.\d+)?)\s*$")
_UUID_RE = r"[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}"
_VTPM_ROW = re.compile(rf"^(?P<devid>\d+)\s+(?P<backend_domid>\d+)\s+(?P<uuid>{_UUID_RE})\s+"
                       r"(?P<handle>-?\d+)\s+(?P<state>-?\d+)\s+(?P<evtch>-?\d+)\s+(?P<ring_ref>-?\d+)"
                       r"(?:\s+(?P<backend_path>\S+))?\s*$")


def parse_xl_list(text: str) -> list[dict]:
    """Rows of `xl list`: Name ID Mem VCPUs State Time(s)."""
    rows, seen_header = [], False
    for line in text.splitlines():
        if not line.strip():
            continue
        if not seen_header:
            seen_header = line.split()[:1] == ["Name"]
            continue
        m = _LIST_ROW.match(line)
        if not m:
            raise XlError(f"xl list: unexpected output line {line.strip()!r}; check that `xl` is Xen's xl")
        rows.append({"name": m["name"], "domid": int(m["domid"]), "mem": int(m["mem"]),
                     "vcpus": int(m["vcpus"]), "state": m["state"], "time": float(m["time"])})
    if not seen_header:
        raise XlError("xl list: no header line in the output; check that `xl` is Xen's xl")
    return rows


def parse_vtpm_list(text: str) -> list[dict]:
    """Rows of `xl vtpm-list`: Idx BE Uuid handle state evt-ch ring-ref BE-path."""
    rows = []
    for line in text.splitlines():
        if not line.strip() or line.split()[0] == "Idx":
            continue
        m = _VTPM_ROW.match(line.strip())
        if not m:
            raise XlError(f"xl vtpm-list: unexpected output line {line.strip()!r}; check that `xl` is Xen's xl")
        rows.append({"devid": int(m["devid"]), "backend_domid": int(m["backend_domid"]),
                     "uuid": m["uuid"].lower(), "state": int(m["state"]), "evtch": int(m["evtch"]),
                     "ring_ref": int(m["ring_ref"]), "backend_path": m["backend_path"] or ""})
    return rows


def _error_line(stderr: str) -> str:
    """The line of xl's stderr that says what failed.

    xl prints progress ("Parsing config from ...", "Saving to ...") to stderr
    before its error, so the first line is often not the reason.
    """
    lines = [ln.strip() for ln in stderr.splitlines() if ln.strip()]
    for ln in lines:
        if "error" in ln.lower() or "fail" in ln.lower() or "invalid" in ln.lower():
            return ln
    return lines[-1] if lines else "no message on stderr"


class Xl:
    """Runs the configured `xl`; every call has a timeout and failures raise XlError."""

    def __init__(self, cfg: Config, timeout: float = 60.0, stream_timeout: float = 3600.0) -> None:
        self.xl = cfg.xl
        self.timeout = timeout
        # save/restore move the whole guest memory: minutes for large guests.
        self.stream_timeout = stream_timeout

    def run(self, *args: str, timeout: float | None = None, check: bool = True) -> subprocess.CompletedProcess:
        argv = [self.xl, *args]
        cmd = "xl " + " ".join(args)
        limit = self.timeout if timeout is None else timeout
        try:
            proc = subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True,
                                  text=True, errors="replace", timeout=limit)
        except FileNotFoundError:
            raise XlError(f"{cmd}: {self.xl!r} not found; install Xen's xl or set `xl =` in the xen-vtpm "
                          "config") from None
        except PermissionError:
            raise XlError(f"{cmd}: {self.xl!r} is not executable; fix its permissions or set `xl =` in the "
                          "config") from None
        except subprocess.TimeoutExpired:
            raise XlError(f"{cmd}: no answer within {limit:g} s (killed); check the domain with `xl list`") from None
        if check and proc.returncode != 0:
            raise XlError(f"{cmd}: {_error_line(proc.stderr)} (exit {proc.returncode})")
        return proc

    def list(self) -> builtins.list[dict[str, Any]]:
        return parse_xl_list(self.run("list").stdout)

    def domid(self, name: str) -> int:
        out = self.run("domid", str(name)).stdout.strip()
        if not out.isdigit():
            raise XlError(f"xl domid {name}: unexpected output {out!r}; check that `xl` is Xen's xl")
        return int(out)

    def domname(self, domid: int | str) -> str:
        out = self.run("domname", str(domid)).stdout.strip()
        if not out:
            raise XlError(f"xl domname {domid}: empty output; check the domain with `xl list`")
        return out

    def pause(self, d: int | str) -> None:
        self.run("pause", str(d))

    def unpause(self, d: int | str) -> None:
        self.run("unpause", str(d))

    def destroy(self, d: int | str) -> None:
        self.run("destroy", str(d))

    def save(self, d: int | str, file: str | os.PathLike, cfg: str | os.PathLike | None = None,
             checkpoint: bool = False, leave_paused: bool = False) -> None:
        args = ["save"] + (["-c"] if checkpoint else []) + (["-p"] if leave_paused else [])
        args += [str(d), os.fspath(file)] + ([os.fspath(cfg)] if cfg is not None else [])
        self.run(*args, timeout=self.stream_timeout)

    def restore(self, file: str | os.PathLike, cfg: str | os.PathLike | None = None, paused: bool = False) -> None:
        args = ["restore"] + (["-p"] if paused else []) + ([os.fspath(cfg)] if cfg is not None else [])
        self.run(*args, os.fspath(file), timeout=self.stream_timeout)

    def create(self, cfgfile: str | os.PathLike, paused: bool = False) -> None:
        self.run("create", *(["-p"] if paused else []), os.fspath(cfgfile))

    def getenforce(self) -> str:
        """FLASK's mode: "enforcing", "permissive", or "disabled" (no XSM in the hypervisor).

        xl exits with libxl's answer (1 enforcing, 0 permissive, 255 disabled), so only stdout says
        which (docs/xen-internals.md §3.5)."""
        out = self.run("getenforce", check=False).stdout.strip()
        mode = {"Enforcing": "enforcing", "Permissive": "permissive", "Flask XSM Disabled": "disabled"}.get(out)
        if mode is None:
            raise XlError(f"xl getenforce: unexpected answer {out[:60]!r}; the hypervisor's XSM module is not FLASK "
                          "or xl cannot reach it")
        return mode

    def vtpm_list(self, d: int | str) -> builtins.list[dict[str, Any]]:
        proc = self.run("vtpm-list", str(d))
        # xl vtpm-list reports an unknown domain on stderr but exits 0.
        if "invalid domain identifier" in proc.stderr:
            raise XlError(f"xl vtpm-list {d}: {_error_line(proc.stderr)}; check the domain with `xl list`")
        return parse_vtpm_list(proc.stdout)
