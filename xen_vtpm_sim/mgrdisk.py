"""Reading the simulated vtpmmgr's sealed disk from outside the manager (tests, tools).

The disk is Xen 4.17's own format (``stubdom/vtpmmgr/disk_format.h``: seal lists in sectors 0/1, the
encrypted root in 2/3, copy-on-write group and vTPM sectors), written by the native manager.  Reading
it runs that same code: ``vtpmmgr-native --dump`` unseals the root key with the manager's physical TPM
(TPM 2.0 seals of the patch series), verifies every sector and prints the table.  It reads only: a
root behind the NV counter is reported on its console, not refused, and the counter is not
advanced.  Nothing here re-implements the format.
"""
from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass
from pathlib import Path

from .vtpmmgr import BINARY, SANITIZER_ENV

FLAG_ADMIN = 1
FLAG_CHECKPOINT = 2            # vtpm_disk.h VTPM_FLAG_CHECKPOINT (the checkpoint extension)
FLAG_OPEN = 1 << 31            # in memory only, never on disk
SECTOR = 4096


class DiskError(Exception):
    """The manager image cannot be read back."""


class PtpmSealer:
    """The manager's physical TPM, named by its TCTI (the native reader connects to it itself)."""

    def __init__(self, tcti: str) -> None:
        self.tcti = tcti

    def close(self) -> None:
        """Nothing is held open between reads."""


@dataclass
class Entry:
    flags: int
    data: bytes                       # 64 bytes, opaque (H ‖ K ‖ zero padding for the stock vTPM)


class MgrDisk:
    """The table of a manager image, as the manager itself would load it."""

    def __init__(self, path: Path, sealer: PtpmSealer, words: tuple[str, ...] = ("tpm2=1",)) -> None:
        self.path = Path(path)
        self.sealer = sealer
        self.words = words                 # the manager's command line words that matter to a load
        self.key: bytes | None = None      # tm_key: encrypts and authenticates every sector
        self.group_keys: dict[int, bytes] = {}
        self.seq = 0
        self.counter = 0                   # the NV counter value the loaded root carries
        self.active = -1

    def load(self) -> dict[bytes, Entry] | None:
        """The newest loadable table, or None when the manager would start empty."""
        env = dict(os.environ, **SANITIZER_ENV)
        proc = subprocess.run([str(BINARY), "--dump", "--disk", str(self.path), "--tcti", self.sealer.tcti,
                               "--", *self.words], capture_output=True, text=True, timeout=60, env=env)
        if proc.returncode == 2:
            return None
        if proc.returncode != 0:
            raise DiskError(f"{self.path.name}: the native reader failed ({proc.returncode}): "
                            f"{(proc.stderr or proc.stdout).strip()[-300:]}")
        table: dict[bytes, Entry] = {}
        for line in proc.stdout.splitlines():
            words = line.split()[1:] if line.startswith("dump ") else []   # the rest is the console
            if words[:1] == ["slot"]:
                self.active, self.seq, self.counter = int(words[1]), int(words[3]), int(words[5])
            elif words[:1] == ["tm_key"]:
                self.key = bytes.fromhex(words[1])
            elif words[:1] == ["group"]:
                self.group_keys[int(words[1])] = bytes.fromhex(words[3])
            elif words[:1] == ["entry"]:
                table[bytes.fromhex(words[1])] = Entry(int(words[2], 16), bytes.fromhex(words[3]))
        return table

    @staticmethod
    def root_sector_offset(slot: int) -> int:
        """Byte offset of the encrypted root sector of A/B slot 0 or 1 (disk_io.h root_loc)."""
        return (2 + slot) * SECTOR
