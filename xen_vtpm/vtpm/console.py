"""What a vTPM stub domain's console proves about one boot: did the vTPM load its saved state?

docs/xen-internals.md §7.3: ``Read <n> bytes from NVM persistent storage`` is printed as soon as a slot's
raw bytes are read, *before* the checksum, the decryption and the emulator's unmarshal, so it proves
nothing.  The evidence, one boot at a time (a boot starts with ``starting TPM Emulator``):

* **fresh** — any failure line of the load (the manager refused the key, a bad slot length, the checksum,
  the decryption) or ``initializing TPM data to default values``, which every failure path prints
  before ``TPM_Init()`` (an unmarshal failure prints only that);
* **loaded** — ``TPM_Init()`` after the key request and a slot read, with none of the above since the
  boot began.  Anything else is not proof, and is treated as fresh.
"""
from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass

from xen_vtpm.xen.consoles import LogTail, PtyReader

BOOT_START = "starting TPM Emulator"
KEY_REQUEST = "Requesting Encryption key from backend"
TPM_INIT = "TPM_Init()"
_READ = re.compile(r"Read (\d+) bytes from NVM persistent storage \(slot ([01])\)")
_MANAGER_RC = re.compile(r"VTPM_LoadHashKey\(\) failed with error code \((\d+)\)")
# Each line that means "no saved state this boot" (docs/xen-internals.md §7.2), with what it says.
_FRESH = (
    ("VTPM_LoadHashKey failed", "the manager refused its key"),
    ("Manager returned a hashkey of invalid size", "the manager's entry has the wrong size"),
    ("data_length for NVM", "a disk slot's length prefix is invalid"),
    ("read(length) failed", "its disk could not be read"),
    ("read(data) failed", "its disk could not be read"),
    ("NVM Storage Checksum failed!", "neither disk slot matches the manager's hash"),
    ("Decryption Error", "the matching slot does not decrypt"),
    ("initializing TPM data to default values", "the emulator started a brand-new TPM"),
    ("restoring permanent data failed", "startup mode save found no state (fail-stop)"),
)

# vtpmmgr's answers to LOADHASHKEY (docs/xen-internals.md §2.2, §3.2)
TPM_BAD_PARAMETER = 3     # no entry for this UUID
TPM_DISABLED = 7          # "Attempted to open vTPM twice!" or "Unauthorized vTPM kernel image used!"
TPM_FAIL = 9              # the peer's XSM label cannot be read: no XSM
ALIVE_EVERY = 1.0         # seconds between checks that a booting stub domain still runs


@dataclass(frozen=True)
class BootVerdict:
    kind: str                      # "loaded", "fresh", "pending" (not that far yet) or "none" (no boot seen)
    reason: str = ""
    slot: int | None = None        # loaded: the slot whose hash matched
    nbytes: int | None = None
    manager_rc: int | None = None  # fresh: the manager's LOADHASHKEY answer, when it refused

    @property
    def loaded(self) -> bool:
        return self.kind == "loaded"

    @property
    def fresh(self) -> bool:
        return self.kind == "fresh"


def boot_verdict(text: str) -> BootVerdict:
    """The verdict on the last boot in ``text`` (console output, possibly of several boots)."""
    start = text.rfind(BOOT_START)
    if start < 0:
        return BootVerdict("none", "no vTPM boot on the console")
    asked = initialised = False
    read: tuple[int, int] | None = None
    rc: int | None = None
    for line in text[start:].splitlines():
        if KEY_REQUEST in line:
            asked = True
        if (m := _MANAGER_RC.search(line)) is not None:
            rc = int(m.group(1))
        if (m := _READ.search(line)) is not None:
            read = (int(m.group(2)), int(m.group(1)))
        for marker, reason in _FRESH:
            if marker in line:
                cause = f"{reason} (manager answered {rc})" if rc is not None else reason
                return BootVerdict("fresh", f"{cause}: {line.strip()[:160]}", manager_rc=rc)
        if TPM_INIT in line:
            initialised = True
            break
    if not initialised:
        return BootVerdict("pending", "the vTPM has not finished loading")
    if not asked or read is None:
        return BootVerdict("fresh", "TPM_Init() without a key request and a slot read before it: not proof of "
                                    "a loaded state")
    return BootVerdict("loaded", f"slot {read[0]} ({read[1]} bytes) accepted", slot=read[0], nbytes=read[1])


def watch_boot(pty: PtyReader | None, log: LogTail | None, timeout: float,
               alive: Callable[[], bool]) -> BootVerdict:
    """Follow one boot on the console until it proves loaded or fresh; "pending" when ``timeout`` ran out.

    The pty (opened before the domain was unpaused) sees the whole boot without any logging; the log
    file, when xenconsoled writes one, is preferred once this boot reaches it, since it is complete
    even if someone else reads the pty at the same time (`xl console`)."""
    deadline = time.monotonic() + timeout
    next_alive_check = time.monotonic() + ALIVE_EVERY
    seen = ""
    while True:
        if pty is not None:
            seen += pty.read()
        logged = log.text() if log is not None else ""
        verdict = boot_verdict(logged if BOOT_START in logged else seen)
        if verdict.kind in ("loaded", "fresh"):
            return verdict
        now = time.monotonic()
        if now > next_alive_check:          # `xl list` is a process: ask it now and then, not every poll
            if not alive():
                return BootVerdict("fresh", "the stub domain died during its boot")
            next_alive_check = now + ALIVE_EVERY
        if now > deadline:
            return BootVerdict("pending", f"no verdict on its console within {timeout:g} s")
        time.sleep(0.05)
