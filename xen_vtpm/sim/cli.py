"""`xen-vtpm sim ...`: run and drive the simulated Xen host."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    sim = sub.add_parser("sim", help="the simulated Xen host (for tests and the demo)")
    sim.add_subparsers(dest="sim_command", metavar="SIMCOMMAND")
