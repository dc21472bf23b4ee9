"""The `xen-vtpm` command line (entry point ``xen_vtpm.cli:main``)."""
from .app import main

__all__ = ["main"]
