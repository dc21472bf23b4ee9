"""Durability read off a real syscall trace (Debian's strace) of a command or store operation.

``run_traced`` runs a program under ``strace -f -y`` and parses the calls that publish files;
the checks then say, for one file, whether everything a power cut could undo was made durable
before the program reported success:

* ``publish_problems``: a file published by rename needs write → fsync(file) → rename(tmp, final)
  → fsync(final's directory), each step ending before the next starts, and every directory the
  program created on the way to it fsync'd in its parent after the mkdir;
* ``sqlite_problems``: an SQLite database needs every write to it, its WAL or its rollback journal
  followed by an fsync of that file; a directory fsync after the database or its WAL was created
  (if it still exists); and, in rollback-journal mode, a directory fsync after the journal's
  unlink, which is the commit (SQLite's synchronous=FULL does not do that one; EXTRA would).

A problem is one line naming the file and the missing step.  Tests: tests/test_durability.py.
"""
from __future__ import annotations

import dataclasses
import os
import re
import subprocess
from collections.abc import Callable, Iterable
from pathlib import Path

SYSCALLS = ("open", "openat", "creat", "write", "pwrite64", "writev", "pwritev", "pwritev2", "fsync",
            "fdatasync", "rename", "renameat", "renameat2", "mkdir", "mkdirat", "unlink", "unlinkat")
WRITES = {"write", "pwrite64", "writev", "pwritev", "pwritev2"}
SYNCS = {"fsync", "fdatasync"}

_LINE = re.compile(r"(\d+)\s+(.*)")
_CALL = re.compile(r"(\w+)\((.*)\)\s+=\s+(-?\d+|\?)(?:<([^>]*)>)?(.*)$")
_FD = re.compile(r"(?:-?\d+|AT_FDCWD)<([^>]*)>")
_STRING = re.compile(r'"((?:[^"\\]|\\.)*)"')


@dataclasses.dataclass(frozen=True)
class Call:
    start: int                 # line of the trace where the call began
    end: int                   # line where it returned (the same line unless it was interrupted)
    name: str
    ok: bool                   # returned a non-negative value
    fd_path: str | None        # the file its first fd argument names (write, fsync, …)
    paths: tuple[str, ...]     # its path arguments, made absolute (open, rename, mkdir, unlink)
    created: bool              # open with O_CREAT
    data: str                  # the start of the data written (on stdout: the success report)
    line: str


def run_traced(argv: list[str], out: Path, *, env: dict[str, str] | None = None,
               timeout: float = 120) -> tuple[subprocess.CompletedProcess, list[Call]]:
    """Run ``argv`` under strace, all threads and children; return its result and its calls."""
    cmd = ["strace", "-f", "-y", "-qq", "--seccomp-bpf", "-s", "48", "-o", str(out),
           "-e", "trace=" + ",".join(SYSCALLS), *argv]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    return result, parse(out.read_text(errors="replace"))


def parse(text: str) -> list[Call]:
    """The calls of an ``strace -f -y -o`` trace; an interrupted call is joined with its resumption."""
    calls, pending = [], {}
    for i, raw in enumerate(text.splitlines()):
        m = _LINE.fullmatch(raw)
        if not m:
            continue
        pid, rest = m.groups()
        if rest.startswith("<... "):
            if pid not in pending:
                continue
            start, head = pending.pop(pid)
            rest = head + rest.split("resumed>", 1)[1]
        elif rest.endswith("<unfinished ...>"):
            pending[pid] = (i, rest[:-len("<unfinished ...>")].rstrip())
            continue
        else:
            start = i
        call = _parse_call(start, i, rest)
        if call is not None:
            calls.append(call)
    calls.sort(key=lambda c: c.end)
    return calls


def _unescape(s: str) -> str:
    return s.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _parse_call(start: int, end: int, text: str) -> Call | None:
    m = _CALL.match(text)
    if not m:
        return None
    name, args, ret, ret_path, _ = m.groups()
    fds = _FD.findall(args)
    strings = [_unescape(s) for s in _STRING.findall(args)]
    paths: list[str] = []
    if name in ("open", "creat", "rename", "mkdir", "unlink"):
        paths = [os.path.normpath(s) for s in strings]
    elif name in ("openat", "mkdirat", "unlinkat"):
        paths = [os.path.normpath(os.path.join(fds[0], strings[0]))] if fds and strings else []
    elif name in ("renameat", "renameat2"):
        paths = [os.path.normpath(os.path.join(d, s)) for d, s in zip(fds, strings)]
    if name in ("open", "openat") and ret_path:
        paths = [ret_path]   # what the descriptor really names (symlinks resolved)
    ok = ret != "?" and int(ret) >= 0
    created = name == "creat" or (name in ("open", "openat") and "O_CREAT" in args)
    fd_path = fds[0] if fds and name in WRITES | SYNCS else None
    data = strings[0] if name in WRITES and strings else ""
    return Call(start, end, name, ok, fd_path, tuple(paths), created, data, text)


def stdout_marker(calls: list[Call], text: str) -> int:
    """Where the program said ``text`` on its stdout: the moment it reported success."""
    for c in calls:
        if c.name in WRITES and c.ok and c.line.startswith(f"{c.name}(1<") and text in c.data:
            return c.start
    raise AssertionError(f"the program never wrote {text!r} to its stdout")


def _synced(calls: list[Call], path: str, after: int, before: int) -> bool:
    return any(c.name in SYNCS and c.ok and c.fd_path == path and c.start > after and c.end < before
               for c in calls)


def _last(calls: Iterable[Call], before: int) -> Call | None:
    found = None
    for c in calls:
        if c.end < before:
            found = c
    return found


def publish_problems(calls: list[Call], final: Path, success: int) -> list[str]:
    """Why ``final`` might not survive a power cut that follows the success report ([] if it would)."""
    final_s = os.path.normpath(final)
    problems: list[str] = []
    rename = _last((c for c in calls if c.name.startswith("rename") and c.ok and c.paths[-1:] == (final_s,)),
                   success)
    if rename is None:
        return [f"{final}: never renamed into place before success (not published by rename)"]
    parent = os.path.dirname(final_s)
    if not _synced(calls, parent, rename.end, success):
        problems.append(f"{final}: missing step fsync({parent}) after rename({rename.paths[0]} -> {final_s})")
    problems += _content_problems(calls, final, rename.paths[0], rename.start)
    problems += _new_dir_problems(calls, final, success)
    return problems


def _content_problems(calls: list[Call], final: Path, name: str, before: int) -> list[str]:
    """The bytes that reached ``name`` before ``before`` were fsync'd under that name, or under the
    name it had when written (a chain of renames)."""
    came_from = _last((c for c in calls if c.name.startswith("rename") and c.ok and c.paths[-1:] == (name,)),
                      before)
    since = came_from.end if came_from else -1
    writes = [c for c in calls if c.name in WRITES and c.ok and c.fd_path == name and since < c.start < before]
    if writes:
        if not _synced(calls, name, writes[-1].end, before):
            return [f"{final}: missing step fsync({name}) between its last write and the rename"]
        return []
    if came_from is not None:
        return _content_problems(calls, final, came_from.paths[0], came_from.start)
    return [f"{final}: no write to {name} found before it was renamed (nothing to make durable?)"]


def _new_dir_problems(calls: list[Call], final: Path, success: int) -> list[str]:
    problems = []
    for d in Path(os.path.normpath(final)).parents:
        made = _last((c for c in calls if c.name in ("mkdir", "mkdirat") and c.ok and c.paths == (str(d),)), success)
        if made is not None and not _synced(calls, str(d.parent), made.end, success):
            problems.append(f"{final}: missing step fsync({d.parent}) after mkdir({d}) (the new directory's "
                            "entry can vanish, and the file with it)")
    return problems


def sqlite_problems(calls: list[Call], db: Path, success: int, existed: Iterable[Path] = ()) -> list[str]:
    """Why a transaction SQLite committed on ``db`` before ``success`` might not survive a power cut.

    ``existed``: files of the database that were there before the program ran."""
    db_s = os.path.normpath(db)
    parent = os.path.dirname(db_s)
    files = {db_s, db_s + "-wal", db_s + "-journal"}
    exists = {os.path.normpath(p) for p in existed} & files
    created_at: dict[str, int] = {}
    problems: list[str] = []
    for c in calls:
        if c.end >= success or not c.ok:
            continue
        if c.name in ("open", "openat", "creat") and c.created and c.paths and c.paths[0] in files:
            if c.paths[0] not in exists:
                exists.add(c.paths[0])
                created_at[c.paths[0]] = c.end
        elif c.name in ("unlink", "unlinkat") and c.paths and c.paths[0] in files:
            exists.discard(c.paths[0])
            created_at.pop(c.paths[0], None)
            if c.paths[0] == db_s + "-journal" and not _synced(calls, parent, c.end, success):
                problems.append(f"{db}: missing step fsync({parent}) after the unlink of its rollback journal "
                                "(the commit; the journal can come back and roll it back)")
        elif c.name in WRITES and c.fd_path in files and not _synced(calls, c.fd_path, c.end, success):
            problems.append(f"{db}: missing step fsync({c.fd_path}) after a write to it")
    for path, when in created_at.items():
        if not _synced(calls, parent, when, success):
            problems.append(f"{db}: missing step fsync({parent}) after {os.path.basename(path)} was created")
    problems += _new_dir_problems(calls, db, success)
    return sorted(set(problems), key=problems.index)


def without(calls: list[Call], drop: Callable[[Call], bool]) -> list[Call]:
    """The trace with the calls ``drop`` selects removed: a negative control for the checks."""
    return [c for c in calls if not drop(c)]
