"""Pack files: many sealed chunks appended to one file (format: docs/formats.md, "Checkpoint store" §1).

    header  32 B   magic "XVTPPACK" | version u32 | reserved u32 | pack id (16 B, = file name in hex)
    entry   48 B + n   chunk id (32) | nonce (12) | n u32 | sealed chunk (n B = plaintext + GCM tag)
    index   44 B each  chunk id (32) | entry offset u64 | n u32
    footer  56 B   index offset u64 | entry count u32 | reserved u32 | SHA-256(header||index) | "XVTPPEND"

Integers are little-endian.  A pack is written under ``<name>.pack.tmp`` and published
(``durable.publish``) once complete, so a ``.pack`` file is always whole; the index lets recovery
and verification walk a pack without the catalog.  Authenticity comes from the per-chunk GCM
tags; the index digest only catches damage.
"""
from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

from ..errors import IntegrityError
from .chunks import ID_SIZE, NONCE_SIZE
from .fsio import publish, rename_only, storage_error

MAGIC = b"XVTPPACK"
END_MAGIC = b"XVTPPEND"
VERSION = 1
HEADER = struct.Struct("<8sII16s")
ENTRY = struct.Struct(f"<{ID_SIZE}s{NONCE_SIZE}sI")
INDEX = struct.Struct(f"<{ID_SIZE}sQI")
FOOTER = struct.Struct("<QII32s8s")
SUFFIX = ".pack"


def new_pack_name() -> str:
    return os.urandom(16).hex()


def pack_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}"


def temp_path(directory: Path, name: str) -> Path:
    return directory / f"{name}{SUFFIX}.tmp"


class PackWriter:
    """Appends sealed chunks to a new pack; ``finish`` makes it durable and publishes it atomically.

    Entries are written at explicit offsets of one descriptor, by ``add`` or by the ingest pipeline
    straight from C (``appended``), so the file is never buffered in Python."""

    def __init__(self, directory: Path, name: str) -> None:
        self.name = name
        self.path = pack_path(directory, name)
        self._tmp = temp_path(directory, name)
        self._index = bytearray()   # packed INDEX records, in entry order
        self._header = HEADER.pack(MAGIC, VERSION, 0, bytes.fromhex(name))
        try:
            self.fd = os.open(self._tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o666)
        except OSError as exc:
            raise storage_error(exc, self._tmp, "creating pack") from None
        self._pwrite(self._header, 0)
        self.size = HEADER.size     # of the body: header and entries

    def _pwrite(self, data: bytes | bytearray, offset: int) -> None:
        view = memoryview(data)
        try:
            while view:
                n = os.pwrite(self.fd, view, offset)
                offset += n
                view = view[n:]
        except OSError as exc:
            raise storage_error(exc, self._tmp, "writing pack") from None

    def add(self, chunk_id: bytes, nonce: bytes, sealed: bytes) -> int:
        """Append one entry and return its offset."""
        offset = self.size
        self._pwrite(ENTRY.pack(chunk_id, nonce, len(sealed)) + sealed, offset)
        self._index += INDEX.pack(chunk_id, offset, len(sealed))
        self.size += ENTRY.size + len(sealed)
        return offset

    def appended(self, entries: list[tuple[bytes, int, int]], nbytes: int) -> None:
        """``nbytes`` of entries were written at ``size`` by someone else: [(id, offset, sealed length)]."""
        for chunk_id, offset, sealed in entries:
            self._index += INDEX.pack(chunk_id, offset, sealed)
        self.size += nbytes

    @property
    def entries(self) -> int:
        return len(self._index) // INDEX.size

    def finish(self, publish_dir: bool = True) -> int:
        """Write index and footer, fsync, rename into place; return the final file size.

        ``publish_dir=False`` leaves the directory fsync to the caller (one for several packs, before
        anything names them: the store's commit)."""
        index = self._index
        digest = hashlib.sha256(self._header + index).digest()
        self._pwrite(index + FOOTER.pack(self.size, self.entries, 0, digest, END_MAGIC), self.size)
        try:
            os.fsync(self.fd)
            os.close(self.fd)
        except OSError as exc:
            raise storage_error(exc, self._tmp, "writing pack") from None
        self.fd = -1
        # The body was streamed and synced: only the rename (and the directory) remain.
        if publish_dir:
            publish(self._tmp, self.path)
        else:
            rename_only(self._tmp, self.path)
        return self.size + len(index) + FOOTER.size

    def discard(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            except OSError:
                pass  # the temp file is being thrown away; a failed close does not matter
            self.fd = -1
        try:
            os.unlink(self._tmp)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise storage_error(exc, self._tmp, "removing unfinished pack") from None


class PackReader:
    """Random access to the entries of published packs, one open descriptor per pack."""

    def __init__(self, directory: Path) -> None:
        self._dir = directory
        self._fds: dict[str, int] = {}

    def fd_of(self, name: str, where: str) -> int:
        """The open descriptor of pack ``name`` (the C pipelines read entries through it)."""
        return self._fd(name, where)

    def _fd(self, name: str, where: str) -> int:
        fd = self._fds.get(name)
        if fd is None:
            path = pack_path(self._dir, name)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                raise IntegrityError(f"{where}: pack {name} is missing although the catalog references it; "
                                     "restore the state dir from backup or delete the checkpoint") from None
            except OSError as exc:
                raise storage_error(exc, path, "opening pack") from None
            self._fds[name] = fd
        return fd

    def read_entry(self, name: str, offset: int, length: int, chunk_id: bytes, where: str) -> tuple[bytes, bytes]:
        """Return (nonce, sealed) of the entry the catalog places at ``offset``; checks its header."""
        fd = self._fd(name, where)
        try:
            raw = os.pread(fd, ENTRY.size + length, offset)
        except OSError as exc:
            raise storage_error(exc, pack_path(self._dir, name), "reading pack") from None
        if len(raw) != ENTRY.size + length:
            raise IntegrityError(f"{where}: pack {name} is truncated at offset {offset}; "
                                 "restore the state dir from backup or delete the checkpoint")
        stored_id, nonce, stored_len = ENTRY.unpack_from(raw)
        if stored_id != chunk_id:
            raise IntegrityError(f"{where}: pack {name} entry at offset {offset} holds chunk "
                                 f"{stored_id.hex()[:16]}, not {chunk_id.hex()[:16]}; the store was altered")
        if stored_len != length:
            raise IntegrityError(f"{where}: pack {name} entry at offset {offset} has sealed length {stored_len}, "
                                 f"the catalog says {length}; the store was altered")
        return nonce, raw[ENTRY.size:]

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def read_index(directory: Path, name: str, headers: bool = True) -> list[tuple[bytes, int, int]]:
    """Parse and check a pack's header, index and footer; return [(chunk id, offset, length)].

    Checks the structure only (magic, version, name binding, index digest, entries tiling the
    body with headers that match the index); chunk contents are checked by the GCM tags.
    ``headers=False`` leaves out reading each entry's header (one read per entry): for a caller that
    reads, and checks, the entries it cares about anyway.
    """
    path = pack_path(directory, name)
    where = f"pack {name}"
    try:
        with open(path, "rb") as fh:
            data_size = os.fstat(fh.fileno()).st_size
            header = fh.read(HEADER.size)
            if data_size < HEADER.size + FOOTER.size or len(header) != HEADER.size:
                raise IntegrityError(f"{where}: truncated ({data_size} bytes); the store was damaged")
            magic, version, _, pack_id = HEADER.unpack(header)
            if magic != MAGIC or version != VERSION:
                raise IntegrityError(f"{where}: bad header magic or version; the store was damaged")
            if pack_id.hex() != name:
                raise IntegrityError(f"{where}: header names pack {pack_id.hex()}; a pack file was renamed or swapped")
            fh.seek(data_size - FOOTER.size)
            index_off, count, reserved, digest, end = FOOTER.unpack(fh.read(FOOTER.size))
            if end != END_MAGIC or reserved != 0 or index_off + count * INDEX.size + FOOTER.size != data_size \
                    or index_off < HEADER.size:
                raise IntegrityError(f"{where}: bad or missing footer (truncated?); the store was damaged")
            fh.seek(index_off)
            index = fh.read(count * INDEX.size)
            if hashlib.sha256(header + index).digest() != digest:
                raise IntegrityError(f"{where}: index digest mismatch; the store was damaged")
            entries = [INDEX.unpack_from(index, i * INDEX.size) for i in range(count)]
            expected = HEADER.size
            for chunk_id, offset, length in entries:
                if offset != expected:
                    raise IntegrityError(f"{where}: index entry at {offset} does not follow the previous one")
                if headers:
                    fh.seek(offset)
                    raw = fh.read(ENTRY.size)
                    if len(raw) != ENTRY.size or ENTRY.unpack(raw)[0] != chunk_id or ENTRY.unpack(raw)[2] != length:
                        raise IntegrityError(f"{where}: entry header at {offset} disagrees with the index")
                expected = offset + ENTRY.size + length
            if expected != index_off:
                raise IntegrityError(f"{where}: entries do not end where the index starts")
    except FileNotFoundError:
        raise IntegrityError(f"{where}: missing although the catalog references it; "
                             "restore the state dir from backup or delete the checkpoints using it") from None
    except OSError as exc:
        raise storage_error(exc, path, "reading pack") from None
    return [(cid, off, ln) for cid, off, ln in entries]
