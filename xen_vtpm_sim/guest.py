"""A simulated HVM guest: a process whose memory is a shared file mapping.

While it runs it keeps rewriting a few random pages (so a snapshot of a
running guest is never consistent by accident); SIGSTOP (xl pause) freezes
it.  It is the frontend of its vtpm devices and answers control/shutdown like
Linux: on suspend it acks and stops itself until xl resumes or destroys it.
Like Linux's xen-tpmfront it sends its vTPM nothing on suspend
(docs/xen-internals.md §9.4): the vTPM saved its state after its last command.
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


# TPM2_GetCapability(TPM_CAP_TPM_PROPERTIES, TPM_PT_FAMILY_INDICATOR, 1) and TPM 1.2
# TPM_GetCapability(TPM_CAP_PROPERTY, TPM_CAP_PROP_TIS_TIMEOUT): what Linux's probe sends.
TPM2_GETCAP_FAMILY = bytes.fromhex("8001" "00000016" "0000017a" "00000006" "00000100" "00000001")
TPM12_GETCAP_TIMEOUTS = bytes.fromhex("00c1" "00000016" "00000065" "00000005" "00000004" "00000115")
TPM2_SHUTDOWN_STATE = bytes.fromhex("8001" "0000000c" "00000145" "0001")   # what tpm_tis sends on suspend


def tpm_command(port: int, command: bytes, timeout: float = 10.0) -> bytes:
    """One raw TPM command to the vTPM the guest's frontend reaches (its TCTI port) and its answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(command)
        data = b""
        while len(data) < 10 or len(data) < struct.unpack_from(">I", data, 2)[0]:
            chunk = sock.recv(4096)
            if not chunk:
                raise OSError("the vTPM closed the connection")
            data += chunk
    return data


def tcti_port(tcti: str) -> int:
    """The port of a ``swtpm:host=127.0.0.1,port=P`` TCTI string."""
    opts = dict(kv.split("=", 1) for kv in tcti.strip().partition(":")[2].split(",") if "=" in kv)
    return int(opts["port"])


def memory_path(sim_dir: str | os.PathLike, domid: int) -> Path:
    return Path(sim_dir) / "run" / f"mem-{domid}"


def log(msg: str) -> None:
    try:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)
    except OSError:
        # No xenconsoled reads the console any more (a pipe: EPIPE; a pty whose master closed: EIO).
        # A real guest's console ring just fills; the guest runs on.
        pass


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
                self.probe_tpm(devid)
                self.xs.write(f"{fe}/state", "4")
                self.connected.add(devid)
                log(f"vtpm device {devid}: connected to {be}")

    def probe_tpm(self, devid: str) -> None:
        """Linux probes the TPM as soon as its frontend connects (tpm2_probe, then tpm_get_timeouts;
        docs/xen-internals.md §6.4): the first successful command makes the vTPM save its state."""
        vtpm = next((v for v in self.config.get("vtpms", []) if str(v.get("devid")) == devid), {})
        tcti = Path(self.sim_dir) / "run" / f"{vtpm.get('backend_domname')}.tcti"
        try:
            port = int(tcti.read_text().strip().rsplit("port=", 1)[1])
            rsp = tpm_command(port, TPM2_GETCAP_FAMILY)
            if rsp[:2] != b"\x80\x01":                 # not a TPM 2.0: a TPM 1.2 answers in its own format
                rsp = tpm_command(port, TPM12_GETCAP_TIMEOUTS)
        except (OSError, ValueError, IndexError) as exc:
            log(f"vtpm device {devid}: TPM probe failed: {exc}")
            return
        log(f"vtpm device {devid}: TPM probe rc=0x{struct.unpack_from('>I', rsp, 6)[0]:x}")

    def scribble(self) -> None:
        self.counter += 1
        stamp = struct.pack("<QQ", self.domid, self.counter)
        for _ in range(PAGES_PER_TICK):
            off = random.randrange(self.pages) * PAGE
            self.mem[off:off + 16] = stamp
            self.mem[off + 16:off + 48] = os.urandom(32)

    def suspend(self) -> None:
        log("suspend requested")
        # An HVM guest's tpm_tis/tpm_crb driver sends TPM2_Shutdown(STATE) when it suspends; Linux's
        # xen-tpmfront has no such hook (docs/xen-internals.md §6), so a stub-domain vTPM gets nothing.
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

    def send_shutdown_state(self, what: str, tcti_file: Path) -> None:
        try:
            tcti = tcti_file.read_text().strip()
        except OSError:
            log(f"{what}: no TCTI at {tcti_file.name}; skipping TPM2_Shutdown")
            return
        try:
            rsp = tpm_command(tcti_port(tcti), TPM2_SHUTDOWN_STATE)
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
