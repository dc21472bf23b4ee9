"""Reading one checkpoint back, verifying as it goes.

Opening checks the manifest MAC, that the catalog copy equals the manifest file and that the
catalog row agrees with the manifest.  Each chunk is checked (entry header, GCM tag with the id
as associated data, id recomputed from the plaintext, length) before it is yielded; the
stream's length and tree root are compared at its end.  A consumer that must not act on
unverified data verifies first (``Repository.verify``) and then streams.
"""
from __future__ import annotations

import hashlib
import hmac
from typing import TYPE_CHECKING, Any, Callable, Iterator

from ..errors import IntegrityError, UsageError
from .fsio import storage_error
from .manifest import Manifest, StreamRecord, decode
from .packs import PackReader

if TYPE_CHECKING:
    from .repository import Repository


class CheckpointReader:
    """Returned by ``Repository.open_checkpoint``; holds the store lock shared until ``close``."""

    def __init__(self, repo: "Repository", checkpoint_id: str, lock: Any) -> None:
        self._repo = repo
        self._lock = lock
        self.checkpoint_id = checkpoint_id
        self.label = f"checkpoint {checkpoint_id}"
        self._packs = PackReader(repo.pack_dir)
        try:
            self.manifest = self._load_manifest()
            self._places = self._load_places()
        except BaseException:
            self.close()
            raise

    def __enter__(self) -> "CheckpointReader":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        self._packs.close()
        if self._lock is not None:
            self._lock.release()
            self._lock = None

    def _load_manifest(self) -> Manifest:
        row = self._repo.catalog.query(
            "SELECT name, vm_uuid, vm_name, created_us, size, CAST(manifest AS BLOB) FROM checkpoints WHERE id=?",
            (self.checkpoint_id,))
        if not row:
            raise IntegrityError(f"{self.label}: catalog row vanished while opening; run `xen-vtpm recover`")
        name, vm_uuid, vm_name, created_us, size, blob = row[0]
        manifest = decode(bytes(blob), self._repo.mac_key, self.checkpoint_id)
        path = self._repo.manifest_path(self.checkpoint_id)
        try:
            file_bytes = path.read_bytes()
        except FileNotFoundError:
            raise IntegrityError(f"{self.label}: manifest file {path.name} is missing; "
                                 "restore the state dir from backup or delete the checkpoint") from None
        except OSError as exc:
            raise storage_error(exc, path, "reading manifest") from None
        if not hmac.compare_digest(file_bytes, bytes(blob)):
            raise IntegrityError(f"{self.label}: catalog manifest differs from manifest file {path.name}; "
                                 "one of them was altered — do not use this checkpoint")
        got = (manifest.checkpoint_id, manifest.name, manifest.vm_uuid, manifest.vm_name, manifest.created_us,
               manifest.size)
        want = (self.checkpoint_id, name, vm_uuid, vm_name, created_us, size)
        for field, a, b in zip(("id", "name", "vm_uuid", "vm_name", "time", "size"), got, want):
            if a != b:
                raise IntegrityError(f"{self.label}: catalog {field} {b!r} does not match the signed manifest "
                                     f"({a!r}); the catalog was altered — do not use this checkpoint")
        return manifest

    def _load_places(self) -> dict[bytes, tuple[str, int, int, int]]:
        rows = self._repo.catalog.query(
            "SELECT c.id, c.pack, c.offset, c.length, c.plain_len FROM refs r JOIN chunks c ON c.id = r.chunk "
            "WHERE r.checkpoint=?", (self.checkpoint_id,))
        return {bytes(r[0]): (r[1], r[2], r[3], r[4]) for r in rows}

    def chunk(self, chunk_id: bytes, length: int, where: str) -> bytes:
        """One verified plaintext chunk."""
        place = self._places.get(chunk_id)
        if place is None:
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()[:16]} is not in the catalog for this "
                                 "checkpoint; the catalog was altered — do not use this checkpoint")
        pack, offset, sealed_len, plain_len = place
        nonce, sealed = self._packs.read_entry(pack, offset, sealed_len, chunk_id, where)
        data = self._repo.cipher.open(chunk_id, nonce, sealed, where)
        if len(data) != length or plain_len != length:
            raise IntegrityError(f"{where}: chunk {chunk_id.hex()[:16]} has length {len(data)}, the manifest "
                                 f"says {length}; do not use this checkpoint")
        return data

    def stream(self, name: str, progress: Callable[[int], Any] | None = None) -> Iterator[bytes]:
        """Yield the plaintext of stream ``name`` chunk by chunk, each verified before it is yielded."""
        record = self._record(name)
        from .. import hashing
        tree = hashing.StreamTreeHash()
        where = f"{self.label} stream {name}"
        for i, (cid, length) in enumerate(record.chunks):
            data = self.chunk(cid, length, f"{where} chunk {i}")
            tree.update(data)
            if progress is not None:
                progress(len(data))
            yield data
        if not hmac.compare_digest(tree.digest(), record.tree_root):
            raise IntegrityError(f"{where}: tree root mismatch (chunks reordered or replaced); "
                                 "do not use this checkpoint")

    def read_blob(self, name: str) -> bytes:
        record = self._record(name)
        data = b"".join(self.stream(name))
        if record.sha256 is not None and not hmac.compare_digest(hashlib.sha256(data).digest(), record.sha256):
            raise IntegrityError(f"{self.label} blob {name}: SHA-256 mismatch; do not use this checkpoint")
        return data

    def _record(self, name: str) -> StreamRecord:
        try:
            return self.manifest.stream(name)
        except KeyError:
            have = ", ".join(s.name for s in self.manifest.streams) or "none"
            raise UsageError(f"{self.label}: no stream {name!r} (has: {have})") from None

    def pack_names(self) -> set[str]:
        return {place[0] for place in self._places.values()}

    def placements(self) -> dict[bytes, tuple[str, int, int, int]]:
        return dict(self._places)
