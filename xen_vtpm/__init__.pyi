"""What ``xen_vtpm`` exports, for type checkers: ``__init__.py`` loads the API on first use."""
from .api import (
    Check,
    CheckpointInfo,
    DeleteResult,
    Host,
    HostStatus,
    KeepResult,
    PruneEntry,
    PruneResult,
    RecoverResult,
    RestoreResult,
    RetentionPolicy,
    RollbackResult,
    SaveResult,
    ScheduledRun,
    SnapshotResult,
    VerifyResult,
)

__version__: str
__all__ = ["__version__", "Check",
           "CheckpointInfo", "DeleteResult", "Host", "HostStatus", "KeepResult", "PruneEntry", "PruneResult",
           "RecoverResult", "RestoreResult", "RetentionPolicy", "RollbackResult", "SaveResult", "ScheduledRun",
           "SnapshotResult", "VerifyResult"]
