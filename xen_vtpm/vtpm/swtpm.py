"""The vTPM backend for HVM guests whose QEMU emulates a TPM 2.0 backed by an swtpm in dom0.

One swtpm per vTPM, owned by xen-vtpm: ``start`` runs it before the guest's device model (the
xl-hooks wrapper does so for `xl create`, the coordinator before `xl restore`), and it ends by
itself when QEMU exits (QEMU sends CMD_SHUTDOWN; docs/xen-internals.md §14.3).

Where a vTPM lives (its UUID is what the device model's socket path names):

    <state_dir>/swtpm/<uuid>/vtpm.json   which guest it was made for
    <state_dir>/swtpm/<uuid>/state/      swtpm's state directory (tpm2-00.permall, ...)
    <state_dir>/swtpm/<uuid>/swtpm.log   swtpm's own log (errors only)
    <swtpm_run_dir>/<uuid>.sock, .pid    its control socket (QEMU's chardev) and pid file

Nothing in clear on disk: swtpm encrypts its state files with a state key and every state blob
it hands out on the control channel with a migration key (§15.3), both derived per vTPM from the
host key sealed under the physical TPM and passed to swtpm through pipes.  So QEMU's copy of the
state (the tpm-emulator section that `xl save` records, §14) is encrypted too, and libxl's
``qemu-save.<domid>`` is wiped after a capture (§11.5).

A capture is swtpm's state files as they are while the guest is suspended (`xl save -p` made
QEMU fetch the blobs, which reads them from these very files, §15.2); putting it back writes
them while swtpm is stopped; a start proves, before any device model can attach, that swtpm
decrypts and loads exactly that state (never a freshly manufactured TPM).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import time
import uuid as uuidlib
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Protocol

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from xen_vtpm.config import Config
from xen_vtpm.durable import fsync_dir, write_atomic
from xen_vtpm.errors import IntegrityError, NotFound, PreconditionFailed, TransferError, VtpmBusy, XenError
from xen_vtpm.model import VtpmCapture, VtpmExport, VtpmRef
from xen_vtpm.transfer import crypto
from xen_vtpm.xen.devicemodel import swtpm_socket, tpm_sockets
from xen_vtpm.xen.domains import domid_of
from xen_vtpm.xen.savefile import relink_emulator_tpm
from xen_vtpm.xen.xenstore import XenStore

from . import swtpmctl as ctl
from . import swtpmmove

KIND = "swtpm"
START_TIMEOUT = 10.0
CONTROL_TIMEOUT = 5.0
_PACK_MAGIC = b"XVSWTPM1"
_LOG_LEVEL = 1          # errors only: higher levels dump control-channel traffic, state blobs included
_SWTPM_ACCESS = 0o600
_SUN_PATH_MAX = 108     # sizeof(sockaddr_un.sun_path) on Linux, the NUL included


@dataclasses.dataclass(frozen=True)
class Paths:
    home: Path
    state: Path
    record: Path
    log: Path
    socket: Path
    pid: Path
    migration_key: Path     # a moved-in vTPM's own migration key, sealed (swtpmmove.wrap_key)


def pack_state(files: dict[str, bytes]) -> bytes:
    """swtpm's state files as one blob (the checkpoint's vTPM image)."""
    out = bytearray(_PACK_MAGIC + struct.pack(">I", len(files)))
    for name in sorted(files):
        raw = name.encode("ascii")
        out += struct.pack(">H", len(raw)) + raw + struct.pack(">I", len(files[name])) + files[name]
    return bytes(out)


def unpack_state(image: bytes, label: str) -> dict[str, bytes]:
    def bad(why: str) -> IntegrityError:
        return IntegrityError(f"{label}: its swtpm state image is malformed ({why}); restore from another checkpoint")
    if image[:len(_PACK_MAGIC)] != _PACK_MAGIC or len(image) < len(_PACK_MAGIC) + 4:
        raise bad("no xen-vtpm swtpm header")
    pos = len(_PACK_MAGIC)
    (count,) = struct.unpack_from(">I", image, pos)
    pos += 4
    files: dict[str, bytes] = {}
    for _ in range(count):
        if pos + 2 > len(image):
            raise bad("truncated")
        (n,) = struct.unpack_from(">H", image, pos)
        name = image[pos + 2:pos + 2 + n].decode("ascii", "replace")
        pos += 2 + n
        if name not in ctl.STATE_FILES or name in files or pos + 4 > len(image):
            raise bad(f"unexpected entry {name!r}")
        (length,) = struct.unpack_from(">I", image, pos)
        files[name] = image[pos + 4:pos + 4 + length]
        pos += 4 + length
        if len(files[name]) != length:
            raise bad("truncated")
    if pos != len(image) or ctl.PERMANENT not in files:
        raise bad("trailing bytes or no permanent state")
    return files


def fingerprints(files: dict[str, bytes]) -> tuple[str, str]:
    """SHA-256 of the permanent and the volatile state file ("" when absent)."""
    return tuple(hashlib.sha256(files[n]).hexdigest() if n in files else ""    # type: ignore[return-value]
                 for n in (ctl.PERMANENT, ctl.VOLATILE))


def derive_keys(base: bytes, vtpm_uuid: str) -> tuple[bytes, bytes]:
    """(state-file key, migration key) of one vTPM: HKDF-SHA256 of the host's swtpm sub-key, one
    label each, so a state directory or blob of one vTPM never opens in another's swtpm."""
    def one(label: str) -> bytes:
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                    info=f"xen-vtpm swtpm {label} {vtpm_uuid}".encode()).derive(base)
    return one("state"), one("migration")


def _last_line(log: Path, rc: int) -> str:
    with contextlib.suppress(OSError):
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            return lines[-1][:200]
    return f"exit {rc}"


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return False


class MoveKeyring(Protocol):
    """This host's TPM-resident transfer key (``host.identity.TpmIdentity``): what a moving vTPM's
    keys are sealed to, and the TPM's ECDH with it that opens them."""
    def transfer_key(self) -> bytes: ...
    def zgen(self, point: bytes) -> bytes: ...


class SwtpmBackend:
    """VtpmBackend for swtpm vTPMs (``VtpmRef.backend_kind == "swtpm"``)."""

    def __init__(self, cfg: Config, xs: XenStore, base_key: bytes, keyring: MoveKeyring | None = None) -> None:
        self.cfg, self.xs = cfg, xs
        self._base_key = base_key
        self._keyring = keyring

    # --- where things are ---------------------------------------------------------------------
    def paths(self, vtpm_uuid: str) -> Paths:
        home = Path(self.cfg.state_dir) / "swtpm" / vtpm_uuid
        run = Path(self.cfg.swtpm_run_dir)
        return Paths(home=home, state=home / "state", record=home / "vtpm.json", log=home / "swtpm.log",
                     socket=swtpm_socket(run, vtpm_uuid), pid=run / f"{vtpm_uuid}.pid",
                     migration_key=home / "migration.key")

    def registered(self) -> list[dict[str, str]]:
        """Every vTPM this host's xen-vtpm manages, with the guest it was made for."""
        base = Path(self.cfg.state_dir) / "swtpm"
        out = []
        for home in sorted(base.iterdir()) if base.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                out.append(json.loads((home / "vtpm.json").read_text()))
        return out

    def _paths_of(self, ref: VtpmRef) -> Paths:
        p = self.paths(ref.uuid)
        if not p.record.is_file() or not p.state.is_dir():
            raise NotFound(f"{ref.backend}: vTPM {ref.uuid} is not one of this host's swtpm vTPMs "
                           f"({p.home} missing); add it with `xen-vtpm vtpm add {ref.guest} --backend swtpm`")
        return p

    def keys_of(self, vtpm_uuid: str) -> tuple[bytes, bytes]:
        """(state key, migration key) of a vTPM: both derived from this host's key, but the migration
        key of a vTPM that moved in, which is its own (swtpmmove)."""
        state_key, migration_key = derive_keys(self._base_key, vtpm_uuid)
        p = self.paths(vtpm_uuid)
        with contextlib.suppress(FileNotFoundError):
            migration_key = swtpmmove.unwrap_key(self._base_key, vtpm_uuid, p.migration_key.read_bytes(),
                                                 p.migration_key)
        return state_key, migration_key

    def _record(self, p: Paths) -> dict[str, str]:
        try:
            record = json.loads(p.record.read_text())
        except (OSError, ValueError):
            return {}
        return record if isinstance(record, dict) else {}

    def _mark(self, p: Paths, key: str, value: str | None) -> None:
        """Set (or clear) a move's mark in the vTPM's record: "parked" on the source, "incoming" on the
        destination until it commits."""
        record = self._record(p)
        if record.get(key) == value:
            return
        if value is None:
            record.pop(key, None)
        else:
            record[key] = value
        write_atomic(p.record, json.dumps(record, sort_keys=True).encode(), mode=0o600)

    def register(self, vtpm_uuid: str, guest: str) -> Paths:
        p = self.paths(vtpm_uuid)
        if len(os.fsencode(p.socket)) >= _SUN_PATH_MAX:
            raise PreconditionFailed(f"{p.socket}: too long for a Unix socket path; set `swtpm_run_dir` in the "
                                     "config to a shorter directory (default /run/xen-vtpm)")
        p.state.mkdir(mode=0o700, parents=True)
        write_atomic(p.record, json.dumps({"uuid": vtpm_uuid, "guest": guest, "backend": KIND,
                                           "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
                                          sort_keys=True).encode(), mode=0o600)
        return p

    # --- the swtpm process --------------------------------------------------------------------
    def pid(self, vtpm_uuid: str) -> int | None:
        """The running swtpm of this vTPM (its pid file, checked against its command line)."""
        p = self.paths(vtpm_uuid)
        try:
            pid = int(p.pid.read_text().strip())
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) and f"path={p.socket}".encode() in cmdline else None

    def start(self, vtpm_uuid: str) -> Paths:
        """Run this vTPM's swtpm (daemonized; it outlives this command and ends with its device model)."""
        p = self.paths(vtpm_uuid)
        if self.pid(vtpm_uuid) is not None:
            raise VtpmBusy(f"vTPM {vtpm_uuid}: its swtpm already runs; stop it first")
        parked = self._record(p).get("parked")
        if parked:
            raise VtpmBusy(f"vTPM {vtpm_uuid}: parked while it moves to another host (transfer {parked}), so no "
                           "swtpm may run from its state here; run `xen-vtpm recover` to settle the move")
        p.socket.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        for stale in (p.socket, p.pid):
            stale.unlink(missing_ok=True)
        state_key, migration_key = self.keys_of(vtpm_uuid)
        fds, key_args = [], []
        try:
            for option, key in (("--key", state_key), ("--migration-key", migration_key)):
                r, w = os.pipe()   # 32 bytes fit a pipe: written whole before swtpm reads them
                fds.append(r)
                os.write(w, key)
                os.close(w)
                key_args += [option, f"fd={r},mode=aes-256-cbc,format=binary"]
            argv = [self.cfg.swtpm, "socket", "--tpm2", "--daemon",
                    "--tpmstate", f"dir={p.state},mode=0{_SWTPM_ACCESS:o}",
                    "--ctrl", f"type=unixio,path={p.socket},mode=0{_SWTPM_ACCESS:o}",
                    *key_args, "--pid", f"file={p.pid}", "--log", f"file={p.log},level={_LOG_LEVEL}"]
            try:
                proc = self._daemonize(argv, fds, p.log)
            except FileNotFoundError:
                raise PreconditionFailed(f"{self.cfg.swtpm}: swtpm is not installed; install Debian's swtpm "
                                         "package or set `swtpm =` in the config") from None
            except subprocess.TimeoutExpired:
                raise XenError(f"vTPM {vtpm_uuid}: swtpm did not daemonize within {START_TIMEOUT:g} s; "
                               f"see {p.log}") from None
        finally:
            for fd in fds:
                os.close(fd)
        if proc.returncode != 0:
            raise XenError(f"vTPM {vtpm_uuid}: swtpm failed to start ({_last_line(p.log, proc.returncode)}); "
                           f"see {p.log}")
        deadline = time.monotonic() + START_TIMEOUT
        while self.pid(vtpm_uuid) is None or not p.socket.exists():
            if time.monotonic() > deadline:
                raise XenError(f"vTPM {vtpm_uuid}: swtpm did not open {p.socket} within {START_TIMEOUT:g} s; "
                               f"see {p.log}")
            time.sleep(0.01)
        return p

    @staticmethod
    def _daemonize(argv: list[str], fds: list[int], log: Path) -> subprocess.CompletedProcess[bytes]:
        """Run a `swtpm --daemon`; its early errors go to its log (a pipe would stay open in the daemon)."""
        with open(os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600), "ab") as err:
            return subprocess.run(argv, pass_fds=fds, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                  stderr=err, timeout=START_TIMEOUT, check=False)

    def halt(self, vtpm_uuid: str) -> None:
        """Stop this vTPM's swtpm (CMD_SHUTDOWN, else SIGTERM, else SIGKILL) and wait until it is gone."""
        p = self.paths(vtpm_uuid)
        pid = self.pid(vtpm_uuid)
        if pid is not None:
            try:
                with ctl.control(p.socket, 1.0) as c:
                    c.shutdown()
            except XenError:            # a device model holds the channel, or swtpm hangs
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGTERM)
            for sig in (signal.SIGTERM, signal.SIGKILL):
                deadline = time.monotonic() + START_TIMEOUT / 2
                while _alive(pid) and time.monotonic() < deadline:
                    time.sleep(0.01)
                if not _alive(pid):
                    break
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, sig)
            if _alive(pid):
                raise XenError(f"vTPM {vtpm_uuid}: swtpm (pid {pid}) survives SIGKILL; check it with `ps`")
        for stale in (p.socket, p.pid):
            stale.unlink(missing_ok=True)

    # --- its state files ----------------------------------------------------------------------
    def state_files(self, p: Paths) -> dict[str, bytes]:
        files = {}
        for name in ctl.STATE_FILES:
            with contextlib.suppress(FileNotFoundError):
                files[name] = (p.state / name).read_bytes()
        return files

    def _check_encrypted(self, files: dict[str, bytes], what: str) -> None:
        clear = [n for n, data in files.items() if not ctl.encrypted_at_rest(data)]
        if clear:
            raise IntegrityError(f"{what}: swtpm state {', '.join(clear)} is not encrypted with the vTPM's state "
                                 "key; refusing to keep or use a plaintext vTPM state — see `xen-vtpm vtpm import`")

    def prove(self, vtpm_uuid: str, p: Paths) -> None:
        """I1 for swtpm: the running swtpm has both keys and loads the state on disk, unchanged.

        CMD_INIT loads the permanent state; a TPM that found none would manufacture a new one and
        write it, so the file's digest must not move; one it cannot decrypt or parse fails INIT."""
        before = self.state_files(p)
        if ctl.PERMANENT not in before:
            raise IntegrityError(f"vTPM {vtpm_uuid}: no permanent state in {p.state}; swtpm would manufacture a "
                                 "fresh TPM — put a checkpoint back with `xen-vtpm rollback`/`recover`")
        self._check_encrypted(before, f"vTPM {vtpm_uuid}")
        with ctl.control(p.socket, CONTROL_TIMEOUT) as c:
            flags = c.config_flags()
            if flags & (ctl.CONFIG_FLAG_FILE_KEY | ctl.CONFIG_FLAG_MIGRATION_KEY) != \
                    ctl.CONFIG_FLAG_FILE_KEY | ctl.CONFIG_FLAG_MIGRATION_KEY:
                raise IntegrityError(f"vTPM {vtpm_uuid}: its swtpm runs without a state or migration key")
            rc = c.init()
            if rc:
                raise IntegrityError(f"vTPM {vtpm_uuid}: swtpm cannot load its state (CMD_INIT result {rc:#x}); "
                                     f"the state in {p.state} is damaged or not this vTPM's — see {p.log}")
            c.stop()
        if fingerprints(self.state_files(p))[0] != fingerprints(before)[0]:
            raise IntegrityError(f"vTPM {vtpm_uuid}: swtpm rewrote its permanent state while loading it")

    def manufacture(self, vtpm_uuid: str) -> None:
        """A new vTPM: swtpm manufactures its TPM 2.0 (new seeds, so a new EK) and writes it encrypted.

        Done once, here, so that every later start can insist on finding a state."""
        p = self.start(vtpm_uuid)
        try:
            with ctl.control(p.socket, CONTROL_TIMEOUT) as c:
                rc = c.init()
                if rc:
                    raise XenError(f"vTPM {vtpm_uuid}: swtpm could not manufacture a TPM (result {rc:#x}); "
                                   f"see {p.log}")
        finally:
            self.halt(vtpm_uuid)
        self._check_encrypted(self.state_files(p), f"vTPM {vtpm_uuid}")

    def adopt_state(self, vtpm_uuid: str, source: Path, source_key: bytes | None) -> None:
        """Load a foreign swtpm state directory in a throw-away swtpm and hand its permanent state,
        over the control channel only, to this vTPM's own swtpm, which encrypts it with its keys."""
        p = self.paths(vtpm_uuid)
        sock = p.socket.with_suffix(".import")
        sock.unlink(missing_ok=True)
        fds, key_args = [], []
        if source_key is not None:
            r, w = os.pipe()
            os.write(w, source_key)
            os.close(w)
            fds.append(r)
            key_args = ["--key", f"fd={r},mode={'aes-256-cbc' if len(source_key) == 32 else 'aes-cbc'},format=binary"]
        try:
            proc = self._daemonize([self.cfg.swtpm, "socket", "--tpm2", "--daemon",
                                    "--tpmstate", f"dir={source},mode=0{_SWTPM_ACCESS:o}",
                                    "--ctrl", f"type=unixio,path={sock},mode=0{_SWTPM_ACCESS:o}", *key_args,
                                    "--log", f"file={p.log},level={_LOG_LEVEL}"], fds, p.log)
        finally:
            for fd in fds:
                os.close(fd)
        if proc.returncode != 0:
            raise PreconditionFailed(f"{source}: swtpm refused this state directory "
                                     f"({_last_line(p.log, proc.returncode)}); is it a TPM 2.0 swtpm state, "
                                     "and in use by no other swtpm?")
        deadline = time.monotonic() + START_TIMEOUT
        while not sock.exists() and time.monotonic() < deadline:
            time.sleep(0.01)
        try:
            with ctl.control(sock, CONTROL_TIMEOUT) as c:
                rc = c.init()
                if rc:
                    raise PreconditionFailed(f"{source}: swtpm cannot load this state (result {rc:#x}): not a TPM 2.0 "
                                             "state, damaged, or encrypted — pass its key with --swtpm-key FILE")
                flags, blob = c.get_blob(ctl.BLOB_PERMANENT, decrypted=True)
                c.shutdown()
        finally:
            sock.unlink(missing_ok=True)
        mine = self.start(vtpm_uuid)
        try:
            with ctl.control(mine.socket, CONTROL_TIMEOUT) as c:
                if c.set_blob(ctl.BLOB_PERMANENT, flags, blob) or c.init():
                    raise IntegrityError(f"vTPM {vtpm_uuid}: its swtpm refused the adopted state; see {p.log}")
        finally:
            self.halt(vtpm_uuid)
        self._check_encrypted(self.state_files(mine), f"vTPM {vtpm_uuid}")

    def unregister(self, vtpm_uuid: str) -> None:
        self.halt(vtpm_uuid)
        shutil.rmtree(self.paths(vtpm_uuid).home)

    # --- core.interfaces.VtpmBackend ------------------------------------------------------------
    def supports_checkpoints(self, ref: VtpmRef) -> bool:
        return True

    def check_can_capture(self, ref: VtpmRef) -> None:
        """Nothing beyond a registered vTPM, which finding the guest proved."""

    def check_can_restart(self, ref: VtpmRef) -> None:
        """Refuse up front a restart that could only give a fresh TPM: swtpm must be installed and this
        vTPM registered here with an encrypted permanent state (``prove`` checks it loads, after start)."""
        p = self._paths_of(ref)
        if shutil.which(self.cfg.swtpm) is None:
            raise PreconditionFailed(f"{ref.backend}: {self.cfg.swtpm!r} not found, so the vTPM cannot be started "
                                     "again; install swtpm (Debian: swtpm) or set `swtpm =` in the config")
        self._check_permanent(ref, p, "; a restart would manufacture a fresh TPM — roll back to a checkpoint "
                                      "instead")

    def _check_permanent(self, ref: VtpmRef, p: Paths, without: str) -> None:
        """The vTPM has an encrypted permanent state; ``without`` ends the refusal when it has none."""
        files = self.state_files(p)
        if ctl.PERMANENT not in files:
            raise PreconditionFailed(f"{ref.backend}: vTPM {ref.uuid} has no permanent state in {p.state}{without}")
        self._check_encrypted(files, f"vTPM {ref.uuid}")

    def check_single_consumer(self, ref: VtpmRef) -> None:
        """One device model on this vTPM's socket: the guest's (swtpm serves one control client)."""
        p = self._paths_of(ref)
        users = [d for d in self.xs.ls("/local/domain")
                 if d.isdigit() and str(p.socket) in tpm_sockets(self.xs, int(d))]
        if len(users) != 1:
            names = [self.xs.read_or(f"/local/domain/{d}/name") or d for d in users]
            raise VtpmBusy(f"{ref.backend}: {len(users)} device models use vTPM {ref.uuid} "
                           f"({', '.join(names) or 'none'}); a checkpoint needs exactly one consumer")

    def is_running(self, ref: VtpmRef) -> bool:
        return self.pid(ref.uuid) is not None

    def fingerprint(self, ref: VtpmRef) -> tuple[str, str]:
        return fingerprints(self.state_files(self._paths_of(ref)))

    def capture(self, ref: VtpmRef, checkpoint_id: str) -> VtpmCapture:
        """swtpm's files while the guest is suspended: `xl save` made QEMU read them (pre_save) and no
        command can arrive, so they are the state the save stream's tpm-emulator section carries."""
        p = self._paths_of(ref)
        files = self.state_files(p)
        if ctl.PERMANENT not in files:
            raise IntegrityError(f"{ref.backend}: no permanent state in {p.state}; nothing to capture")
        self._check_encrypted(files, ref.backend)
        self._wipe_device_model_save(ref)
        return VtpmCapture(image=pack_state(files), manager_checkpoint=checkpoint_id, manager_hash=None,
                           slot_hashes=fingerprints(files), backend_kind=KIND)

    def capture_fingerprint(self, ref: VtpmRef) -> VtpmCapture:
        return dataclasses.replace(self.capture(ref, ""), manager_checkpoint=None)

    def _wipe_device_model_save(self, ref: VtpmRef) -> None:
        """libxl leaves QEMU's device state, this vTPM's blobs included, in qemu-save.<domid> after
        `xl save -p` until the domain dies, and never overwrites it (§11.5): zero it, then unlink it."""
        domid = domid_of(self.xs, ref.guest)
        if domid is None:
            return
        path = Path(self.cfg.xen_lib_dir) / f"qemu-save.{domid}"
        with contextlib.suppress(FileNotFoundError):
            with open(path, "r+b") as fh:
                size = os.fstat(fh.fileno()).st_size
                fh.write(bytes(size))
                fh.flush()
                os.fsync(fh.fileno())
            path.unlink()

    def stop(self, ref: VtpmRef) -> None:
        self.halt(ref.uuid)

    def put_back(self, ref: VtpmRef, capture: VtpmCapture) -> None:
        p = self._paths_of(ref)
        if self.is_running(ref):
            raise PreconditionFailed(f"{ref.backend}: its swtpm still runs; it must be stopped before its state is "
                                     "replaced")
        files = unpack_state(capture.image, ref.backend)
        self._check_encrypted(files, ref.backend)
        for name, data in files.items():
            write_atomic(p.state / name, data, mode=0o600)
        for name in set(ctl.STATE_FILES) - set(files):
            (p.state / name).unlink(missing_ok=True)

    def start_verified(self, ref: VtpmRef) -> None:
        """(Re)start its swtpm and prove it loaded the state on disk before any device model attaches."""
        p = self._paths_of(ref)
        self.halt(ref.uuid)
        self.start(ref.uuid)
        try:
            self.prove(ref.uuid, p)
        except BaseException:
            self.halt(ref.uuid)
            raise

    def discard(self, ref: VtpmRef, manager_checkpoint: str) -> None:
        """The one copy of a capture held outside the checkpoint is libxl's device-model save of the
        guest, which ``capture`` wipes: a capture undone before it ran (a crash or failure between
        `xl save -p` and the capture) still left one behind."""
        self._wipe_device_model_save(ref)

    # --- moves (docs/migration.md §6): the state files travel as swtpm encrypted them, the two keys
    # sealed to the destination's TPM-resident transfer key; the destination re-encrypts the state
    # under its own state key and keeps the vTPM's migration key, sealed under its own host key ------
    def move_key(self) -> bytes | None:
        if self._keyring is None or shutil.which(self.cfg.swtpm) is None:
            return None
        return self._keyring.transfer_key()

    def check_can_move(self, ref: VtpmRef) -> None:
        p = self._paths_of(ref)
        if self._keyring is None:
            raise PreconditionFailed(f"{ref.backend}: this command cannot move swtpm vTPMs (no host identity); "
                                     "run `xen-vtpm migrate`")
        self._check_permanent(ref, p, ", nothing to move; roll it back to a checkpoint first")

    def export_for(self, ref: VtpmRef, transfer: str, recipient: bytes) -> VtpmExport:
        """Park the vTPM (no swtpm may start from its state until ``unexport``) and take its state files
        as they are: the guest is suspended and its device model already took the TPM's blobs, so the
        swtpm that still serves that device model changes nothing.  It is left running: an aborted
        move resumes the guest on it (QEMU cannot reconnect to another swtpm)."""
        p = self._paths_of(ref)
        files = self.state_files(p)
        if ctl.PERMANENT not in files:
            raise IntegrityError(f"{ref.backend}: no permanent state in {p.state}; nothing to move")
        self._check_encrypted(files, ref.backend)
        state_key, migration_key = self.keys_of(ref.uuid)
        self._mark(p, "parked", transfer)
        self._wipe_device_model_save(ref)
        hashes = fingerprints(files)
        return VtpmExport(kind=KIND, ref=ref, state=pack_state(files), state_hash=hashes[0], slot_hashes=hashes,
                          envelope=crypto.seal_envelope(recipient, swtpmmove.envelope_context(transfer, ref.uuid),
                                                        state_key + migration_key), config="")

    def export_checkpoint(self, ref: VtpmRef, manager_checkpoint: str, transfer: str, recipient: bytes) -> bytes:
        """A checkpoint's capture is encrypted under this vTPM's state key here: that key, sealed."""
        state_key, _ = self.keys_of(ref.uuid)
        return crypto.seal_envelope(recipient, swtpmmove.envelope_context(transfer, ref.uuid, manager_checkpoint),
                                    state_key)

    def unexport(self, ref: VtpmRef) -> None:
        """Un-park; and wipe libxl's device-model save, which a move undone before ``export_for`` ran
        (killed right after `xl save -p`) still left behind."""
        self._mark(self.paths(ref.uuid), "parked", None)     # a no-op without a record or a mark
        self._wipe_device_model_save(ref)

    def check_importable(self, export: VtpmExport) -> None:
        """Refuse before anything is written: a vTPM of that UUID here, no swtpm, a state that does not
        match its description."""
        ref = export.ref
        p = self.paths(ref.uuid)
        if self._keyring is None or shutil.which(self.cfg.swtpm) is None:
            raise PreconditionFailed(f"{self.cfg.swtpm}: swtpm is not installed on this host, so it cannot take an "
                                     "swtpm vTPM in; install Debian's swtpm package (nothing was changed)")
        if p.home.exists():
            raise PreconditionFailed(f"{p.home}: this host already has vTPM {ref.uuid}; move it away to take "
                                     f"{ref.guest}'s vTPM in (nothing was changed)")
        if len(os.fsencode(p.socket)) >= _SUN_PATH_MAX:
            raise PreconditionFailed(f"{p.socket}: too long for a Unix socket path; set `swtpm_run_dir` in the "
                                     "config to a shorter directory (nothing was changed)")
        try:
            files = unpack_state(export.state, ref.backend)
        except IntegrityError as exc:
            raise TransferError(f"{exc} (altered)") from None
        if fingerprints(files) != export.slot_hashes or export.state_hash != export.slot_hashes[0]:
            raise TransferError(f"{ref.backend}: the moving swtpm state differs from its description (altered)")
        self._check_encrypted(files, ref.backend)

    def _open(self, transfer: str, ref: VtpmRef, checkpoint: str, envelope: bytes, size: int) -> bytes:
        if self._keyring is None:
            raise PreconditionFailed(f"{ref.backend}: this command cannot take swtpm vTPMs in (no host identity)")
        keys = crypto.open_envelope(self._keyring.zgen, swtpmmove.envelope_context(transfer, ref.uuid, checkpoint),
                                    envelope, f"{ref.backend}'s keys")
        if len(keys) != size:
            raise TransferError(f"{ref.backend}: its envelope holds {len(keys)} key bytes, not {size} (altered)")
        return keys

    def _rekeyed(self, ref: VtpmRef, files: dict[str, bytes], old_key: bytes, label: str) -> dict[str, bytes]:
        p = self.paths(ref.uuid)
        state_key, _ = derive_keys(self._base_key, ref.uuid)
        return swtpmmove.rekey(self.cfg.swtpm, files, old_key, state_key, p.home, p.socket, p.log, label)

    def import_from(self, export: VtpmExport, transfer: str) -> None:
        """The vTPM as this host's own, provisionally (``remove`` undoes it, ``adopt`` makes it final):
        its record, its migration key sealed here, its state re-encrypted under this host's state key."""
        ref = export.ref
        keys = self._open(transfer, ref, "", export.envelope, 2 * swtpmmove.KEY_BYTES)
        old_state_key, migration_key = keys[:swtpmmove.KEY_BYTES], keys[swtpmmove.KEY_BYTES:]
        p = self.paths(ref.uuid)
        if not p.record.is_file():
            self.register(ref.uuid, ref.guest)
        self._mark(p, "incoming", transfer)
        write_atomic(p.migration_key, swtpmmove.wrap_key(self._base_key, ref.uuid, migration_key), mode=0o600)
        files = self._rekeyed(ref, unpack_state(export.state, ref.backend), old_state_key, ref.backend)
        for name, data in files.items():
            write_atomic(p.state / name, data, mode=0o600)

    def import_checkpoint(self, ref: VtpmRef, capture: VtpmCapture, transfer: str, envelope: bytes) -> VtpmCapture:
        """A moved checkpoint's capture, re-encrypted under this host's state key for the vTPM."""
        label = f"checkpoint {capture.manager_checkpoint} of {ref.backend}"
        old_key = self._open(transfer, ref, capture.manager_checkpoint or "", envelope, swtpmmove.KEY_BYTES)
        files = self._rekeyed(ref, unpack_state(capture.image, label), old_key, label)
        return dataclasses.replace(capture, image=pack_state(files), slot_hashes=fingerprints(files),
                                   backend_kind=KIND)

    def incoming_stream(self, ref: VtpmRef, blocks: Iterable[bytes | memoryview]) -> Iterator[bytes | memoryview]:
        """A moved save stream, its device model wired to this host's socket for the vTPM."""
        p = self.paths(ref.uuid)
        return relink_emulator_tpm(blocks, p.socket.name, str(p.socket))

    def adopt(self, ref: VtpmRef) -> None:
        self._mark(self._paths_of(ref), "incoming", None)

    def remove(self, ref: VtpmRef) -> None:
        """This host's copy goes: its swtpm, its state, its keys.  Idempotent."""
        self.halt(ref.uuid)
        home = self.paths(ref.uuid).home
        if home.exists():
            shutil.rmtree(home)
            fsync_dir(home.parent)


def new_uuid() -> str:
    return str(uuidlib.uuid4())

