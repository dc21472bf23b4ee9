"""Sub-keys derived from the sealed host key.

One HKDF-SHA256 expansion per purpose, each with its own label, so a key that
leaks from one use (say a chunk id in a log) says nothing about the others.
The host key itself only ever lives in memory, unsealed once per command.
"""
from __future__ import annotations

import dataclasses

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_LABELS = ("chunk_enc", "chunk_id", "manifest_mac", "head_mac", "audit_mac", "journal_mac", "swtpm", "trust_mac")


@dataclasses.dataclass(frozen=True)
class SubKeys:
    # repr=False: a stray print or traceback must never show key bytes.
    chunk_enc: bytes = dataclasses.field(repr=False)
    chunk_id: bytes = dataclasses.field(repr=False)
    manifest_mac: bytes = dataclasses.field(repr=False)
    head_mac: bytes = dataclasses.field(repr=False)
    audit_mac: bytes = dataclasses.field(repr=False)
    journal_mac: bytes = dataclasses.field(repr=False)   # the coordinator's write-ahead journal
    swtpm: bytes = dataclasses.field(repr=False)         # base of each swtpm vTPM's state and migration keys
    trust_mac: bytes = dataclasses.field(repr=False)     # the trusted peer hosts (host/trusted.py)


def derive_keys(host_key: bytes) -> SubKeys:
    """32-byte sub-keys, HKDF-SHA256 over ``host_key`` with info ``b"xen-vtpm v1 <name>"``."""
    if len(host_key) < 32:
        raise ValueError("host key must be at least 32 bytes")
    return SubKeys(**{
        label: HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=b"xen-vtpm v1 " + label.encode()).derive(host_key)
        for label in _LABELS
    })
