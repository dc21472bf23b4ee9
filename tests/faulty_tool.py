"""Run xen-vtpm with a test's fault hook installed: the test-only seam for crash and fault injection.

    python tests/faulty_tool.py [--crash-at POINT]... [--interrupt-at POINT] [--fault-at POINT --fault-cmd CMD]...
                                [--log FILE] [--trace] -- ARGS...

``--crash-at`` SIGKILLs the process at the first of the POINTs it reaches (as a power cut or an OOM
kill would stop it there); ``--interrupt-at`` sends it SIGINT there (an administrator's Ctrl-C);
``--fault-at`` runs the paired ``--fault-cmd`` there (taking a component down) and carries on.  POINTs
are ``<kind>:<step>``, ``<kind>:<step>:<point>`` (core/steps.py), ``<kind>:begin`` (the operation
journaled, no step yet) and ``store:<point>``.

``--log`` makes every hook action provable: ``reached POINT crash`` is written just before the kill,
``reached POINT interrupt`` before the SIGINT, ``reached POINT fault-exit N STDERR`` after a fault
command (STDERR: its last line); with ``--trace`` also ``passed POINT`` for every other point.  A test
reads the log to prove a kill or fault happened where it asked for it, and fails when it did not.
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
    p.add_argument("--fault-at", action="append", default=[])
    p.add_argument("--fault-cmd", action="append", default=[])
    p.add_argument("--log")
    p.add_argument("--trace", action="store_true")
    opts = p.parse_args(argv[:i])
    if len(opts.fault_at) != len(opts.fault_cmd):
        raise SystemExit("faulty_tool: give one --fault-cmd per --fault-at")
    return opts, argv[i + 1:]


def _note(log: str | None, text: str) -> None:
    # Closed before the kill: the line is in the page cache, which a SIGKILL does not lose.
    if log:
        with open(log, "a", encoding="utf-8") as fh:
            fh.write(text + "\n")


def run(argv: list[str]) -> int:
    opts, tool_args = _parse(argv)
    faults_at = dict(zip(opts.fault_at, opts.fault_cmd, strict=True))

    def hook(name: str) -> None:
        if name in opts.crash_at:
            _note(opts.log, f"reached {name} crash")
            os.kill(os.getpid(), signal.SIGKILL)
        if name == opts.interrupt_at:
            _note(opts.log, f"reached {name} interrupt")
            os.kill(os.getpid(), signal.SIGINT)
        if name in faults_at:
            proc = subprocess.run(shlex.split(faults_at[name]), timeout=60, stdin=subprocess.DEVNULL,
                                  capture_output=True, text=True)
            err = proc.stderr.strip().splitlines()
            _note(opts.log, f"reached {name} fault-exit {proc.returncode} {(err[-1] if err else '')!r}")
        elif opts.trace:
            _note(opts.log, f"passed {name}")

    faults.install(hook)
    # As `xen-vtpm`'s entry point (xen_vtpm/__main__.py) does: Ctrl-C is handled even when this process
    # inherited SIGINT ignored (a job a non-interactive shell started in the background).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    return main(tool_args)


if __name__ == "__main__":
    sys.exit(run(sys.argv[1:]))
