"""Shared helpers of the store tests (no tests here)."""
from __future__ import annotations

import random
from pathlib import Path

from xen_vtpm.host.keys import derive_keys
from xen_vtpm.store import Repository

KEYS = derive_keys(b"k" * 32)
OTHER_KEYS = derive_keys(b"o" * 32)
# The caller's metadata is opaque to the store: not text, not JSON.
METADATA = b'{"vtpm_uuid":"0d3c-vtpm"}\x00\xff\xfe' + bytes(range(256))


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


def rewrite_pages(data: bytes, fraction: float, seed: int, page: int = 4096) -> bytes:
    """Rewrite ``fraction`` of the 4 KiB pages, chosen one by one anywhere in the image."""
    rnd = random.Random(seed)
    out = bytearray(data)
    pages = len(out) // page
    for p in rnd.sample(range(pages), int(pages * fraction)):
        out[p * page:(p + 1) * page] = rnd.randbytes(page)
    return bytes(out)


def open_repo(state_dir: Path, **kw) -> Repository:
    return Repository(state_dir, KEYS, **kw)


def write_checkpoint(repo, data: bytes, *, name: str | None = None, vm_uuid: str = "vm-1",
                     image: bytes = b"vtpm-image" * 100, block: int = 1 << 20):
    w = repo.begin_checkpoint(vm_uuid, "guest1", name=name)
    with w:
        w.add_stream("memory", (data[i:i + block] for i in range(0, len(data), block)))
        w.add_blob("vtpm-image", image)
        w.set_metadata(METADATA)
        w.commit()
    return w.checkpoint_id


def read_all(repo, checkpoint_id: str, stream: str = "memory") -> bytes:
    with repo.open_checkpoint(checkpoint_id) as r:
        return b"".join(r.stream(stream))


def store_files(state_dir: Path) -> set[str]:
    return {f"{p.parent.name}/{p.name}" for d in ("packs", "manifests") for p in (state_dir / d).iterdir()}
