"""Chunk identity and encryption: keyed ids, AES-256-GCM bound to the id.

The id is HMAC-SHA256(chunk_id key, SHA-256(plaintext)): a PRF of a collision-resistant
digest, so equal plaintexts dedup, yet without the key an id says nothing about the content
(an unkeyed hash would let anyone confirm a guess of a memory page).  Keying the digest rather
than the plaintext lets the writer reuse the SHA-256 the chunking engine already computed.
The id is the GCM associated data, so a ciphertext moved under another id fails
authentication; a full verify also recomputes the id from the plaintext, which catches a
consistent swap of id and ciphertext too.
"""
from __future__ import annotations

import hashlib
import hmac
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError

ID_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16
DELTA_AAD = b"delta"   # appended to the id in a delta chunk's associated data (delta.py)


class ChunkCipher:
    """Seals and opens chunks with the store's sub-keys (any object with chunk_enc and chunk_id)."""

    def __init__(self, keys: Any) -> None:
        self.id_key = bytes(keys.chunk_id)      # the C pipelines (ingest.py) key their own contexts
        self.enc_key = bytes(keys.chunk_enc)
        self._aead = AESGCM(self.enc_key)

    def id_of_digest(self, sha256: bytes) -> bytes:
        """The id of a chunk whose SHA-256 is ``sha256``."""
        return hmac.digest(self.id_key, sha256, "sha256")

    def chunk_id(self, plaintext: bytes) -> bytes:
        return self.id_of_digest(hashlib.sha256(plaintext).digest())

    def seal(self, chunk_id: bytes, plaintext: bytes, delta: bool = False) -> tuple[bytes, bytes]:
        """Return (nonce, ciphertext||tag).  Random nonces: each distinct chunk is sealed once
        (dedup), so a store stays far below the 2^32 messages per key that random 96-bit
        nonces allow.  ``delta``: ``plaintext`` is a delta payload (associated data id || "delta",
        so a delta never opens as a full chunk nor a full chunk as a delta)."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, plaintext, chunk_id + DELTA_AAD if delta else chunk_id)

    def decrypt(self, chunk_id: bytes, nonce: bytes, sealed: bytes, where: str, delta: bool = False) -> bytes:
        """Decrypt and check the GCM tag only (the id is the associated data); ``where`` names
        the chunk in the error message."""
        try:
            return self._aead.decrypt(nonce, sealed, chunk_id + DELTA_AAD if delta else chunk_id)
        except InvalidTag:
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()[:16]} fails authentication (GCM tag); "
                                 "the stored data was altered or swapped — do not use this checkpoint") from None

    def check_id(self, chunk_id: bytes, sha256: bytes, where: str) -> None:
        """Raise unless ``sha256`` (of a decrypted plaintext) gives ``chunk_id``."""
        if not hmac.compare_digest(self.id_of_digest(sha256), chunk_id):
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()[:16]} content does not match its id; "
                                 "the store was altered — do not use this checkpoint")
