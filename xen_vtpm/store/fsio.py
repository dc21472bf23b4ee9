"""The store's file operations: the tool's one durable publish (``xen_vtpm.durable``)."""
from __future__ import annotations

from ..durable import fsync_dir, storage_error, unlink_if_present, write_atomic

__all__ = ["fsync_dir", "storage_error", "unlink_if_present", "write_atomic"]
