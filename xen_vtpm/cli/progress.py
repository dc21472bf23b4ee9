"""Progress bars for long steps: drawn on a terminal, silent when piped, -q or --json."""
from __future__ import annotations

import sys
import time
from typing import TextIO


class Progress:
    def __init__(self, label: str, total: int | None = None, *, enabled: bool | None = None,
                 stream: TextIO | None = None) -> None:
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty() if enabled is None else enabled
        self.label, self.total, self.done = label, total, 0
        self._last = 0.0

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.monotonic()
        if self.enabled and now - self._last >= 0.1:
            self._last = now
            self._draw()

    def _draw(self, final: bool = False) -> None:
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 30)
            text = f"\r{self.label:<28} [{bar:<30}] {frac * 100:5.1f}%"
        else:
            text = f"\r{self.label:<28} {self.done}"
        self.stream.write(text + ("\n" if final else ""))
        self.stream.flush()

    def close(self) -> None:
        if self.enabled:
            if self.total:
                self.done = self.total
            self._draw(final=True)

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NullProgress(Progress):
    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__("", enabled=False)
