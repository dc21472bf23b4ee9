"""The parameters and the chunk record of docs/formats.md, "State hashing", shared by the C engine's
Python face and the pure-Python reference so both accept and refuse exactly the same inputs."""
from __future__ import annotations

from typing import Any, NamedTuple, Protocol

DEFAULT_LEAF = 1 << 20
DEFAULT_MIN, DEFAULT_AVG, DEFAULT_MAX = 16 << 10, 64 << 10, 256 << 10
LEAF_MIN, LEAF_MAX = 64, 64 << 20


class Readable(Protocol):
    """A binary source read straight into a buffer: a raw or buffered file object, a pipe or fifo."""
    def readinto(self, buffer: Any, /) -> int | None: ...


class Chunk(NamedTuple):
    offset: int        # stream offset of the first byte
    length: int
    digest: bytes      # SHA-256 of data
    data: bytes


def check_leaf(leaf_size: int) -> int:
    if (not isinstance(leaf_size, int) or leaf_size < LEAF_MIN or leaf_size > LEAF_MAX
            or leaf_size & (leaf_size - 1)):
        raise ValueError(f"leaf size {leaf_size!r}: must be a power of two from {LEAF_MIN} to {LEAF_MAX}; "
                         f"use the default {DEFAULT_LEAF}")
    return leaf_size


def check_chunk_sizes(min_size: int, avg_size: int, max_size: int) -> None:
    ok = all(isinstance(v, int) for v in (min_size, avg_size, max_size))
    ok = ok and 64 <= min_size < avg_size < max_size <= LEAF_MAX
    ok = ok and avg_size >= 256 and not avg_size & (avg_size - 1)
    if not ok:
        raise ValueError(f"chunk sizes min={min_size!r} avg={avg_size!r} max={max_size!r}: need "
                         f"64 <= min < avg < max <= {LEAF_MAX} with avg a power of two >= 256; "
                         f"use the defaults {DEFAULT_MIN}/{DEFAULT_AVG}/{DEFAULT_MAX}")
