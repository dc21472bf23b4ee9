"""The store's file operations: the tool's one durable publish (``xen_vtpm.durable``)."""
from __future__ import annotations

from ..durable import make_dirs, publish, storage_error, unlink_if_present, write_atomic

__all__ = ["make_dirs", "publish", "storage_error", "unlink_if_present", "write_atomic"]
