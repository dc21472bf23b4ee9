"""Run xen-vtpm with a test's fault hook installed: the test-only seam for crash and fault injection.

    python tests/faulty_tool.py [--crash-at POINT]... [--interrupt-at POINT] [--fault-at POINT --fault-cmd CMD]
                                -- ARGS...

``--crash-at`` SIGKILLs the process when it reaches POINT (as a power cut or an OOM kill would
stop it there); ``--interrupt-at`` sends it SIGINT there (an administrator's Ctrl-C); ``--fault-at``
runs CMD there (taking a component down) and carries on.  POINTs are ``<kind>:<step>``
(core/steps.py), ``<kind>:begin`` (the operation journaled, no step yet) and ``store:<point>``.
A line ``reached POINT`` is written to the file named by ``--log`` at each point the hook acts on,
so a test can prove it fired.
"""
from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys

from xen_vtpm import faults
from xen_vtpm.cli import main


def _parse(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    if "--" not in argv:
        raise SystemExit("faulty_tool: put the xen-vtpm arguments after --")
    i = argv.index("--")
    p = argparse.ArgumentParser(prog="faulty_tool")
    p.add_argument("--crash-at", action="append", default=[])
    p.add_argument("--interrupt-at")
    p.add_argument("--fault-at")
    p.add_argument("--fault-cmd")
    p.add_argument("--log")
    return p.parse_args(argv[:i]), argv[i + 1:]


def _note(log: str | None, text: str) -> None:
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")
            fh.flush()
            os.fsync(fh.fileno())


def run(argv: list[str]) -> int:
    opts, tool_args = _parse(argv)

    def hook(name: str) -> None:
        if name in opts.crash_at:
            _note(opts.log, f"reached {name}")
            os.kill(os.getpid(), signal.SIGKILL)
        if name == opts.interrupt_at:
            _note(opts.log, f"reached {name}")
            os.kill(os.getpid(), signal.SIGINT)
        if name == opts.fault_at and opts.fault_cmd:
            proc = subprocess.run(shlex.split(opts.fault_cmd), timeout=60, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True)
            _note(opts.log, f"reached {name} fault-exit {proc.returncode} {proc.stderr.strip()!r}")

    faults.install(hook)
    return main(tool_args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
