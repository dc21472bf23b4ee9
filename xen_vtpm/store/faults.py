"""Named crash points for the store's crash-safety tests.

With ``XEN_VTPM_STORE_CRASH_AT=<name>`` in the environment the process kills
itself with SIGKILL when it reaches that point, exactly as a power cut or an
OOM kill would stop it there; unset (always, outside tests) it does nothing.
"""
from __future__ import annotations

import os
import signal

ENV = "XEN_VTPM_STORE_CRASH_AT"


def crashpoint(name: str) -> None:
    if os.environ.get(ENV) == name:
        os.kill(os.getpid(), signal.SIGKILL)
