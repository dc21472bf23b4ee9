"""What moving an swtpm vTPM between hosts needs besides swtpm's own files (docs/migration.md §6).

An swtpm vTPM has two keys (``swtpm.derive_keys``): the *state key* its state files are encrypted
with, and the *migration key* every state blob it hands to QEMU is encrypted with.  A move takes the
files as they are, and the two keys, sealed to the destination's TPM-resident transfer key; there:

* the files are re-encrypted under that host's own state key (``rekey``): two throw-away swtpm
  processes, each with one key, hand the permanent state across on their control channels, so the
  clear state exists only in memory, never in a file;
* the migration key stays the vTPM's for good (``wrap_key``, stored sealed under the host's
  TPM-sealed swtpm key): QEMU's device state in the guest's save stream carries the TPM's volatile
  state (its PCRs) encrypted under it, and that stream cannot be re-encrypted on the way (QEMU's
  savevm sections have no lengths, so the TPM's cannot be found in a real device model's state).
"""
from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from xen_vtpm.errors import IntegrityError, PreconditionFailed, XenError
from xen_vtpm.transfer import crypto

from . import swtpmctl as ctl

KEY_BYTES = 32
_WRAP_MAGIC = b"XVSWMK1\0"
_START_TIMEOUT = 10.0
_CONTROL_TIMEOUT = 5.0
_PR_SET_PDEATHSIG = 1


def envelope_context(transfer: str, vtpm_uuid: str, checkpoint: str = "") -> bytes:
    """What a sealed key is for: one transfer, one vTPM, the vTPM itself or one of its checkpoints."""
    return crypto.digest(b"xen-vtpm swtpm keys v1", transfer.encode(), vtpm_uuid.encode(), checkpoint.encode())


def _wrapping(base: bytes, vtpm_uuid: str) -> AESGCM:
    return AESGCM(HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                       info=f"xen-vtpm swtpm key wrap {vtpm_uuid}".encode()).derive(base))


def wrap_key(base: bytes, vtpm_uuid: str, key: bytes) -> bytes:
    """A vTPM's own migration key, as this host keeps it: sealed under its swtpm sub-key."""
    nonce = os.urandom(12)
    return _WRAP_MAGIC + nonce + _wrapping(base, vtpm_uuid).encrypt(nonce, key, vtpm_uuid.encode())


def unwrap_key(base: bytes, vtpm_uuid: str, blob: bytes, where: Path) -> bytes:
    head = len(_WRAP_MAGIC) + 12
    try:
        if blob[:len(_WRAP_MAGIC)] != _WRAP_MAGIC:
            raise InvalidTag
        key = _wrapping(base, vtpm_uuid).decrypt(blob[len(_WRAP_MAGIC):head], blob[head:], vtpm_uuid.encode())
    except InvalidTag:
        raise IntegrityError(f"{where}: the migration key of vTPM {vtpm_uuid} does not open with this host's key "
                             "(altered, or copied from another host); restore the file from a backup") from None
    if len(key) != KEY_BYTES:
        raise IntegrityError(f"{where}: holds a key of {len(key)} bytes, not {KEY_BYTES}")
    return key


def _die_with_parent() -> None:
    """In the helper swtpm's child before exec: a tool killed mid-move takes its helpers with it."""
    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


@contextlib.contextmanager
def _swtpm(swtpm: str, state: Path, key: bytes, sock: Path, log: Path) -> Iterator[ctl.Control]:
    """A throw-away swtpm on ``state`` with one key (no migration key: its blobs come out in clear,
    over its control socket only), ended when the block ends."""
    sock.unlink(missing_ok=True)
    r, w = os.pipe()
    os.write(w, key)
    os.close(w)
    try:
        proc = subprocess.Popen([swtpm, "socket", "--tpm2", "--tpmstate", f"dir={state},mode=0600",
                                 "--ctrl", f"type=unixio,path={sock},mode=0600",
                                 "--key", f"fd={r},mode=aes-256-cbc,format=binary",
                                 "--log", f"file={log},level=1"],
                                pass_fds=[r], preexec_fn=_die_with_parent, stdin=subprocess.DEVNULL,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    except FileNotFoundError:
        raise PreconditionFailed(f"{swtpm}: swtpm is not installed; install Debian's swtpm package or set "
                                 "`swtpm =` in the config") from None
    finally:
        os.close(r)
    try:
        deadline = time.monotonic() + _START_TIMEOUT
        while not sock.exists():
            if proc.poll() is not None or time.monotonic() > deadline:
                raise XenError(f"{state}: a helper swtpm did not start (exit {proc.poll()}); see {log}")
            time.sleep(0.01)
        with ctl.control(sock, _CONTROL_TIMEOUT) as c:
            yield c
            c.shutdown()
        proc.wait(_START_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.unlink(missing_ok=True)


def rekey(swtpm: str, files: dict[str, bytes], old_key: bytes, new_key: bytes, work: Path, sock: Path,
          log: Path, label: str) -> dict[str, bytes]:
    """swtpm's state files under ``old_key`` -> the same TPM state under ``new_key``.

    Only the permanent state is carried: swtpm writes a volatile or savestate file only when told to
    (CMD_STORE_VOLATILE), and a moved guest's volatile state travels in its device model's state.
    The new swtpm must hold, once it loaded the state, what the old one holds once it reloaded it."""
    if ctl.PERMANENT not in files:
        raise IntegrityError(f"{label}: no permanent state to move")
    work.mkdir(mode=0o700, parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=work, prefix=".rekey-") as tmp:
        old, new = Path(tmp, "old"), Path(tmp, "new")
        old.mkdir(mode=0o700)
        new.mkdir(mode=0o700)
        (old / ctl.PERMANENT).write_bytes(files[ctl.PERMANENT])          # still encrypted under old_key
        with _swtpm(swtpm, old, old_key, sock.with_suffix(".rekey-old"), log) as c:
            if c.init():
                raise IntegrityError(f"{label}: its swtpm state does not open with the key that came with it "
                                     "(altered or not this vTPM's); nothing was kept")
            flags, plain = c.get_blob(ctl.BLOB_PERMANENT, decrypted=True)
            # What a TPM holds after loading ``plain`` (loading marks it, e.g. as not shut down in
            # order): the new swtpm must come to exactly this, or it did not load the moved state.
            if c.stop() or c.set_blob(ctl.BLOB_PERMANENT, flags, plain) or c.init():
                raise IntegrityError(f"{label}: swtpm cannot reload its own state; see {log}")
            _, loaded = c.get_blob(ctl.BLOB_PERMANENT, decrypted=True)
        with _swtpm(swtpm, new, new_key, sock.with_suffix(".rekey-new"), log) as c:
            if c.set_blob(ctl.BLOB_PERMANENT, flags, plain) or c.init():
                raise IntegrityError(f"{label}: swtpm refused the moved state; see {log}")
            _, back = c.get_blob(ctl.BLOB_PERMANENT, decrypted=True)
        out = {ctl.PERMANENT: (new / ctl.PERMANENT).read_bytes()}
    if back != loaded or not ctl.encrypted_at_rest(out[ctl.PERMANENT]):
        raise IntegrityError(f"{label}: the re-encrypted swtpm state does not read back as the moved one")
    return out
