"""The store's file operations: the tool's one durable publish (``xen_vtpm.durable``), and its first half."""
from __future__ import annotations

import os
from pathlib import Path

from ..durable import fsync_dir, make_dirs, publish, storage_error, unlink_if_present, write_atomic

__all__ = ["fsync_dir", "make_dirs", "publish", "rename_only", "storage_error", "unlink_if_present", "write_atomic"]


def rename_only(tmp: Path, path: Path) -> None:
    """``publish`` without its directory fsync, for several files published together: the caller fsyncs
    the directory once (``fsync_dir``) before anything relies on them.  A crash before that may bring
    back the temporary name, which the caller's journal names too."""
    try:
        os.replace(tmp, path)
    except OSError as exc:
        raise storage_error(exc, path, "publishing") from None
