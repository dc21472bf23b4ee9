"""Fuzz the simulated xenstored live: hostile packets from several connections, over its socket.

A real daemon process (``python -m xen_vtpm_sim.xenstored``) gets random, mutated and
malformed xs_wire packets from two dom0 connections and one connection of domain 3.  Every
few hundred packets, and at the end, a well-formed client (our XenStore client, and at the end
also Debian's xenstore-write/xenstore-read) must still be served correctly; the daemon must
never exit or log a traceback.  Connections the daemon drops (oversized payloads, as the real
xenstored does) are reopened.  After a failure the daemon is restarted and fuzzing goes on;
each distinct failure is reported once, with the last packets sent as its reproducer.
"""
from __future__ import annotations

import collections
import os
import random
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import fz_xenstored_wire  # noqa: E402
import harness  # noqa: E402

from xen_vtpm.xen.xenstore import XenStore  # noqa: E402
from xen_vtpm_sim.xenstored import HEADER, PAYLOAD_MAX, Op, encode  # noqa: E402

DOMU = 3
PROBE_EVERY = 250
WAIT = 10.0          # bound on any single wait; never asserted as a duration
PATHS = [b"/", b"/local", b"/local/domain/3", b"/local/domain/3/data", b"data/x", b"x", b"/tool/xenstored",
         b"@releaseDomain", b"@introduceDomain", b"/a/b/c", b"/a//b", b"/a/", b"", b"/\xc3\xa9", b"@",
         b"/" + b"d" * 3100, b"r" * 2100, b"/local/domain/0/name", b"/fuzz-probe"]
WORDS = [b"n0", b"r3", b"b3", b"w0", b"x1", b"n99999", b"3", b"0", b"4096", b"T", b"F", b"tok", b"-1", b"32752"]


def _payload(rnd: random.Random) -> bytes:
    parts = [rnd.choice(PATHS)]
    for _ in range(rnd.randrange(4)):
        parts.append(rnd.choice(WORDS) if rnd.random() < 0.7 else rnd.randbytes(rnd.randrange(40)))
    payload = b"\0".join(parts)
    return payload + b"\0" if rnd.random() < 0.8 else payload


def packet(rnd: random.Random, seeds: list[bytes]) -> bytes:
    """One hostile send: structured, mutated from real request streams, random or oversized."""
    roll = rnd.random()
    if roll < 0.55:
        op = rnd.choice(list(Op) + [20, 22, 99, 0xFFFFFFFF])
        tx = 0 if rnd.random() < 0.7 else rnd.choice((1, 2, 3, 0xFFFFFFFF, rnd.getrandbits(32)))
        return encode(op, rnd.getrandbits(32), tx, _payload(rnd))
    if roll < 0.85:
        return harness.mutate(rnd.choice(seeds), rnd, max_len=PAYLOAD_MAX)
    if roll < 0.95:
        return rnd.randbytes(rnd.randrange(1, 64))
    return HEADER.pack(rnd.choice(list(Op)), 1, 0, rnd.choice((PAYLOAD_MAX + 1, 1 << 20, 0xFFFFFFFF)))


class _Daemon:
    def __init__(self, directory: Path) -> None:
        self.sock = str(directory / "xs.sock")
        self.log_path = directory / "xenstored.log"
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "xen_vtpm_sim.xenstored", "--socket", self.sock],
                                     stdin=subprocess.DEVNULL, stdout=self._log, stderr=self._log)
        deadline = time.monotonic() + WAIT
        while not self._accepting():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"simulated xenstored did not start: {self.log_tail()}")
            time.sleep(0.02)

    def _accepting(self) -> bool:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(self.sock)
            except OSError:
                return False
        return True

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=WAIT)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


class _Conn:
    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(WAIT)
        self.sock.connect(path)

    def send(self, data: bytes) -> bool:
        """Send and drain replies; False once the daemon has closed this connection."""
        try:
            self.sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            return False
        self.sock.setblocking(False)
        try:
            while True:
                chunk = self.sock.recv(1 << 16)
                if not chunk:
                    return False
        except BlockingIOError:
            return True
        except ConnectionResetError:
            return False
        finally:
            self.sock.settimeout(WAIT)

    def close(self) -> None:
        self.sock.close()


def _probe(sock: str, n: int) -> None:
    """A well-formed client gets correct answers: write, read back, list, transaction, remove."""
    with XenStore(sock, timeout=WAIT) as xs:
        path = f"/fuzz-probe/{n}"
        xs.write(path, f"value-{n}")
        assert xs.read(path) == f"value-{n}", "read back a different value"
        assert str(n) in xs.ls("/fuzz-probe")
        xs.transact(lambda tx: tx.write(f"{path}/t", "in-tx"))
        assert xs.read(f"{path}/t") == "in-tx"
        xs.rm(path)
        assert not xs.exists(path)
        if not xs.is_introduced(DOMU):
            xs.introduce(DOMU, 4096, 5)


def _probe_c_clients(sock: str) -> None:
    env = dict(os.environ, XENSTORED_PATH=sock)
    run = dict(env=env, capture_output=True, timeout=WAIT, check=True)
    subprocess.run(["xenstore-write", "/fuzz-probe/c", "from-c"], **run)
    out = subprocess.run(["xenstore-read", "/fuzz-probe/c"], text=True, **run).stdout.strip()
    assert out == "from-c", f"xenstore-read returned {out!r}"


class Finding(Exception):
    """The daemon misbehaved; ``packets`` are the last ones sent before it was noticed."""

    def __init__(self, what: str, packets: list[bytes], log_tail: str) -> None:
        super().__init__(what)
        self.what, self.packets, self.log_tail = what, packets, log_tail

    def signature(self) -> str:
        """What identifies the bug: the daemon's traceback (exception and where), else the symptom."""
        if "Traceback" in self.log_tail:
            lines = self.log_tail[self.log_tail.rindex("Traceback"):].splitlines()
            frames = [ln.strip() for ln in lines if ln.strip().startswith("File ")]
            ours = [f for f in frames if "xen_vtpm" in f] or frames or ["?"]
            where = re.sub(r'File "[^"]*/', 'File "', ours[-1])
            return f"{lines[-1].strip()} at {where}"
        return re.sub(r"/\S+", "<path>", re.sub(r"\d+", "N", self.what))


def _session(rnd: random.Random, seeds: list[bytes], deadline: float, budget: int, stats: dict) -> None:
    """Fuzz one fresh daemon until the deadline or ``budget`` packets; raise Finding on misbehaviour."""
    directory = Path(tempfile.mkdtemp(prefix="xvfuzz-live-"))
    daemon = _Daemon(directory)
    conns: dict[int, _Conn] = {}
    sent: collections.deque[bytes] = collections.deque(maxlen=20)
    targets = {0: daemon.sock, 1: daemon.sock, 2: f"{daemon.sock}.d{DOMU}"}

    def failure(what: str) -> Finding:
        try:                # a crashing daemon finishes writing its traceback first
            daemon.proc.wait(timeout=2)
        except subprocess.TimeoutExpired:
            pass
        daemon.stop()
        return Finding(f"{what} after {stats['packets']} packets", list(sent), daemon.log_tail())

    def probe(n: int, final: bool = False) -> None:
        if daemon.proc.poll() is not None:
            raise failure(f"the daemon exited with status {daemon.proc.returncode}")
        try:
            _probe(daemon.sock, n)
            if final and shutil.which("xenstore-write"):
                _probe_c_clients(daemon.sock)
        except Exception as exc:
            raise failure(f"a well-formed client failed: {exc.__class__.__name__}: {exc}") from None
        stats["probes"] += 1
    try:
        probe(0)
        sent_here = 0
        while time.monotonic() < deadline and sent_here < budget:
            which = rnd.randrange(3)
            if which not in conns:
                try:
                    conns[which] = _Conn(targets[which])
                except OSError:
                    probe(stats["packets"])   # raises if the daemon died; else re-introduces domain 3
                    continue
            data = packet(rnd, seeds)
            sent.append(data)
            stats["packets"] += 1
            stats["bytes"] += len(data)
            sent_here += 1
            try:
                alive = conns[which].send(data)
            except TimeoutError:
                raise failure("the daemon stopped reading") from None
            if not alive:
                conns.pop(which).close()
                stats["drops"] += 1
            if sent_here % PROBE_EVERY == 0:
                probe(stats["packets"])
        probe(stats["packets"] + 1, final=True)
        if "Traceback" in daemon.log_path.read_text(errors="replace"):
            raise failure("the daemon logged a traceback")
    finally:
        for conn in conns.values():
            conn.close()
        daemon.stop()
        shutil.rmtree(directory, ignore_errors=True)


def run(seconds: float, seed: int = 0, packets: int | None = None, findings_dir: Path | None = None) -> dict:
    """Fuzz for ``seconds`` (or until ``packets`` were sent), restarting the daemon after each finding.

    Returns counts and ``findings``: one entry per distinct signature, with the reproducer file
    (the last packets sent, concatenated) when ``findings_dir`` is given.
    """
    rnd = random.Random(seed)
    seeds = fz_xenstored_wire.seeds()
    stats: dict = {"packets": 0, "bytes": 0, "drops": 0, "probes": 0, "sessions": 0, "findings": []}
    deadline = time.monotonic() + seconds
    budget = packets if packets is not None else 1 << 62
    seen: dict[str, dict] = {}
    while time.monotonic() < deadline and stats["packets"] < budget:
        stats["sessions"] += 1
        try:
            _session(rnd, seeds, deadline, budget - stats["packets"], stats)
        except Finding as found:
            sig = found.signature()
            if sig in seen:
                seen[sig]["hits"] += 1
                continue
            entry = seen[sig] = {"signature": sig, "symptom": found.what, "hits": 1}
            if findings_dir is not None:
                findings_dir.mkdir(parents=True, exist_ok=True)
                path = findings_dir / f"xenstored-live-{len(seen)}.bin"
                path.write_bytes(b"".join(found.packets))
                entry["reproducer"] = str(path)
            stats["findings"].append(entry)
    return stats


if __name__ == "__main__":
    print(run(float(sys.argv[1]) if len(sys.argv) > 1 else 10.0))
