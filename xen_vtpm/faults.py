"""Named points where a test can stop or disturb the tool; with no hook installed they do nothing.

The coordinator's journal passes ``<kind>:<step>`` right after a step is journaled and before its
side effect (the window ``recover`` must handle), and ``<kind>:begin`` right after an operation is
journaled, before its first step; the store passes ``store:<point>`` at its own
commit points.  Only test code installs a hook (tests/faulty_tool.py runs the CLI with one):
production code reads no environment variable or file to decide whether to fail.
"""
from __future__ import annotations

from collections.abc import Callable

_hook: Callable[[str], None] | None = None


def install(hook: Callable[[str], None] | None) -> None:
    """Call ``hook(name)`` at every point from now on (None removes it)."""
    global _hook
    _hook = hook


def reached(name: str) -> None:
    if _hook is not None:
        _hook(name)
