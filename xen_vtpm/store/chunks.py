"""Chunk identity and encryption: keyed ids, AES-256-GCM bound to the id.

The id is HMAC-SHA256(chunk_id key, plaintext): equal plaintexts dedup, yet
without the key an id says nothing about the content (an unkeyed hash would
let anyone confirm a guess of a memory page).  The id is the GCM associated
data, so a ciphertext moved under another id fails authentication, and on
read the id is recomputed from the plaintext, so a consistent swap of id and
ciphertext is caught too.
"""
from __future__ import annotations

import hmac
import os
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from ..errors import IntegrityError

ID_SIZE = 32
NONCE_SIZE = 12
TAG_SIZE = 16


class ChunkCipher:
    """Seals and opens chunks with the store's sub-keys (any object with chunk_enc and chunk_id)."""

    def __init__(self, keys: Any) -> None:
        self._id_key = bytes(keys.chunk_id)
        self._aead = AESGCM(bytes(keys.chunk_enc))

    def chunk_id(self, plaintext: bytes) -> bytes:
        return hmac.digest(self._id_key, plaintext, "sha256")

    def seal(self, chunk_id: bytes, plaintext: bytes) -> tuple[bytes, bytes]:
        """Return (nonce, ciphertext||tag).  Random nonces: each distinct chunk is sealed once
        (dedup), so a store stays far below the 2^32 messages per key that random 96-bit
        nonces allow."""
        nonce = os.urandom(NONCE_SIZE)
        return nonce, self._aead.encrypt(nonce, plaintext, chunk_id)

    def open(self, chunk_id: bytes, nonce: bytes, sealed: bytes, where: str) -> bytes:
        """Decrypt and check the id; ``where`` names the chunk in the error message."""
        try:
            plaintext = self._aead.decrypt(nonce, sealed, chunk_id)
        except InvalidTag:
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()[:16]} fails authentication (GCM tag); "
                                 "the stored data was altered or swapped — do not use this checkpoint") from None
        if not hmac.compare_digest(self.chunk_id(plaintext), chunk_id):
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()[:16]} content does not match its id; "
                                 "the store was altered — do not use this checkpoint")
        return plaintext
