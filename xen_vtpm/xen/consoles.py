"""A domain's console as xenconsoled offers it: its pty, and its log file when logging is on.

xenconsoled gives every domain a pty and writes the slave's name to ``/local/domain/<domid>/console/tty``;
with ``--log=guest`` it also appends the output to ``<log-dir>/guest-<name>.log``, which is off by
default (docs/xen-internals.md §7.5, §7.6).  Reading the pty needs no logging: a reader that opens it
before the domain runs sees everything the domain prints.
"""
from __future__ import annotations

import errno
import os
import re
import stat
from pathlib import Path

from .xenstore import XenStore

_PTY = re.compile(r"/dev/pts/\d+")


def tty_node(domid: int) -> str:
    return f"/local/domain/{domid}/console/tty"


def console_tty(xs: XenStore, domid: int) -> str | None:
    """The domain's console pty, if xenconsoled published one that exists.

    Only a ``/dev/pts/N`` character device is accepted: the node lies in the domain's own directory,
    so the tool never opens whatever path it might name instead."""
    path = xs.read_or(tty_node(domid))
    if path is None or not _PTY.fullmatch(path):
        return None
    try:
        return path if stat.S_ISCHR(os.stat(path).st_mode) else None
    except OSError:
        return None


def log_path(log_dir: str | os.PathLike, name: str) -> Path:
    return Path(log_dir) / f"guest-{name}.log"


class PtyReader:
    """The read side of a console pty (non-blocking); ``read`` returns what arrived since the last call."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY | os.O_NOCTTY | os.O_NONBLOCK)

    def read(self) -> str:
        chunks = []
        while True:
            try:
                data = os.read(self.fd, 65536)
            except OSError as exc:
                if exc.errno in (errno.EAGAIN, errno.EIO):   # EIO: the domain and its pty are gone
                    break
                raise
            if not data:
                break
            chunks.append(data)
        return b"".join(chunks).decode("utf-8", errors="replace").replace("\r\n", "\n")

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> PtyReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class LogTail:
    """What a console log file gained after ``offset`` (its size when the caller started watching)."""

    def __init__(self, path: Path, offset: int | None = None) -> None:
        self.path = path
        self.offset = self.size() if offset is None else offset

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except FileNotFoundError:
            return 0

    def text(self) -> str:
        try:
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                return fh.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return ""
