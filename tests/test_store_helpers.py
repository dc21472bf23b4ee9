"""Shared helpers of the store tests (no tests here).

Until xen_vtpm.hashing exists, ``ensure_hashing`` installs a small stand-in with the same
interface (content-defined Chunker, StreamTreeHash) for these tests only.
"""
from __future__ import annotations

import hashlib
import random
import re
import sys
import types
from collections import namedtuple
from pathlib import Path

from xen_vtpm.keys import derive_keys

Chunk = namedtuple("Chunk", "offset length digest data")


class _StandInChunker:
    """Content-defined: cuts after a byte pair from a set sized so chunks average about avg_size."""

    def __init__(self, min_size: int = 16 << 10, avg_size: int = 64 << 10, max_size: int = 256 << 10) -> None:
        self.min, self.max = min_size, max_size
        k = max(1, min(255, round(65536 / max(1, avg_size - min_size))))
        self.marker = re.compile(b"[\\x01-" + re.escape(bytes([k])) + b"]\\xa5")
        self.buf = bytearray()
        self.offset = 0

    def _cut(self, final: bool) -> list:
        out = []
        while self.buf:
            m = self.marker.search(self.buf, self.min, self.max)
            if m:
                pos = m.end()
            elif len(self.buf) >= self.max:
                pos = self.max
            elif final:
                pos = len(self.buf)
            else:
                return out
            data = bytes(self.buf[:pos])
            del self.buf[:pos]
            out.append(Chunk(self.offset, len(data), hashlib.sha256(data).digest(), data))
            self.offset += len(data)
        return out

    def feed(self, data: bytes) -> list:
        self.buf += data
        return self._cut(False)

    def finish(self) -> list:
        return self._cut(True)


class _StandInChunkAndTree:
    def __init__(self, leaf_size: int = 1 << 20, min_size: int = 16 << 10, avg_size: int = 64 << 10,
                 max_size: int = 256 << 10) -> None:
        self.chunker = _StandInChunker(min_size, avg_size, max_size)
        self.tree = _StandInTree(leaf_size)

    def feed(self, data: bytes) -> list:
        self.tree.update(data)
        return self.chunker.feed(data)

    def finish(self) -> list:
        return self.chunker.finish()

    def consume(self, f):
        while block := f.read(1 << 20):
            yield from self.feed(block)
        yield from self.finish()

    def digest(self) -> bytes:
        return self.tree.digest()


class _StandInTree:
    def __init__(self, leaf_size: int = 1 << 20) -> None:
        self.leaf, self.buf, self.leaves = leaf_size, bytearray(), []

    def update(self, data: bytes) -> None:
        self.buf += data
        while len(self.buf) >= self.leaf:
            self.leaves.append(hashlib.sha256(self.buf[:self.leaf]).digest())
            del self.buf[:self.leaf]

    def digest(self) -> bytes:
        leaves = self.leaves + ([hashlib.sha256(self.buf).digest()] if self.buf or not self.leaves else [])
        return hashlib.sha256(b"".join(leaves)).digest()


def ensure_hashing() -> str:
    try:
        import xen_vtpm.hashing as real  # noqa: F401
        return "xen_vtpm.hashing"
    except ImportError:
        mod = types.ModuleType("xen_vtpm.hashing")
        mod.ChunkAndTree, mod.StreamTreeHash = _StandInChunkAndTree, _StandInTree
        sys.modules["xen_vtpm.hashing"] = mod
        import xen_vtpm
        xen_vtpm.hashing = mod
        return "stand-in"


KEYS = derive_keys(b"k" * 32)
OTHER_KEYS = derive_keys(b"o" * 32)


def randbytes(n: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(n)


def guest_memory(n: int, seed: int = 1) -> bytes:
    """Like a guest image: random pages with runs of zero pages."""
    rnd = random.Random(seed)
    out = bytearray(rnd.randbytes(n))
    for _ in range(n // (1 << 20)):
        start = rnd.randrange(0, max(1, n - (64 << 10))) & ~4095
        out[start:start + (64 << 10)] = bytes(min(64 << 10, n - start))
    return bytes(out)


def open_repo(state_dir: Path, **kw):
    ensure_hashing()
    from xen_vtpm.store import Repository
    return Repository(state_dir, KEYS, **kw)


def write_checkpoint(repo, data: bytes, *, name: str | None = None, vm_uuid: str = "vm-1",
                     image: bytes = b"vtpm-image" * 100, block: int = 1 << 20):
    w = repo.begin_checkpoint(vm_uuid, "guest1", name=name)
    with w:
        w.add_stream("memory", (data[i:i + block] for i in range(0, len(data), block)))
        w.add_blob("vtpm-image", image)
        w.set_meta(vtpm_uuid="0d3c-vtpm", manager_checkpoint="mgr-1", slot_hashes=[b"\x01" * 20, b"\x02" * 20],
                   counter=7, save_header={"domid": 5, "vtpms": [{"uuid": "0d3c-vtpm"}]})
        w.commit()
    return w.checkpoint_id


def read_all(repo, checkpoint_id: str, stream: str = "memory") -> bytes:
    with repo.open_checkpoint(checkpoint_id) as r:
        return b"".join(r.stream(stream))


def store_files(state_dir: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for d in ("packs", "manifests") for p in (state_dir / d).iterdir()}
