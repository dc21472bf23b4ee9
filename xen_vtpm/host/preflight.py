"""dom0's own preconditions for `xen-vtpm doctor`: its TPM 2.0 and a local state directory."""
from __future__ import annotations

import os
from pathlib import Path

from xen_vtpm.config import Config
from xen_vtpm.errors import XenVtpmError
from xen_vtpm.model import Check

from .session import tpm_session
from .tpm import HostTpm

# File systems whose locking, fsync or rename do not give the guarantees the catalog, the journal and
# the per-VM locks rely on (SQLite's own advice: no network file systems).
REMOTE_FS = frozenset({"nfs", "nfs4", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs", "lustre",
                       "fuse.sshfs", "fuse.glusterfs", "fuse.s3fs", "davfs", "fuse.rclone"})


def host_tpm(cfg: Config) -> Check:
    """dom0 reaches a TPM 2.0 through its TCTI.  Linux's driver uses locality 0; vtpmmgr should be on
    locality 2 (checked with the manager), and busy answers from sharing the TPM are retried."""
    try:
        # Under the host lock when xen-vtpm is set up: a swtpm socket serves one client at a time.
        with tpm_session(cfg) if Path(cfg.state_dir).is_dir() else HostTpm(cfg.tcti, cfg.pcrs,
                                                                            cfg.primary_handle) as tpm:
            tpm.get_random(8)
    except XenVtpmError as exc:
        return Check("host-tpm", False, str(exc), f"make a TPM 2.0 reachable at {cfg.tcti} (set tcti= in the config)")
    return Check("host-tpm", True, f"TPM 2.0 answers at {cfg.tcti} (locality 0)")


def _mount_of(path: Path) -> tuple[str, str]:
    """(mount point, file system type) holding ``path``: the longest matching entry of /proc/self/mounts."""
    best = ("/", "unknown")
    with open("/proc/self/mounts", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            fields = line.split()
            if len(fields) < 3:
                continue
            point = fields[1].replace("\\040", " ")
            if (str(path) == point or str(path).startswith(point.rstrip("/") + "/")) and len(point) >= len(best[0]):
                best = (point, fields[2])
    return best


def state_dir_local(cfg: Config) -> Check:
    path = Path(cfg.state_dir).resolve()
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent        # not created yet: the file system it will be created on
    try:
        point, fstype = _mount_of(Path(os.path.realpath(probe)))
    except OSError as exc:
        return Check("state-dir", False, f"cannot read the mount table ({exc.strerror})", "check /proc/self/mounts")
    if fstype in REMOTE_FS or fstype.startswith("fuse."):
        return Check("state-dir", False, f"{path} is on {fstype} ({point}), a network or user-space file system",
                     "set state_dir= in the config to a local file system (ext4, xfs, btrfs) and run `xen-vtpm init`")
    return Check("state-dir", True, f"{path} on {fstype} ({point})")


def host_checks(cfg: Config) -> list[Check]:
    return [host_tpm(cfg), state_dir_local(cfg)]
