"""A simulated HVM guest: a process whose memory is a shared file mapping.

While it runs it keeps rewriting a few random pages (so a snapshot of a
running guest is never consistent by accident); SIGSTOP (xl pause) freezes
it.  It is the frontend of its vtpm devices, answers control/shutdown like
Linux (on suspend it sends TPM2_Shutdown(STATE) to its vTPM first, then acks
and stops itself until xl resumes or destroys it).
"""
from __future__ import annotations

import mmap
import os
import random
import signal
import socket
import struct
import sys
import time
from pathlib import Path
from typing import Any

from xen_vtpm.xen.xenstore import XenStore
from xen_vtpm_sim import domain_args

PAGE = 4096
TICK = 0.05
PAGES_PER_TICK = 4
# TPM2_Shutdown(TPM_SU_STATE): tag NO_SESSIONS, size 12, CC 0x145, su 0x0001.
TPM2_SHUTDOWN_STATE = bytes.fromhex("80010000000c000001450001")


def memory_path(sim_dir: str | os.PathLike, domid: int) -> Path:
    return Path(sim_dir) / "run" / f"mem-{domid}"


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def parse_tcti(tcti: str) -> tuple[str, int]:
    """host and port of a ``swtpm:host=H,port=P`` / ``mssim:…`` TCTI string."""
    _, _, conf = tcti.strip().partition(":")
    opts = dict(kv.split("=", 1) for kv in conf.split(",") if "=" in kv)
    return opts.get("host", "127.0.0.1"), int(opts["port"])


def send_tpm_command(tcti: str, command: bytes, timeout: float = 5.0) -> bytes:
    host, port = parse_tcti(tcti)
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(command)
        head = b""
        while len(head) < 10:
            chunk = sock.recv(10 - len(head))
            if not chunk:
                raise OSError("TPM closed the connection")
            head += chunk
        size = struct.unpack(">I", head[2:6])[0]
        body = b""
        while len(head) + len(body) < size:
            chunk = sock.recv(size - len(head) - len(body))
            if not chunk:
                raise OSError("TPM closed the connection")
            body += chunk
    return head + body


class Guest:
    def __init__(self, sim_dir: str, domid: int, name: str, config: dict[str, Any]) -> None:
        self.sim_dir = sim_dir
        self.domid = domid
        self.name = name
        self.config = config
        self.dom_path = f"/local/domain/{domid}"
        path = memory_path(sim_dir, domid)
        self.fd = os.open(path, os.O_RDWR)
        self.mem = mmap.mmap(self.fd, os.fstat(self.fd).st_size, mmap.MAP_SHARED)
        self.pages = len(self.mem) // PAGE
        self.counter = 0
        self.connected: set[str] = set()
        self.devids: list[str] = []
        self.xs = XenStore()

    def run(self) -> int:
        log(f"{self.name} (domid {self.domid}): {len(self.mem) >> 20} MiB memory, booting")
        self.setup_frontends()
        control = f"{self.dom_path}/control/shutdown"
        # The watch doubles as the tick: it wakes us early when xl writes a request.
        with self.xs.watch(control, "control") as watch:
            while True:
                if watch.wait(TICK) is not None:
                    request = self.xs.read_or(control, "") or ""
                    if request == "suspend":
                        self.suspend()
                    elif request in ("poweroff", "halt", "reboot"):
                        log(f"shutdown request {request!r}: powering off")
                        self.ack()
                        self.mem.flush()
                        return 0
                if len(self.connected) < len(self.devids):
                    self.connect_frontends()
                self.scribble()

    def setup_frontends(self) -> None:
        """xen-tpmfront probe: ring-ref, event-channel, protocol v2, then Initialised (3)."""
        base = f"{self.dom_path}/device/vtpm"
        self.devids = self.xs.ls(base) if self.xs.exists(base) else []
        for devid in self.devids:
            fe = f"{self.dom_path}/device/vtpm/{devid}"

            def publish(tx, fe=fe):
                tx.write(f"{fe}/ring-ref", str(random.randint(8, 4095)))
                tx.write(f"{fe}/event-channel", str(random.randint(1, 1023)))
                tx.write(f"{fe}/feature-protocol-v2", "1")
                tx.write(f"{fe}/state", "3")
            self.xs.transact(publish)
            log(f"vtpm device {devid}: frontend initialised")

    def connect_frontends(self) -> None:
        """Connected (4) once the backend is Initialised/Connected with protocol v2."""
        for devid in self.devids:
            if devid in self.connected:
                continue
            fe = f"{self.dom_path}/device/vtpm/{devid}"
            be = self.xs.read_or(f"{fe}/backend")
            if not be:
                continue
            if self.xs.read_or(f"{be}/state") in ("3", "4") and self.xs.read_or(f"{be}/feature-protocol-v2") == "1":
                self.xs.write(f"{fe}/state", "4")
                self.connected.add(devid)
                log(f"vtpm device {devid}: connected to {be}")

    def scribble(self) -> None:
        self.counter += 1
        stamp = struct.pack("<QQ", self.domid, self.counter)
        for _ in range(PAGES_PER_TICK):
            off = random.randrange(self.pages) * PAGE
            self.mem[off:off + 16] = stamp
            self.mem[off + 16:off + 48] = os.urandom(32)

    def suspend(self) -> None:
        log("suspend requested")
        for vtpm in self.config.get("vtpms", []):
            self.tpm_shutdown_state(vtpm)
        dm_tcti = Path(self.sim_dir) / "run" / f"dm-{self.domid}.tcti"   # a TPM in its device model
        if dm_tcti.exists():
            self.send_shutdown_state("device model TPM", dm_tcti)
        self.mem.flush()
        self.ack()
        log("suspended")
        os.kill(os.getpid(), signal.SIGSTOP)
        # Here only if the suspend was cancelled (xl save -c/-p then unpause):
        # frontends keep their connection, as Linux's PMSG_THAW path does.
        log("resumed after cancelled suspend")

    def tpm_shutdown_state(self, vtpm: dict[str, Any]) -> None:
        backend = str(vtpm.get("backend_domname") or "")
        self.send_shutdown_state(f"vtpm {vtpm.get('devid')}", Path(self.sim_dir) / "run" / f"{backend}.tcti")

    def send_shutdown_state(self, what: str, tcti_file: Path) -> None:
        try:
            tcti = tcti_file.read_text().strip()
        except OSError:
            log(f"{what}: no TCTI at {tcti_file.name}; skipping TPM2_Shutdown")
            return
        try:
            rsp = send_tpm_command(tcti, TPM2_SHUTDOWN_STATE)
            log(f"{what}: TPM2_Shutdown(STATE) rc=0x{struct.unpack('>I', rsp[6:10])[0]:x}")
        except (OSError, ValueError, KeyError) as exc:
            log(f"{what}: TPM2_Shutdown(STATE) failed: {exc}")

    def ack(self) -> None:
        # Linux acks by clearing control/shutdown; xl watches for that.
        self.xs.write(f"{self.dom_path}/control/shutdown", "")


def main(argv: list[str] | None = None) -> int:
    args, config = domain_args.parse("xen_vtpm_sim.guest", argv)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    return Guest(args.sim_dir, args.domid, args.name, config).run()


if __name__ == "__main__":
    sys.exit(main())
