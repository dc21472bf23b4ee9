"""What a vTPM stub domain's console says about its boot: did it load its saved state?"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass
from pathlib import Path

from xen_vtpm.config import Config
from xen_vtpm.errors import XenStoreTimeout

_LOADED = re.compile(r"vtpmblk\.c:\d+: Info: Read (\d+) bytes from NVM persistent storage \(slot ([01])\)")
_MARKERS = (("checksum-failed", "Error: NVM Storage Checksum failed!"),
            ("loadhashkey-failed", "Error: VTPM_LoadHashKey failed"))


@dataclass(frozen=True)
class ConsoleStatus:
    kind: str                  # "loaded", "checksum-failed", "loadhashkey-failed" or "none" (no marker yet)
    slot: int | None = None
    nbytes: int | None = None

    @property
    def fresh(self) -> bool:
        """The vTPM came up as a brand-new TPM: never let a guest or a probe reach it."""
        return self.kind in ("checksum-failed", "loadhashkey-failed")

    @property
    def loaded(self) -> bool:
        return self.kind == "loaded"

    @property
    def reason(self) -> str:
        """The console line behind the status, for messages."""
        return {"loaded": f"Read {self.nbytes} bytes from NVM persistent storage (slot {self.slot})",
                "checksum-failed": "NVM Storage Checksum failed!",
                "loadhashkey-failed": "VTPM_LoadHashKey failed"}.get(self.kind, "no load marker on the console")


def log_path(cfg: Config, name: str) -> Path:
    return Path(cfg.log_dir) / f"guest-{name}.log"


def log_offset(cfg: Config, name: str) -> int:
    """Current size of the console log: pass it to console_status to see only the next boot."""
    try:
        return log_path(cfg, name).stat().st_size
    except FileNotFoundError:
        return 0


def console_status(cfg: Config, name: str, offset: int = 0) -> ConsoleStatus:
    """The last load marker written to the console log after ``offset``."""
    try:
        with open(log_path(cfg, name), "rb") as fh:
            fh.seek(offset)
            text = fh.read().decode("utf-8", errors="replace")
    except FileNotFoundError:
        return ConsoleStatus("none")
    status = ConsoleStatus("none")
    for line in text.splitlines():
        m = _LOADED.search(line)
        if m:
            status = ConsoleStatus("loaded", int(m.group(2)), int(m.group(1)))
            continue
        for kind, marker in _MARKERS:
            if marker in line:
                status = ConsoleStatus(kind)
                break
    return status


def wait_console_status(cfg: Config, name: str, offset: int, timeout: float) -> ConsoleStatus:
    """Poll the console log (a plain file: no event to wait on) until a load marker appears."""
    deadline = time.monotonic() + timeout
    while True:
        status = console_status(cfg, name, offset)
        if status.kind != "none":
            return status
        if time.monotonic() > deadline:
            raise XenStoreTimeout(f"{name}: no vTPM load marker in {log_path(cfg, name)} within {timeout:g} s; "
                                  f"check the stub domain's console log")
        time.sleep(0.05)
