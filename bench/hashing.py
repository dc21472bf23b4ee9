"""State-hashing benchmark: one table, every method measured side by side in one run.

    .venv/bin/python bench/hashing.py [--mib 1024] [--reps 3]

Sections: a cached file and an in-memory buffer (tree_hash vs hashlib.sha256, sha256sum, openssl dgst,
blake3 on 1 and all threads); a real pipe fed by a writer process (chunking + per-chunk SHA-256 vs
hashlib on the same bytes); the dedup check; peak memory of a subprocess for two input sizes; per-call
overhead for small blobs.  Throughput is decimal GB/s (1e9 B/s), median [min-max] of the reps, and runs
of different methods are interleaved so a noisy neighbour hits them alike.
"""
from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable

import blake3

from xen_vtpm import hashing as H

MiB = 1 << 20


def random_bytes(n: int, seed: int) -> bytes:
    rng = random.Random(seed)
    return b"".join(rng.randbytes(min(32 * MiB, n - i)) for i in range(0, n, 32 * MiB))


def _median(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} [{min(xs):.2f}–{max(xs):.2f}]"


class Table:
    def __init__(self) -> None:
        self.rows: list[tuple[str, str, str, str, str]] = []

    def add(self, section: str, method: str, value: str, ratio: str = "", cpu: str = "") -> None:
        self.rows.append((section, method, value, ratio, cpu))

    def render(self) -> str:
        head = ("Input", "Method", "GB/s median [min–max] / result", "vs hashlib.sha256", "CPU s per GB")
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        return "\n".join(lines)


def _cpu() -> float:
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


CPU: dict[str, list[float]] = {}


def measure(methods: dict[str, Callable[[], object]], nbytes: int, reps: int) -> dict[str, list[float]]:
    """GB/s of each method, the methods interleaved rep by rep; CPU seconds per GB go to CPU."""
    speeds: dict[str, list[float]] = {name: [] for name in methods}
    for _ in range(reps):
        for name, fn in methods.items():
            c0, t0 = _cpu(), time.perf_counter()
            fn()
            t1, c1 = time.perf_counter(), _cpu()
            speeds[name].append(nbytes / (t1 - t0) / 1e9)
            CPU.setdefault(name, []).append((c1 - c0) / (nbytes / 1e9))
    return speeds


def add_section(table: Table, section: str, speeds: dict[str, list[float]], base: str,
                extra_base: tuple[str, float] | None = None) -> None:
    ref, best = statistics.median(speeds[base]), max(speeds[base])
    for name, xs in speeds.items():
        # best-of-reps ratios estimate the uncontended speeds on a machine shared with other jobs
        ratio = f"{statistics.median(xs) / ref:.2f}× (best/best {max(xs) / best:.2f}×)"
        if extra_base:
            ratio += f"; {statistics.median(xs) / extra_base[1]:.2f}× {extra_base[0]}"
        table.add(section, name, _median(xs), ratio, f"{statistics.median(CPU[name]):.2f}")


# --------------------------------------------------------------------------- methods

def hashlib_file(path: str) -> bytes:
    with open(path, "rb", buffering=0) as f:
        return hashlib.file_digest(f, "sha256").digest()


def run_cli(*argv: str) -> None:
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)


def blake3_file(path: str, threads: int) -> bytes:
    return blake3.blake3(max_threads=threads).update_mmap(path).digest()


def through_pipe(data: bytes, consume: Callable[[int], object]) -> None:
    """A child process writes ``data`` into a real pipe (1 MiB, like a widened fifo); we consume it."""
    r, w = os.pipe()
    fcntl.fcntl(w, fcntl.F_SETPIPE_SZ, MiB)
    pid = os.fork()
    if pid == 0:
        try:
            os.close(r)
            view = memoryview(data)
            pos = 0
            while pos < len(view):
                pos += os.write(w, view[pos:pos + MiB])
        finally:
            os._exit(0)
    os.close(w)
    try:
        consume(r)
    finally:
        os.close(r)
        os.waitpid(pid, 0)


def hashlib_pipe(fd: int) -> bytes:
    h, buf = hashlib.sha256(), bytearray(MiB)
    view = memoryview(buf)
    while n := os.readv(fd, [buf]):
        h.update(view[:n])
    return h.digest()


def read_pipe(fd: int) -> int:
    """Read the pipe to EOF and do nothing else: the most any consumer of the pipe can reach."""
    buf, total = bytearray(MiB), 0
    while n := os.readv(fd, [buf]):
        total += n
    return total


def drain(it) -> int:
    return sum(1 for _ in it)


# --------------------------------------------------------------------------- sections

def throughput(table: Table, size: int, reps: int, tmp: str) -> bytes:
    data = random_bytes(size, 1)
    path = os.path.join(tmp, "image")
    with open(path, "wb") as f:
        f.write(data)
    hashlib_file(path)                       # make sure it is in the page cache
    mib = f"{size // MiB} MiB"
    auto = blake3.blake3.AUTO

    file_speeds = measure({
        "hashlib.sha256 (file_digest, single stream)": lambda: hashlib_file(path),
        "`sha256sum`": lambda: run_cli("sha256sum", path),
        "`openssl dgst -sha256`": lambda: run_cli("openssl", "dgst", "-sha256", path),
        "blake3 update_mmap, 1 thread": lambda: blake3_file(path, 1),
        "blake3 update_mmap, max_threads=AUTO": lambda: blake3_file(path, auto),
        "**tree_hash(path)**, all cores": lambda: H.tree_hash(path),
        "tree_hash(path), threads=1": lambda: H.tree_hash(path, threads=1),
    }, size, reps)
    add_section(table, f"cached file, {mib}", file_speeds, "hashlib.sha256 (file_digest, single stream)")

    mem_speeds = measure({
        "hashlib.sha256(buf) (single stream)": lambda: hashlib.sha256(data).digest(),
        "blake3(buf), 1 thread": lambda: blake3.blake3(data).digest(),
        "blake3(buf, max_threads=AUTO)": lambda: blake3.blake3(data, max_threads=auto).digest(),
        "**tree_hash(buf)**, all cores": lambda: H.tree_hash(data),
        "tree_hash(buf), threads=1": lambda: H.tree_hash(data, threads=1),
    }, size, reps)
    add_section(table, f"in-memory buffer, {mib}", mem_speeds, "hashlib.sha256(buf) (single stream)")
    mem_ref = statistics.median(mem_speeds["hashlib.sha256(buf) (single stream)"])

    pipe_speeds = measure({
        "hashlib.sha256 reading the pipe": lambda: through_pipe(data, hashlib_pipe),
        "reading the pipe, no hashing (the transport's ceiling)": lambda: through_pipe(data, read_pipe),
        "**Chunker.consume** (chunks + per-chunk SHA-256)":
            lambda: through_pipe(data, lambda fd: drain(H.Chunker().consume(fd))),
        "ChunkAndTree.consume (chunks + SHA-256 each + Merkle root)":
            lambda: through_pipe(data, lambda fd: drain(H.ChunkAndTree().consume(fd))),
        "Chunker.consume, threads=1 (no overlap)":
            lambda: through_pipe(data, lambda fd: drain(H.Chunker(threads=1).consume(fd))),
    }, size, reps)
    add_section(table, f"pipe from a writer process, {mib}", pipe_speeds, "hashlib.sha256 reading the pipe",
                ("hashlib in memory", mem_ref))
    return data


def dedup(table: Table, size: int, tmp: str) -> None:
    rng = random.Random(2)
    base = random_bytes(size, 2)
    edited = bytearray(base)
    pages = rng.sample(range(size // 4096), 64)
    for p in pages:
        edited[p * 4096:(p + 1) * 4096] = rng.randbytes(4096)
    edited[100:100] = rng.randbytes(300)

    def chunks(data) -> list[tuple[bytes, int]]:
        c, out, view = H.Chunker(), [], memoryview(data)
        for i in range(0, len(view), 8 * MiB):
            out += [(k.digest, k.length) for k in c.feed(view[i:i + 8 * MiB])]
        return out + [(k.digest, k.length) for k in c.finish()]

    a, b = chunks(base), chunks(edited)
    known = {d for d, _ in a}
    shared = sum(n for d, n in b if d in known)
    table.add(f"dedup, 2 × {size // MiB} MiB", "64 scattered 4 KiB pages changed + 300 B inserted at offset 100",
              f"{shared / len(edited):.2%} of chunk bytes shared (target ≥ 95%)",
              f"{len(a)} chunks, mean {size / len(a) / 1024:.1f} KiB")


def peak_memory(table: Table, sizes: list[int], tmp: str) -> None:
    code = textwrap.dedent("""
        import sys
        from xen_vtpm import hashing as H
        path, how = sys.argv[1], sys.argv[2]
        if how == "tree_hash":
            H.tree_hash(path)
        elif how == "ChunkAndTree":
            with open(path, "rb", buffering=0) as f:
                for _ in H.ChunkAndTree().consume(f):
                    pass
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM"):
                print(int(line.split()[1]) // 1024)
    """)
    results = {}
    for n in sizes:
        path = os.path.join(tmp, f"mem{n}")
        with open(path, "wb") as f:
            piece = random_bytes(min(n, 64 * MiB), n)
            for _ in range(n // len(piece)):
                f.write(piece)
        for how in ("import only", "tree_hash", "ChunkAndTree"):
            out = subprocess.run([sys.executable, "-c", code, path, how], check=True, capture_output=True,
                                 text=True).stdout
            results[how, n] = int(out)
        os.unlink(path)
    for how in ("import only", "tree_hash", "ChunkAndTree"):
        vals = " / ".join(f"{results[how, n]} MiB" for n in sizes)
        table.add("peak RSS (VmHWM) of a subprocess, " + " / ".join(f"{n // MiB} MiB" for n in sizes),
                  how if how == "import only" else f"{how} of a file", vals)


def overhead(table: Table) -> None:
    def per_call(fn: Callable[[bytes], object], blob: bytes, n: int) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                fn(blob)
            best = min(best, (time.perf_counter() - t0) / n * 1e6)
        return best

    def chunk_blob(b: bytes, threads: int | None = None) -> None:
        c = H.Chunker(threads=threads)
        c.feed(b)
        c.finish()

    methods = {
        "hashlib.sha256(b).digest()": lambda b: hashlib.sha256(b).digest(),
        "tree_hash(b)": H.tree_hash,
        "StreamTreeHash(threads=1): update + digest": lambda b: _stream_once(b),
        "Chunker(threads=1): feed + finish": lambda b: chunk_blob(b, 1),
        "Chunker() (starts workers): feed + finish": chunk_blob,
    }
    for name, fn in methods.items():
        counts = {0: 2000, 4096: 2000, 65536: 500} if "Chunker()" not in name else {0: 200, 4096: 200, 65536: 100}
        vals = " / ".join(f"{per_call(fn, bytes(n), c):.1f}" for n, c in counts.items())
        table.add("per call, µs: 0 B / 4 KiB / 64 KiB", name, vals)


def _stream_once(b: bytes) -> bytes:
    s = H.StreamTreeHash(threads=1)
    s.update(b)
    return s.digest()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mib", type=int, default=1024, help="input size in MiB (default 1024)")
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    size = args.mib * MiB
    table = Table()
    tmp = tempfile.mkdtemp(prefix="xen-vtpm-bench-")
    load0 = os.getloadavg()[0]
    try:
        t0 = time.time()
        throughput(table, size, args.reps, tmp)
        dedup(table, size, tmp)
        peak_memory(table, [size // 4, size], tmp)
        overhead(table)
    finally:
        shutil.rmtree(tmp)
    print(f"# state hashing, {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, "
          f"SHA-256 engine: {H.SHA256_ENGINE}; "
          f"{time.time() - t0:.0f} s; load average before {load0:.2f}, after {os.getloadavg()[0]:.2f}\n")
    print(table.render())


if __name__ == "__main__":
    main()
