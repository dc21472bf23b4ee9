"""What the command line accepts before any command runs: checkpoint names and references, save targets.

A checkpoint name is 1 to 64 characters: letters, digits and ``. _ - + : @``, the first a letter or
a digit, and never shaped like a UUID (a checkpoint's id is one: a name equal to another checkpoint's
id would make `delete NAME` resolve to that checkpoint).  So a name is printable, cannot be a path,
an option or a terminal escape, and reads the same in every table.  Refused input is exit 2.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from xen_vtpm.errors import UsageError

from .render import clean

NAME_MAX = 64
_NAME = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._+:@-]{{0,{NAME_MAX - 1}}}")
_UUID = re.compile(r"[0-9a-fA-F]{8}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{4}-?[0-9a-fA-F]{12}")
_GRAMMAR = f"1-{NAME_MAX} letters, digits and . _ - + : @, starting with a letter or digit"


def _shown(text: str) -> str:
    """An argument echoed in an error: escaped and cut, so the error stays one short line."""
    return clean(text if len(text) <= 40 else text[:40] + "…")


def check_name(name: str) -> str:
    if _UUID.fullmatch(name):
        raise UsageError(f"checkpoint name '{_shown(name)}': looks like a checkpoint id (a UUID), which would "
                         "make it ambiguous; choose another --name")
    if not _NAME.fullmatch(name):
        raise UsageError(f"checkpoint name '{_shown(name)}': not allowed; use {_GRAMMAR}")
    return name


def check_ref(ref: str) -> str:
    """A CHECKPOINT argument: a checkpoint's id or a name that could exist."""
    if not (_UUID.fullmatch(ref) or _NAME.fullmatch(ref)):
        raise UsageError(f"checkpoint '{_shown(ref)}': neither a checkpoint id nor a valid name ({_GRAMMAR}); "
                         "see `xen-vtpm checkpoints`")
    return ref


def check_save_target(state_dir: str | os.PathLike[str], path: str, *, force: bool) -> str:
    """`save FILE`: never inside the state dir (links resolved, also for a FILE that does not exist
    yet), and never an existing file unless ``force``."""
    resolved = Path(os.path.realpath(path))
    state = Path(os.path.realpath(state_dir))
    if resolved == state or state in resolved.parents:
        raise UsageError(f"{path}: inside the state dir {state} (resolved to {resolved}); "
                         "save to a file outside it")
    if os.path.lexists(path) and not force:
        raise UsageError(f"{path}: exists; remove it or pass --force to replace it")
    return path
