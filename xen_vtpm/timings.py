"""Where one command's time goes: thread CPU seconds and wall seconds per named stage.

The store and the streams add to it as they work (the C pipelines count their own threads' CPU time
per stage); nothing reads it but ``totals``, which bench/snapshot.py prints as CPU seconds per GiB per
stage.  Adding costs two clock reads, so it is always on.
"""
from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator

_lock = threading.Lock()
_totals: dict[str, list[float]] = {}


def add(stage: str, cpu_s: float, wall_s: float = 0.0) -> None:
    with _lock:
        entry = _totals.setdefault(stage, [0.0, 0.0])
        entry[0] += cpu_s
        entry[1] += wall_s


@contextlib.contextmanager
def stage(name: str) -> Iterator[None]:
    """Count the calling thread's CPU time and the wall time of the block under ``name``."""
    cpu, wall = time.thread_time(), time.perf_counter()
    try:
        yield
    finally:
        add(name, time.thread_time() - cpu, time.perf_counter() - wall)


def totals() -> dict[str, dict[str, float]]:
    """{stage: {"cpu_s": ..., "wall_s": ...}} so far in this process."""
    with _lock:
        return {name: {"cpu_s": cpu, "wall_s": wall} for name, (cpu, wall) in sorted(_totals.items())}
