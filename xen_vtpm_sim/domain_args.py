"""The command line every simulated domain process is started with by the sim `xl create`."""
from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def parse(prog: str, argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, Any]]:
    """--sim-dir, --domid, --name and --config (the parsed xl cfg as JSON); returns (args, cfg)."""
    ap = argparse.ArgumentParser(prog=prog)
    ap.add_argument("--sim-dir", required=True, type=Path)
    ap.add_argument("--domid", type=int, required=True)
    ap.add_argument("--name", required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    return args, json.loads(Path(args.config).read_text(encoding="utf-8"))
