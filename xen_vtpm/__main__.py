"""`python -m xen_vtpm` and the `xen-vtpm` script (entry point ``run``).

Loading the tool (tpm2-pytss, cffi, the adapters) takes a noticeable moment; a Ctrl-C in it has
nothing to undo, so it ends the process with the usual line and exit 130 instead of a traceback
from whichever import it interrupted.  While a command runs, ``main`` handles Ctrl-C itself.  Once
it returned, the outcome is decided and printed: a Ctrl-C then is ignored, since during the
interpreter's shutdown it would kill the process without a word and hide the exit status.
"""
import os
import signal
import sys


def _interrupted_while_loading(signum: int, frame: object) -> None:
    os.write(2, b"xen-vtpm: interrupted\n")
    os._exit(130)


signal.signal(signal.SIGINT, _interrupted_while_loading)
from xen_vtpm.cli import main  # noqa: E402  (after the handler: this import is the slow part)

signal.signal(signal.SIGINT, signal.default_int_handler)


def run() -> int:
    try:
        status = main()
    except KeyboardInterrupt:   # a second Ctrl-C while main was reporting the first
        status = 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    return status


if __name__ == "__main__":
    sys.exit(run())
