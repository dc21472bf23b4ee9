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
    # Short base: the host's Unix socket paths must stay under 108 bytes.
    with tempfile.TemporaryDirectory(prefix="xen-vtpm-demo-", dir="/tmp") as tmp:
        sim_dir = Path(tmp) / "host"
        try:
            _say(quiet, json_mode, f"== starting a simulated Xen host in {sim_dir}")
            host.up(sim_dir)
            _say(quiet, json_mode, "== xen-vtpm sim create guest1   (vtpm-guest1 first, then guest1)")
            host.create_guest(sim_dir, "guest1", memory=64)
            cfg = Config.load(sim_dir / "config.ini")
            rows = topology.list_domains(cfg)
            _say(quiet, json_mode, "== xen-vtpm list")
            if json_mode:
                print(json.dumps({"list": rows}, indent=2, sort_keys=True))
            elif not quiet:
                print(topology.render(rows))
        finally:
            _say(quiet, json_mode, "== stopping the simulated host")
            try:
                host.down(sim_dir)
            except Exception as exc:  # noqa: BLE001 - report, but let the original error win
                print(f"xen-vtpm: demo: sim down failed: {exc}", file=sys.stderr)
    return 0
