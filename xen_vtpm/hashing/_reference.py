"""Pure-Python reference versions of the state hashes: slow, short, and the definition the C engine
is tested against byte for byte (docs/formats.md, "State hashing")."""
from __future__ import annotations

import hashlib

from ._spec import DEFAULT_AVG, DEFAULT_LEAF, DEFAULT_MAX, DEFAULT_MIN, Chunk, check_chunk_sizes, check_leaf

_GEAR_LABEL = b"xen-vtpm gear v1"


def _sha(*parts: bytes | bytearray | memoryview) -> bytes:
    h = hashlib.sha256()
    for p in parts:
        h.update(p)
    return h.digest()


def _final(top: bytes, length: int, leaf_size: int) -> bytes:
    return _sha(b"\x02", length.to_bytes(8, "big"), leaf_size.to_bytes(4, "big"), top)


def py_tree_hash(data: bytes | bytearray | memoryview, leaf_size: int = DEFAULT_LEAF) -> bytes:
    """Reference Merkle root, level by level (the C code and PyStreamTreeHash use a stack)."""
    check_leaf(leaf_size)
    data = bytes(data)
    level = [_sha(b"\x00", data[i:i + leaf_size]) for i in range(0, max(len(data), 1), leaf_size)]
    while len(level) > 1:
        nxt = [_sha(b"\x01", level[i], level[i + 1]) for i in range(0, len(level) - 1, 2)]
        if len(level) % 2:
            nxt.append(level[-1])     # an odd node moves up unchanged
        level = nxt
    return _final(level[0], len(data), leaf_size)


class PyStreamTreeHash:
    """Reference streaming Merkle root: a stack of perfect subtrees, folded right to left at the end."""

    def __init__(self, leaf_size: int = DEFAULT_LEAF) -> None:
        self._leaf = check_leaf(leaf_size)
        self._pending = bytearray()
        self._stack: list[tuple[bytes, int]] = []
        self._length = 0
        self._root: bytes | None = None

    def _push(self, h: bytes) -> None:
        size = 1
        while self._stack and self._stack[-1][1] == size:
            left, _ = self._stack.pop()
            h, size = _sha(b"\x01", left, h), size * 2
        self._stack.append((h, size))

    def update(self, data: bytes | bytearray | memoryview) -> None:
        if self._root is not None:
            raise ValueError("PyStreamTreeHash: already finished; start a new one")
        self._pending += data
        self._length += len(data)
        while len(self._pending) >= self._leaf:
            self._push(_sha(b"\x00", self._pending[:self._leaf]))
            del self._pending[:self._leaf]

    def digest(self) -> bytes:
        if self._root is None:
            if self._pending or not self._length:
                self._push(_sha(b"\x00", self._pending))
            acc = self._stack[-1][0]
            for h, _ in reversed(self._stack[:-1]):
                acc = _sha(b"\x01", h, acc)
            self._root = _final(acc, self._length, self._leaf)
        return self._root


def gear_table() -> list[int]:
    """The chunker's 256 gear values: first 8 bytes (little-endian) of SHA-256(label || i)."""
    return [int.from_bytes(_sha(_GEAR_LABEL, bytes([i]))[:8], "little") for i in range(256)]


def _top_bits(n: int) -> int:
    return ((1 << n) - 1) << (64 - n)


class PyChunker:
    """Reference content-defined chunker; same API and results as Chunker."""

    def __init__(self, min_size: int = DEFAULT_MIN, avg_size: int = DEFAULT_AVG,
                 max_size: int = DEFAULT_MAX) -> None:
        check_chunk_sizes(min_size, avg_size, max_size)
        self.min, self.avg, self.max = min_size, avg_size, max_size
        bits = avg_size.bit_length() - 1
        self._mask_s = _top_bits(bits + 2)
        self._mask_l = _top_bits(bits - 2)
        self._gear = gear_table()
        self._buf = bytearray()
        self._offset = 0
        self._finished = False

    def cut(self, data: bytes | bytearray, final: bool = False) -> int:
        """Length of the chunk at the start of ``data`` (0 if more data is needed to decide)."""
        n = len(data)
        if n < self.max and not final:
            return 0
        if n <= self.min:
            return n
        end = min(n, self.max)
        normal = min(self.avg, end)
        h, gear, m64 = 0, self._gear, (1 << 64) - 1
        for i in range(self.min, end):
            h = ((h << 1) + gear[data[i]]) & m64
            if not h & (self._mask_s if i < normal else self._mask_l):
                return i + 1
        return end

    def _emit(self, final: bool) -> list[Chunk]:
        out = []
        while self._buf:
            n = self.cut(self._buf, final)
            if not n:
                break
            data = bytes(self._buf[:n])
            del self._buf[:n]
            out.append(Chunk(self._offset, n, _sha(data), data))
            self._offset += n
        return out

    def feed(self, data: bytes | bytearray | memoryview) -> list[Chunk]:
        if self._finished:
            raise ValueError("PyChunker: already finished; start a new one")
        self._buf += data
        return self._emit(False)

    def finish(self) -> list[Chunk]:
        if self._finished:
            raise ValueError("PyChunker: already finished; start a new one")
        self._finished = True
        return self._emit(True)
