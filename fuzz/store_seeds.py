"""Real checkpoint-store artifacts for the store fuzz targets, written by the store itself."""
from __future__ import annotations

import functools
import random
import shutil
import tempfile
from pathlib import Path

from xen_vtpm.host.keys import derive_keys
from xen_vtpm.store import Repository
from xen_vtpm.store.manifest import MAC_SIZE

KEYS = derive_keys(bytes(range(32)))
# Tiny chunks and packs, so a few KiB of input give many chunks, several packs and short seeds.
CHUNK_SIZES = (64, 256, 1024)
PACK_TARGET = 2048


@functools.lru_cache(maxsize=1)
def artifacts() -> tuple[list[bytes], dict[str, bytes]]:
    """(manifest bodies without their MAC, {pack name: pack bytes}) of three committed checkpoints."""
    rnd = random.Random(7)
    state = Path(tempfile.mkdtemp(prefix="xvfuzz-store-"))
    try:
        with Repository(state, KEYS, pack_target=PACK_TARGET, chunk_sizes=CHUNK_SIZES) as repo:
            memory = rnd.randbytes(3000)
            # Metadata is opaque to the store: none, JSON like the coordinator's, raw bytes.
            for i, (mem, metadata) in enumerate(((memory, b""),
                                                 (memory[:1500] + bytes(1500), b'{"kind":"snapshot","note":"\\u00e9"}'),
                                                 (b"", rnd.randbytes(40)))):
                with repo.begin_checkpoint("6f2c1a8e-3b0d-4c4e-9a57-1d2e3f405162", "guest1",
                                           name=f"snap{i}") as w:
                    w.add_stream("memory", [mem])
                    w.add_blob("vtpm-image", rnd.randbytes(300))
                    w.set_metadata(metadata)
                    w.commit()
        manifests = [p.read_bytes()[:-MAC_SIZE] for p in sorted((state / "manifests").glob("*.manifest"))]
        packs = {p.name.removesuffix(".pack"): p.read_bytes() for p in sorted((state / "packs").glob("*.pack"))}
    finally:
        shutil.rmtree(state, ignore_errors=True)
    return manifests, packs
