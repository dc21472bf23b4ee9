"""The store's named fault points (``xen_vtpm.faults``), passed as ``store:<name>``."""
from __future__ import annotations

from .. import faults


def crashpoint(name: str) -> None:
    faults.reached(f"store:{name}")
