"""`xen-vtpm demo`: the tool on a throwaway simulated host.

Starts a host in a temporary directory, creates guest1 with its vTPM stub
domain, shows `xen-vtpm list`, and always takes the host down again.
"""
from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

from .config import Config


def _say(quiet: bool, json_mode: bool, text: str) -> None:
    if not quiet and not json_mode:
        print(text, flush=True)


def run(json_mode: bool = False, quiet: bool = False) -> int:
    from . import topology
    from .sim import host
    with tempfile.TemporaryDirectory(prefix="xen-vtpm-demo-") as tmp:
        sim_dir = Path(tmp) / "host"
        _say(quiet, json_mode, f"== starting a simulated Xen host in {sim_dir}")
        try:
            host.up(sim_dir)
            _say(quiet, json_mode, "== xen-vtpm sim create guest1   (vtpm-guest1 first, then guest1)")
            host.create_guest(sim_dir, "guest1", memory=64)
            rows = topology.list_domains(Config.load(sim_dir / "config.ini"))
            _say(quiet, json_mode, "== xen-vtpm list")
            if json_mode:
                print(json.dumps({"list": rows}, indent=2, sort_keys=True))
            elif not quiet:
                print(topology.render(rows))
        except BaseException:
            try:
                host.down(sim_dir)
            except Exception as exc:  # noqa: BLE001 - the first error is the one to report
                print(f"xen-vtpm: demo: sim down after an error also failed: {exc}", file=sys.stderr)
            raise
        _say(quiet, json_mode, "== stopping the simulated host")
        host.down(sim_dir)
    return 0
