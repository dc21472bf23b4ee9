"""`xen-vtpm sim ssh HOST COMMAND...`: the `ssh` of two simulated hosts on one machine.

`xen-vtpm migrate -s "xen-vtpm sim ssh" guest1 /tmp/hostB` runs
`xen-vtpm sim ssh /tmp/hostB xen-vtpm migrate-receive`, as `xl migrate` runs `ssh HOST xl
migrate-receive`: COMMAND becomes a process of the host in directory HOST, with that host's
environment (its xenstored, xl, config and owner marker), its stdin and stdout the caller's pipe.
"""
from __future__ import annotations

import os
from pathlib import Path

from xen_vtpm.errors import PreconditionFailed, UsageError

from . import host
from .domains import OWNER_ENV


def run(host_dir: str, command: list[str]) -> int:
    if not command:
        raise UsageError("sim ssh: no COMMAND; usage: xen-vtpm sim ssh HOST COMMAND...")
    d = Path(host_dir).resolve()
    if not host.is_up(d):
        raise PreconditionFailed(f"sim ssh: no simulated host runs in {d}; start it with `xen-vtpm sim up --dir {d}`")
    env = dict(os.environ, **host.exports(d))
    env[OWNER_ENV] = str(d)
    try:
        os.execvpe(command[0], command, env)
    except OSError as exc:
        raise UsageError(f"sim ssh {d}: cannot run {command[0]!r} ({exc.strerror})") from None
    return 127   # not reached
