"""`xl save` / `xl restore` wired to the checkpoint store through fifos: no temporary full image.

The store reads the save stream as xl writes it (and feeds xl restore as it reads),
so a snapshot makes one pass over guest memory.
"""
from __future__ import annotations

import contextlib
import os
import secrets
import threading
from pathlib import Path
from typing import Any, Callable, Iterator

from . import hashing
from .config import Config
from .errors import XlError
from .xl import SaveHeader, Xl, read_save_header


class XlStreams:
    """`xl save`/`xl restore` wired to the store through fifos: no temporary full image."""

    def __init__(self, cfg: Config, xl: Xl, store: Any, progress: Callable[..., Any] | None) -> None:
        self.cfg, self.xl, self.store, self.progress = cfg, xl, store, progress
        self.tmp = Path(cfg.state_dir) / "tmp"

    @contextlib.contextmanager
    def _fifo(self) -> Iterator[Path]:
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        path = self.tmp / f"{secrets.token_hex(8)}.fifo"
        os.mkfifo(path, 0o600)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    @staticmethod
    def _unblock(path: Path, for_reader: bool) -> None:
        """xl died before opening its end: open it ourselves so our blocked open() returns."""
        with contextlib.suppress(OSError):
            fd = os.open(path, (os.O_WRONLY if for_reader else os.O_RDONLY) | os.O_NONBLOCK)
            os.close(fd)

    def save_to(self, guest: str, writer: Any, *, leave_paused: bool) -> dict:
        with self._fifo() as fifo:
            result: dict[str, Any] = {}

            def run_xl() -> None:
                try:
                    self.xl.save(guest, str(fifo), leave_paused=leave_paused)
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    result["error"] = exc
                    self._unblock(fifo, for_reader=True)

            t = threading.Thread(target=run_xl, name="xl-save", daemon=True)
            t.start()
            try:
                with open(fifo, "rb", buffering=0) as fh:
                    with self._bar("snapshot: guest memory") as bar:
                        record = writer.add_stream("memory", fh, progress=bar)
            finally:
                t.join()
            if "error" in result:
                raise result["error"]
            return {"bytes": record.length}

    def restore_from(self, checkpoint_id: str, guest: str, *, paused: bool) -> None:
        with self._fifo() as fifo:
            result: dict[str, Any] = {}

            def feed() -> None:
                try:
                    with self.store.repo.open_checkpoint(checkpoint_id) as reader, open(fifo, "wb") as out:
                        with self._bar("rollback: guest memory", reader.manifest) as bar:
                            for block in reader.stream("memory", progress=bar):
                                out.write(block)
                except BrokenPipeError:
                    result["error"] = XlError(f"{guest}: xl restore stopped reading the stream early")
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    result["error"] = exc

            t = threading.Thread(target=feed, name="store-feed", daemon=True)
            t.start()
            try:
                self.xl.restore(str(fifo), paused=paused)
            except BaseException:
                self._unblock(fifo, for_reader=False)
                t.join()
                raise
            t.join()
            if "error" in result:
                raise result["error"]

    def save_to_file(self, guest: str, path: str) -> str:
        self.xl.save(guest, path, leave_paused=True)
        return self.digest(path)

    @staticmethod
    def read_header(path: str) -> SaveHeader:
        return read_save_header(path)

    @staticmethod
    def digest(path: str) -> str:
        return hashing.tree_hash(path).hex()

    @contextlib.contextmanager
    def _bar(self, label: str, manifest: Any = None) -> Iterator[Callable[[int], None] | None]:
        if self.progress is None:
            yield None
            return
        total = None
        if manifest is not None:
            total = next((s.length for s in manifest.streams if s.name == "memory"), None)
        bar = self.progress(label, total)
        try:
            yield bar.update
        finally:
            bar.close()
