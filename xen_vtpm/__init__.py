"""xen-vtpm: synchronized, TPM-sealed checkpoints of Xen guests and their vTPMs.

The Python API (docs/api.md): ``from xen_vtpm import Host``.  It follows semantic versioning
with ``__version__`` (README, "Versions").
"""
from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

__all__ = ["__version__", "Host", "HostStatus", "CheckpointInfo", "SnapshotResult", "RollbackResult", "SaveResult",
           "RestoreResult", "DeleteResult", "VerifyResult", "KeepResult", "RecoverResult", "ScheduledRun",
           "RetentionPolicy", "PruneResult", "PruneEntry", "Check"]


def __getattr__(name: str) -> Any:
    """The API loads on first use (PEP 562): it pulls in the whole tool (TPM, store, XenStore), and
    every process that only needs a leaf module — each `xl` call of the simulated host imports
    ``xen_vtpm.xen`` — would otherwise pay a third of a second for it.  Type checkers read the
    names from ``__init__.pyi``."""
    if name in __all__:
        return getattr(importlib.import_module("xen_vtpm.api"), name)
    raise AttributeError(f"module 'xen_vtpm' has no attribute {name!r}")
