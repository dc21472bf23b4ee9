"""`xl save` / `xl restore` wired to the checkpoint store, with no plaintext image on disk.

Snapshot: `xl save` writes into a spool the store ingests from.  When the image fits the RAM
budget the spool is an unnamed memory file `xl save` writes directly (the pause then costs what
a bare `xl save` costs); otherwise `xl save` writes a fifo and a thread tees it, encrypted, into
an unnamed file on disk, which the store reads as it grows.  ``start_save`` returns as soon as
`xl save` has finished, so the guest's pause never waits for ingestion; the caller waits for
it (``SaveIngest.wait``) before committing.  Rollback: the store checks the checkpoint once, writing
the guest memory it checked into an image spool (``image_spool``), and `xl restore` reads that copy:
straight from an unnamed memory file when it fits the RAM budget, else through a fifo from an
encrypted nameless file.
"""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import io
import os
import resource
import secrets
import threading
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from xen_vtpm import hashing
from xen_vtpm.config import Config
from xen_vtpm.durable import storage_error
from xen_vtpm.errors import StorageError, XlError

from .savefile import SaveHeader, read_save_header
from .xl import Xl

_BLOCK = 1 << 20             # fits in L2: the tee's read, encrypt and write stay in cache
_PIPE_SIZE = 1 << 20          # fewer wake-ups per GiB than the default 64 KiB pipe
_F_SETPIPE_SZ = 1031
_SPOOL_SUFFIX = ".spool"
_LOW_PRIORITY = 19
_FOLLOW_S = 0.01              # how often ingestion learns how far `xl save` has written into memory


_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_FALLOC_FL_KEEP_SIZE, _FALLOC_FL_PUNCH_HOLE = 0x01, 0x02


def _punch_hole(fd: int, offset: int, length: int) -> bool:
    """Drop a consumed range of the spool: its pages are freed, dirty or not, and never written back."""
    return _libc.fallocate(fd, _FALLOC_FL_KEEP_SIZE | _FALLOC_FL_PUNCH_HOLE, offset, length) == 0


def _nameless_file(directory: Path) -> int:
    """A 0600 file with no name (O_TMPFILE): it disappears with its last descriptor, crash included."""
    try:
        return os.open(directory, os.O_TMPFILE | os.O_RDWR, 0o600)
    except OSError as exc:
        if exc.errno not in (errno.EOPNOTSUPP, errno.EISDIR, errno.EINVAL):
            raise storage_error(exc, directory, "creating the snapshot spool") from None
    # A file system without O_TMPFILE: a named file unlinked at once; a crash between the two
    # calls leaves a *.spool that XlStreams.sweep_spools removes (its key died with the process).
    path = directory / f"{secrets.token_hex(8)}{_SPOOL_SUFFIX}"
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise storage_error(exc, path, "creating the snapshot spool") from None
    with contextlib.suppress(FileNotFoundError):   # a concurrent sweep may have beaten us to it
        path.unlink()
    return fd


class _Spool:
    """A file one side appends to while the store reads behind it; consumed ranges are punched out,
    so a spool the store keeps up with costs neither space nor write-back."""

    def __init__(self, fd: int, where: str) -> None:
        self._fd: int | None = fd
        self._where = where
        self._cond = threading.Condition()
        self._size = 0
        self._ended = False        # the writer stopped: at EOF (``_complete``) or on an error
        self._complete = False
        self._cancelled = False
        self._pos = 0              # the reader's: what it has consumed
        self._punch = True         # until the file system refuses a hole

    def _read_at(self, view: memoryview, pos: int) -> int:
        """Read what the file holds at ``pos`` as plaintext into ``view``."""
        assert self._fd is not None
        try:
            return os.preadv(self._fd, [view], pos)
        except OSError as exc:
            raise storage_error(exc, Path(self._where), "reading the snapshot spool") from None

    def readinto(self, buffer: Any) -> int:
        """Up to ``len(buffer)`` bytes of the plaintext as they arrive, 0 at the end; what was read is
        punched out of the spool.  The store's feeding thread reads straight into its ring."""
        view = memoryview(buffer).cast("B")
        with self._cond:
            while self._pos == self._size and not self._ended and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise XlError("snapshot cancelled while the store was ingesting the guest memory")
            size = self._size
        if self._pos == size:
            if not self._complete:
                raise XlError("the guest memory stream from `xl save` broke off; see the error above")
            return 0
        assert self._fd is not None
        n = self._read_at(view[:min(size - self._pos, len(view))], self._pos)
        if n <= 0:
            raise XlError(f"{self._where}: the snapshot spool is shorter than what was written to it")
        self._punch = self._punch and _punch_hole(self._fd, self._pos, n)
        self._pos += n
        return n

    def blocks(self) -> Iterator[bytes | memoryview[int]]:
        """The plaintext, block by block, as it arrives; each block is valid until the next."""
        buf = bytearray(_BLOCK)
        while n := self.readinto(buf):
            yield memoryview(buf)[:n]

    def _grew(self, size: int, *, ended: bool = False, complete: bool = False) -> None:
        with self._cond:
            self._size = size
            self._ended, self._complete = ended, complete
            self._cond.notify_all()

    def cancel(self) -> None:
        with self._cond:
            self._cancelled = True
            self._cond.notify_all()

    def close(self) -> None:
        """Frees the file (it has no name); only once no thread uses it."""
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


class _MemorySpool(_Spool):
    """The image in RAM: `xl save` writes straight into an unnamed memory file, so the guest's pause
    costs what a bare `xl save` to a file costs, and no byte of the image touches a disk."""

    def __init__(self) -> None:
        fd = os.memfd_create("xen-vtpm-spool", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        # Never shorter than it was: the store maps it and reads it in place while xl writes.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        super().__init__(fd, "the in-memory snapshot spool")

    def fileno(self) -> int:
        assert self._fd is not None
        return self._fd

    def wait_beyond(self, size: int) -> tuple[int, bool]:
        """Until `xl save` has written more than ``size`` bytes, or finished: (bytes written, finished).
        The store maps the file and reads those bytes in place, and gives back (punches out) the
        ranges it is done with."""
        with self._cond:
            while self._size <= size and not self._ended and not self._cancelled:
                self._cond.wait()
            if self._cancelled:
                raise XlError("snapshot cancelled while the store was ingesting the guest memory")
            if self._ended and not self._complete:
                raise XlError("the guest memory stream from `xl save` broke off; see the error above")
            return self._size, self._ended

    @property
    def path(self) -> str:
        """A name `xl save` can open (our descriptor, reopened through /proc)."""
        return f"/proc/{os.getpid()}/fd/{self._fd}"

    def check_within_file_size_limit(self) -> None:
        """`xl save` inherits our RLIMIT_FSIZE, and the spool is our storage: a spool that reached the
        limit is a storage failure (exit 10), whatever words `xl` found for it."""
        limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
        if self._fd is not None and limit != resource.RLIM_INFINITY and os.fstat(self._fd).st_size >= limit:
            raise StorageError(f"{self._where}: the guest memory reached the file-size limit ({limit} bytes, "
                               "RLIMIT_FSIZE) of this process; raise the limit (`ulimit -f`) and retry")

    @property
    def size(self) -> int:
        return self._size

    def follow(self, done: threading.Event) -> None:
        """While `xl save` writes (until ``done``), let the store read what it has written so far:
        xl writes its stream in order and the file's size only covers bytes already copied in, so
        ingestion overlaps the save (at the lowest priority, on the core xl leaves free)."""
        while not done.wait(_FOLLOW_S):
            size = os.fstat(self._fd).st_size if self._fd is not None else 0
            if size > self._size:
                self._grew(size)

    @property
    def fd(self) -> int:
        assert self._fd is not None
        return self._fd

    def written(self) -> None:
        """`xl save` returned: the store may read all it wrote."""
        assert self._fd is not None
        self._grew(os.fstat(self._fd).st_size, ended=True, complete=True)


class _DiskSpool(_Spool):
    """A nameless file on disk fed from the `xl save` fifo, encrypted with a key that exists only in
    this process (AES-256-CTR; the file is private and short-lived, so secrecy is what it needs),
    so no guest memory rests on disk in the clear."""

    def __init__(self, directory: Path) -> None:
        super().__init__(_nameless_file(directory), str(directory))
        key, nonce = os.urandom(32), os.urandom(16)
        self._enc = Cipher(algorithms.AES(key), modes.CTR(nonce)).encryptor()
        self._dec = Cipher(algorithms.AES(key), modes.CTR(nonce)).decryptor()
        self._scratch, self._out = bytearray(_BLOCK), bytearray(_BLOCK + 15)

    def fill(self, source: io.RawIOBase) -> int:
        """Append ``source`` to EOF; returns the byte count."""
        buf, out = bytearray(_BLOCK), bytearray(_BLOCK + 15)
        view, out_view = memoryview(buf), memoryview(out)
        size, complete = 0, False
        try:
            while not self._cancelled:
                n = source.readinto(buf)
                if not n:
                    complete = True
                    break
                self._enc.update_into(view[:n], out)
                self._write_all(out_view[:n])
                size += n
                self._grew(size)
        finally:
            self._grew(size, ended=True, complete=complete)
        return size

    def _write_all(self, data: memoryview) -> None:
        assert self._fd is not None
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except OSError as exc:
                raise storage_error(exc, Path(self._where), "writing the snapshot spool") from None

    def _read_at(self, view: memoryview, pos: int) -> int:
        """Decrypt what the file holds at ``pos`` into ``view`` (the keystream runs on in read order)."""
        scratch = memoryview(self._scratch)[:min(len(view), _BLOCK)]
        n = super()._read_at(scratch, pos)
        out = self._out
        self._dec.update_into(scratch[:n], out)
        view[:n] = memoryview(out)[:n]
        return n


class _BlockSource(io.RawIOBase):
    """An iterable of blocks as the readable stream ``_DiskSpool.fill`` takes."""

    def __init__(self, blocks: Iterable[bytes | memoryview[int]]) -> None:
        self._it, self._rest = iter(blocks), memoryview(b"")

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        while not self._rest:
            block = next(self._it, None)
            if block is None:
                return 0
            self._rest = memoryview(block).cast("B")
        n = min(len(buf), len(self._rest))
        buf[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        return n


class Spooled:
    """A guest memory image held for a move: in RAM when it fits, else in an encrypted nameless file
    (``XlStreams.spool_save`` on the source, ``XlStreams.spool`` on the destination).  Read once:
    what ``blocks`` has yielded is freed behind it."""

    def __init__(self, spool: _Spool) -> None:
        self._spool = spool

    @property
    def size(self) -> int:
        return self._spool._size

    def blocks(self) -> Iterator[bytes | memoryview[int]]:
        return self._spool.blocks()

    def close(self) -> None:
        self._spool.cancel()
        self._spool.close()


def _restore_priority() -> None:
    """Give the threads ``SaveIngest`` lowered the process's priority back.  Raising a priority
    needs CAP_SYS_NICE: without it ingestion finishes at the low one."""
    base = os.getpriority(os.PRIO_PROCESS, 0)
    if base >= _LOW_PRIORITY:
        return
    with contextlib.suppress(FileNotFoundError):
        for tid in map(int, os.listdir("/proc/self/task")):
            with contextlib.suppress(OSError):   # the thread may have ended meanwhile
                if os.getpriority(os.PRIO_PROCESS, tid) == _LOW_PRIORITY:
                    os.setpriority(os.PRIO_PROCESS, tid, base)


class SaveIngest:
    """The store's side of a snapshot's memory stream, still running after `xl save` returned.

    Call ``wait()`` before committing the writer, or ``cancel()`` (then abort the writer) on any
    failure; both free the spool and may be called more than once."""

    def __init__(self, spool: _Spool, writer: Any, bar: Any) -> None:
        self._spool, self._bar = spool, bar
        self._outcome: dict[str, Any] = {}
        self._thread = threading.Thread(target=self._run, args=(writer,), name="store-ingest", daemon=True)
        self._thread.start()

    def _run(self, writer: Any) -> None:
        # While the guest is paused, `xl save` and the tee must win the cores: this thread and the
        # workers it starts (they inherit it) run at the lowest priority until ``wait`` (measured at
        # 1 GiB on 2 cores: pause 1.1 s this way, 1.7 s at equal priority).
        with contextlib.suppress(OSError):
            if os.getpriority(os.PRIO_PROCESS, 0) < _LOW_PRIORITY:
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), _LOW_PRIORITY)
        try:
            record = writer.add_stream("memory", self._spool,
                                       progress=self._bar.update if self._bar is not None else None)
            self._outcome["bytes"] = record.length
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            self._outcome["error"] = exc

    def wait(self) -> dict:
        """Block until the whole stream is in the writer; raises what ingestion raised.
        Call it once the guest runs again: ingestion then gets its normal CPU share back."""
        _restore_priority()
        self._end()
        if "error" in self._outcome:
            raise self._outcome["error"]
        return {"bytes": self._outcome["bytes"]}

    def cancel(self) -> None:
        self._spool.cancel()
        self._end()

    def _end(self) -> None:
        self._thread.join()
        self._spool.close()
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class Image(Protocol):
    """A checkpoint's guest memory, checked: written at stream offsets of ``fd``; on disk its bytes are
    AES-256-CTR under ``ctr = (key, counter block of offset 0)``, a key that exists only in this process."""
    @property
    def fd(self) -> int: ...
    @property
    def ctr(self) -> tuple[bytes, bytes] | None: ...


@dataclasses.dataclass(frozen=True)
class ImageSpool:
    """Where a rollback's check of a checkpoint writes the guest memory it checked (an ``Image``), and
    what `xl restore` reads afterwards."""
    fd: int
    ctr: tuple[bytes, bytes] | None


def _image_blocks(image: Image, where: str) -> Iterator[bytes]:
    """The plaintext from offset 0 (for the disk kind: decrypted)."""
    dec = Cipher(algorithms.AES(image.ctr[0]), modes.CTR(image.ctr[1])).decryptor() if image.ctr else None
    pos = 0
    while True:
        try:
            block = os.pread(image.fd, _BLOCK, pos)
        except OSError as exc:
            raise storage_error(exc, Path(where), "reading the image spool") from None
        if not block:
            return
        pos += len(block)
        yield dec.update(block) if dec is not None else block


class XlStreams:
    """`xl save`/`xl restore` wired to the store; the only file is the encrypted, nameless spool."""

    def __init__(self, cfg: Config, xl: Xl, progress: Callable[[str, int | None], Any] | None) -> None:
        self.cfg, self.xl, self.progress = cfg, xl, progress
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

    @staticmethod
    def _grow_pipe(fh: Any) -> None:
        with contextlib.suppress(OSError):   # above pipe-max-size for an unprivileged user: keep the default
            fcntl.fcntl(fh.fileno(), _F_SETPIPE_SZ, _PIPE_SIZE)

    def sweep_spools(self) -> int:
        """Remove spools a crash left under a name (only on file systems without O_TMPFILE).
        Safe beside live snapshots: a spool's owner reads and writes it through its descriptor."""
        removed = 0
        with contextlib.suppress(FileNotFoundError):
            for path in self.tmp.glob(f"*{_SPOOL_SUFFIX}"):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                    removed += 1
        return removed

    def start_save(self, guest: str, writer: Any, *, leave_paused: bool, expected_bytes: int = 0) -> SaveIngest:
        """Run `xl save` into a spool and return once it has finished; the store keeps ingesting.

        The spool is in RAM when an image of ``expected_bytes`` fits the budget (`spool_ram_mib`),
        else an encrypted file on disk fed through a fifo (bounded memory, slower pause)."""
        self.sweep_spools()
        if self._fits(expected_bytes):
            return self._save_to_memory(guest, writer, leave_paused)
        with self._fifo() as fifo:
            spool = _DiskSpool(self.tmp)
            # The image is about the guest's memory: a bar with that total, not just a byte count.
            ingest = SaveIngest(spool, writer, self._open_bar("snapshot: guest memory", expected_bytes or None))
            try:
                self._save_into(guest, fifo, spool, leave_paused)
            except BaseException:
                ingest.cancel()
                raise
            return ingest

    def _fits(self, expected_bytes: int) -> bool:
        return 0 < expected_bytes and expected_bytes + (expected_bytes >> 6) + (16 << 20) <= self._ram_budget()

    def spool_save(self, guest: str, expected_bytes: int) -> Spooled:
        """`xl save -p` into a spool: the guest stays suspended and paused, its image is held here."""
        self.sweep_spools()
        if self._fits(expected_bytes):
            memory = _MemorySpool()
            try:
                self.xl.save(guest, memory.path, leave_paused=True)
            except XlError:
                try:
                    memory.check_within_file_size_limit()
                finally:
                    memory.close()
                raise
            except BaseException:
                memory.close()
                raise
            memory.written()
            return Spooled(memory)
        with self._fifo() as fifo:
            disk = _DiskSpool(self.tmp)
            try:
                self._save_into(guest, fifo, disk, leave_paused=True)
            except BaseException:
                disk.close()
                raise
            return Spooled(disk)

    def spool(self, blocks: Iterable[bytes | memoryview[int]], expected_bytes: int) -> Spooled:
        """Hold an image that arrives as blocks (a move's destination) until it is restored."""
        self.sweep_spools()
        if self._fits(expected_bytes):
            memory = _MemorySpool()
            try:
                for block in blocks:
                    view = memoryview(block)
                    while view:
                        view = view[os.write(memory.fd, view):]
            except OSError as exc:
                memory.close()
                raise storage_error(exc, Path(memory.path), "holding the incoming guest memory") from None
            except BaseException:
                memory.close()
                raise
            memory.written()
            return Spooled(memory)
        self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
        disk = _DiskSpool(self.tmp)
        try:
            disk.fill(_BlockSource(blocks))
        except BaseException:
            disk.close()
            raise
        return Spooled(disk)

    def _ram_budget(self) -> int:
        """Bytes of RAM a spool may take: `spool_ram_mib`, or by default half of what is available."""
        if self.cfg.spool_ram_mib >= 0:
            return self.cfg.spool_ram_mib << 20
        with contextlib.suppress(OSError, ValueError, StopIteration):
            with open("/proc/meminfo", encoding="ascii") as fh:
                kib = next(int(line.split()[1]) for line in fh if line.startswith("MemAvailable:"))
            return (kib << 10) // 2
        return 0

    def _save_to_memory(self, guest: str, writer: Any, leave_paused: bool) -> SaveIngest:
        spool = _MemorySpool()
        bar = self._open_bar("snapshot: guest memory")
        ingest = SaveIngest(spool, writer, bar)
        saved = threading.Event()
        follower = threading.Thread(target=spool.follow, args=(saved,), name="spool-follow", daemon=True)
        follower.start()
        try:
            try:
                self.xl.save(guest, spool.path, leave_paused=leave_paused)
            finally:
                saved.set()
                follower.join()
        except XlError:
            try:
                spool.check_within_file_size_limit()
            finally:
                ingest.cancel()
            raise
        except BaseException:
            ingest.cancel()
            raise
        spool.written()
        if bar is not None:
            bar.total = spool.size   # known exactly once `xl save` returned
        return ingest

    def _save_into(self, guest: str, fifo: Path, spool: _DiskSpool, leave_paused: bool) -> None:
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
                self._grow_pipe(fh)
                spool.fill(fh)
        finally:
            t.join()
        if "error" in result:
            raise result["error"]

    @contextlib.contextmanager
    def image_spool(self, expected_bytes: int) -> Iterator[ImageSpool]:
        """A spool for a checkpoint's guest memory of about ``expected_bytes``: an unnamed memory file when
        it fits the RAM budget (`spool_ram_mib`), else an encrypted nameless file.  Freed on exit."""
        self.sweep_spools()
        if expected_bytes + (expected_bytes >> 6) + (16 << 20) <= self._ram_budget():
            spool = ImageSpool(os.memfd_create("xen-vtpm-image", os.MFD_CLOEXEC), None)
        else:
            self.tmp.mkdir(mode=0o700, parents=True, exist_ok=True)
            spool = ImageSpool(_nameless_file(self.tmp), (os.urandom(32), os.urandom(16)))
        try:
            yield spool
        finally:
            os.close(spool.fd)

    def restore_image(self, guest: str, image: Image, *, paused: bool) -> None:
        """`xl restore` of a checked image: read in place when it is in memory (the cost of a bare
        restore), else decrypted into a fifo."""
        if image.ctr is None:
            self.xl.restore(f"/proc/{os.getpid()}/fd/{image.fd}", paused=paused)
        else:
            self._restore_through_fifo(guest, _image_blocks(image, str(self.tmp)), os.fstat(image.fd).st_size,
                                       paused=paused)

    def restore_from(self, guest: str, blocks: Iterable[bytes | memoryview[int]], total: int | None, *,
                     paused: bool) -> None:
        """Feed the image ``blocks`` yields (a checkpoint already verified, or a moved guest's memory)
        into `xl restore` through a fifo."""
        self._restore_through_fifo(guest, iter(blocks), total, paused=paused)

    def _restore_through_fifo(self, guest: str, blocks: Iterator[bytes | memoryview[int]], total: int | None, *,
                              paused: bool) -> None:
        with self._fifo() as fifo:
            result: dict[str, Any] = {}

            def feed() -> None:
                bar = self._open_bar("rollback: guest memory", total)
                try:
                    with open(fifo, "wb", buffering=_PIPE_SIZE) as out:
                        self._grow_pipe(out)
                        for block in blocks:
                            out.write(block)
                            if bar is not None:
                                bar.update(len(block))
                except BrokenPipeError:
                    result["error"] = XlError(f"{guest}: xl restore stopped reading the stream early")
                except BaseException as exc:  # noqa: BLE001 - handed to the main thread
                    result["error"] = exc
                finally:
                    close = getattr(blocks, "close", None)
                    if close is not None:
                        close()
                    if bar is not None:
                        bar.close()

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

    def _open_bar(self, label: str, total: int | None = None) -> Any:
        return None if self.progress is None else self.progress(label, total)
