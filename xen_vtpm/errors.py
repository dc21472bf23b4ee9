"""Every failure the tool expects, each bound to one exit code.

The CLI prints ``str(error)`` on one line and exits with ``error.exit_code``;
nothing here ever reaches the user as a traceback.  Messages name the object,
the cause and the next step, e.g.
``vtpm-guest1: manager has no checkpoint support (stock vtpmmgr); see docs/protocol.md``.
"""
from __future__ import annotations


class XenVtpmError(Exception):
    """Base class: something we anticipated went wrong (exit 1 unless refined)."""

    exit_code = 1

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


# --- exit 2: usage ---------------------------------------------------------
class UsageError(XenVtpmError):
    exit_code = 2


class ConfigError(UsageError):
    """The config file is missing, unreadable or malformed."""


# --- exit 3: not found -----------------------------------------------------
class NotFound(XenVtpmError):
    exit_code = 3


class DomainNotFound(NotFound):
    pass


class CheckpointNotFound(NotFound):
    pass


# --- exit 4: precondition not met ------------------------------------------
class PreconditionFailed(XenVtpmError):
    exit_code = 4


class NoCheckpointFeature(PreconditionFailed):
    """The vTPM manager does not advertise the checkpoint extension."""


class VtpmBusy(PreconditionFailed):
    pass


class Locked(PreconditionFailed):
    """Another xen-vtpm command holds the per-VM lock."""


# --- exit 5: integrity -----------------------------------------------------
class IntegrityError(XenVtpmError):
    exit_code = 5


class MalformedSaveFile(IntegrityError):
    """An xl save file is truncated, has the wrong magic or a bad record."""


class TransferError(IntegrityError):
    """A move's transfer is truncated, altered, replayed or not for this host."""


# --- exit 6: freshness -----------------------------------------------------
class FreshnessError(XenVtpmError):
    exit_code = 6


class ReplayDetected(FreshnessError):
    """The catalog head is behind the TPM counter: an old state was put back."""


class CounterAhead(FreshnessError):
    """The catalog head is ahead of the TPM counter: counter reset or another TPM."""


# --- exit 7: authorization -------------------------------------------------
class AuthorizationDenied(XenVtpmError):
    exit_code = 7


class UntrustedPeer(AuthorizationDenied):
    """The other host of a move is not in this host's trust list (or no longer matches it)."""


# --- exit 8: TPM -----------------------------------------------------------
class TpmError(XenVtpmError):
    exit_code = 8


class TpmUnreachable(TpmError):
    pass


class PcrPolicyMismatch(TpmError):
    pass


class TpmLockout(TpmError):
    pass


class NvIndexError(TpmError):
    pass


# --- exit 9: Xen / XenStore / xl -------------------------------------------
class XenError(XenVtpmError):
    exit_code = 9


class XenStoreError(XenError):
    pass


class XenStoreUnavailable(XenStoreError):
    pass


class XenStoreTimeout(XenStoreError):
    pass


class XenStoreNotFound(XenStoreError):
    """A XenStore path does not exist (ENOENT)."""


class XenStorePermission(XenStoreError):
    """XenStore refused access (EACCES / EPERM)."""


class XlError(XenError):
    """`xl` failed or its configuration could not be parsed."""


class XlConfigError(XlError):
    pass


class ManagerError(XenError):
    """The vTPM manager answered a request with an error or not at all."""


# --- exit 10: storage ------------------------------------------------------
class StorageError(XenVtpmError):
    exit_code = 10


class DiskFull(StorageError):
    pass


class HashSourceError(StorageError):
    """tree_hash cannot hash its source: missing, unreadable, not a regular file, or changed meanwhile."""


# --- exit 11: the other host of a move ---------------------------------------
class MigrationError(XenVtpmError):
    """The other host of a move failed, refused or could not be reached."""
    exit_code = 11


class MoveInDoubt(MigrationError):
    """The source cannot learn whether the destination committed a move: it keeps its copy parked."""


class HashEngineError(XenVtpmError):
    """The C hashing engine failed for a reason outside its input: libcrypto cannot compute SHA-256,
    or the engine and its Python face disagree (a bug)."""
