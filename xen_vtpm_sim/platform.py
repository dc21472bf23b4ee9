"""What kind of Xen host the simulator plays: ``DIR/run/platform.json``, written once by `sim up`.

A real host's answers to these questions come from how it was built and set up, not from any one
daemon, so every simulated piece that needs one reads it here:

* ``xsm``: ``flask`` (a hypervisor built with XSM/FLASK and the vTPM domains labelled) or ``none``
  (x86 Xen 4.17's default build, docs/xen-internals.md §3.5): `xl getenforce` and the manager's
  kernel-hash check follow it.
* ``provisioned``: the manager's group 0 has its seal list and kernel list (docs/xen-internals.md
  §3.2, §4.2); without them the manager never writes its disk and refuses every reload.
* ``console_log``: xenconsoled's ``--log`` (``guest`` or ``none``, docs/xen-internals.md §7.5).
* ``release_delay``: seconds between libxl removing a destroyed vTPM's backend directory and the
  manager clearing its OPEN flag (the release race, docs/xen-internals.md §9.5).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

XSM_MODES = ("flask", "none")
CONSOLE_LOG_MODES = ("guest", "none")


@dataclasses.dataclass(frozen=True)
class Platform:
    xsm: str = "flask"
    provisioned: bool = True
    console_log: str = "guest"
    release_delay: float = 0.0

    def __post_init__(self) -> None:
        if self.xsm not in XSM_MODES:
            raise ValueError(f"xsm must be one of {', '.join(XSM_MODES)}, not {self.xsm!r}")
        if self.console_log not in CONSOLE_LOG_MODES:
            raise ValueError(f"console_log must be one of {', '.join(CONSOLE_LOG_MODES)}, not {self.console_log!r}")
        if self.release_delay < 0:
            raise ValueError("release_delay must not be negative")


def _path(sim_dir: str | os.PathLike) -> Path:
    return Path(sim_dir) / "run" / "platform.json"


def save(sim_dir: str | os.PathLike, platform: Platform) -> None:
    _path(sim_dir).write_text(json.dumps(dataclasses.asdict(platform), indent=1) + "\n")


def load(sim_dir: str | os.PathLike) -> Platform:
    """The host's platform; a directory without one (an older host) is the correctly configured default."""
    try:
        return Platform(**json.loads(_path(sim_dir).read_text()))
    except FileNotFoundError:
        return Platform()
