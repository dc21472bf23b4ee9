"""Issue 18 items 3, 4, 6 and 7: hostile or careless input is refused before anything changes.

* item 3: `save` never writes into the state dir (also through a symlink) and never replaces an
  existing file without `--force`;
* item 4: lock files and the `locks` directory are never followed through a symlink, and a state dir
  another user owns or may enter is refused;
* item 6: checkpoint names follow a grammar (printable, bounded, not UUID-shaped) and anything the tool
  prints that came from outside (a catalog row, an argument) is escaped;
* item 7: `--auth-file` refuses an empty secret and an oversized or endless one (`/dev/zero`) before
  the TPM is asked: no dictionary-attack try is spent.

Every refusal: one stderr line, its exit code, and the catalog, the head, the domains and the victim
file exactly as before.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import sqlite3
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2e_helpers import GUEST, E2EHost, assert_one_line_error, e2e_host

from xen_vtpm.config import Config

SECRET = "correct horse battery staple\n"


@pytest.fixture(scope="module")
def host(tmp_path_factory) -> Iterator[tuple[E2EHost, Path]]:
    base = tmp_path_factory.mktemp("input-sec")
    auth = base / "rollback.secret"
    auth.write_text(SECRET)
    with e2e_host(base, auth_file=auth) as h:
        h.snapshot("base")
        yield h, auth


def run(h: E2EHost, *argv: str, timeout: float = 120, prefix: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    return subprocess.run([*prefix, sys.executable, "-m", "xen_vtpm", *argv], env=h.env, capture_output=True,
                          text=True, timeout=timeout)


def refused(h: E2EHost, code: int, *argv: str, **kw) -> str:
    proc = run(h, *argv, **kw)
    assert proc.returncode == code, f"{argv}: exit {proc.returncode}, expected {code}: {proc.stderr}"
    return assert_one_line_error(proc)


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def unchanged_state(h: E2EHost) -> dict[str, object]:
    """The state dir's files (not the lock files' contents: a refused command may take a lock) and the domains."""
    files = {str(p.relative_to(h.state_dir)): _digest(p) for p in sorted(h.state_dir.rglob("*"))
             if p.is_file() and not p.is_symlink() and p.parent.name != "locks"
             and not p.name.endswith(("-wal", "-shm"))}
    with contextlib.closing(sqlite3.connect(h.catalog)) as db:
        rows = {t: db.execute(f"SELECT * FROM {t}").fetchall() for t in ("head", "audit", "checkpoints", "op_journal")}
    domains = [tuple(r.split()[:2]) for r in h.xl("list").stdout.splitlines()[1:]]
    return {"files": files, "rows": rows, "domains": domains, "paused": h.is_paused()}


# --- item 3: save FILE ---------------------------------------------------------------------------

def test_save_into_the_state_dir_is_refused(host, tmp_path):
    h, _ = host
    link = tmp_path / "innocent.save"
    link.symlink_to(h.catalog)                           # a file name that resolves into the state dir
    dirlink = tmp_path / "somewhere"
    dirlink.symlink_to(h.state_dir)
    before = unchanged_state(h)
    for target in (h.catalog, link, dirlink / "new.save", h.state_dir / "packs" / "x.save", h.state_dir):
        line = refused(h, 2, "save", GUEST, str(target))
        assert "state dir" in line, line
        assert unchanged_state(h) == before, f"save {target} changed something"
    h.tool("audit", "--verify")
    h.tool("verify", "--all")


def test_save_never_replaces_an_existing_file_without_force(host, tmp_path):
    h, auth = host
    victim = tmp_path / "precious.img"
    victim.write_bytes(b"someone's data\n")
    before = unchanged_state(h)
    line = refused(h, 2, "save", GUEST, str(victim))
    assert "exists" in line and "--force" in line, line
    assert victim.read_bytes() == b"someone's data\n"
    assert unchanged_state(h) == before
    # --force replaces it (a plain xl save image, restorable), as `xl save` users expect when they ask.
    h.tool("save", GUEST, str(victim), "--force")
    assert victim.read_bytes()[:8] != b"someone'"
    h.tool("restore", str(victim))
    assert not h.is_paused()


# --- item 4: lock files and the state dir --------------------------------------------------------

def vm_uuid(h: E2EHost) -> str:
    with contextlib.closing(sqlite3.connect(h.catalog)) as db:
        return db.execute("SELECT vm_uuid FROM checkpoints WHERE name = 'base'").fetchone()[0]


@pytest.mark.parametrize("which", ["vm lock", "host lock", "locks dir"])
def test_lock_symlink_is_not_followed(host, tmp_path, which):
    h, _ = host
    victim = tmp_path / "victim"
    victim.write_text("root-owned config\n")
    locks = h.state_dir / "locks"
    if which == "locks dir":
        aside = locks.with_name("locks.aside")
        locks.rename(aside)
        elsewhere = tmp_path / "elsewhere"
        elsewhere.mkdir(mode=0o700)
        locks.symlink_to(elsewhere)
        planted = [locks]
    else:
        lock = locks / (f"{vm_uuid(h)}.lock" if which == "vm lock" else "host.lock")
        lock.unlink(missing_ok=True)
        lock.symlink_to(victim)
        planted = [lock]
    try:
        before = unchanged_state(h)
        line = refused(h, 10, "snapshot", GUEST, "--name", "through-link")
        assert "symbolic link" in line or "symlink" in line, line
        assert victim.read_text() == "root-owned config\n", "the lock write followed the symlink"
        if which == "locks dir":
            assert list(elsewhere.iterdir()) == [], "a lock file was created through the symlinked directory"
        assert unchanged_state(h) == before
    finally:
        for p in planted:
            p.unlink()
        if which == "locks dir":
            aside.rename(locks)
    h.snapshot("after-lock-test")
    h.tool("delete", "after-lock-test")


@pytest.mark.parametrize("change", ["other owner", "group-writable"])
def test_state_dir_owner_and_mode_checked_at_start(host, change):
    h, _ = host
    st = h.state_dir.stat()
    before = unchanged_state(h)
    if change == "other owner":
        os.chown(h.state_dir, 65534, st.st_gid)
    else:
        os.chmod(h.state_dir, 0o770)
    try:
        for argv in (["snapshot", GUEST, "--name", "bad-dir"], ["audit", "--verify"], ["checkpoints"]):
            line = refused(h, 10, *argv)
            assert str(h.state_dir) in line, line
    finally:
        os.chown(h.state_dir, st.st_uid, st.st_gid)
        os.chmod(h.state_dir, 0o700)
    assert unchanged_state(h) == before


# --- item 6: checkpoint names ------------------------------------------------------------------

BAD_NAMES = {
    "path": "../../etc/x",
    "slash": "a/b",
    "long": "n" * 5000,
    "space": " ",
    "empty": "",
    "escape": "ok\x1b[2J\x1b[31mFORGED",
    "newline": "a\nb  guest1  snapshot",
    "control": "tab\there",
    "uuid": str(uuid.uuid4()),
    "UUID": str(uuid.uuid4()).upper(),
}


def test_bad_names_refused(host):
    h, _ = host
    other = h.tool_json("checkpoints", GUEST)[0]["id"]          # another checkpoint's id as a name
    before = unchanged_state(h)
    for label, name in {**BAD_NAMES, "an existing id": other}.items():
        line = refused(h, 2, "snapshot", GUEST, "--name", name)
        assert "name" in line, f"{label}: {line}"
        assert "\x1b" not in line and len(line) < 400, f"{label}: the error echoes the raw name: {line!r}"
        assert unchanged_state(h) == before, f"{label}: something changed"


def test_good_names_accepted(host):
    h, _ = host
    for name in ("pre-upgrade_2024.05", "a", "N" * 64, "db1+web@v2:final"):
        h.snapshot(name)
        h.tool("delete", name)
    refused(h, 2, "snapshot", GUEST, "--name", "N" * 65)


def test_outside_text_is_escaped_when_printed(host):
    """A catalog row edited to carry terminal escapes and a newline (as an older version could have
    stored, or an attacker writes): `checkpoints` shows it escaped on one line, and an error naming a
    checkpoint given on the command line does not pass escapes through either."""
    h, _ = host
    forged = "x\x1b[2J\x1b[1;1Hguest1 ok\nrow"
    with contextlib.closing(sqlite3.connect(h.catalog)) as db:
        db.execute("UPDATE checkpoints SET name = ? WHERE name = 'base'", (forged,))
        db.commit()
    try:
        out = h.tool("checkpoints").stdout
        assert "\x1b" not in out and "\\x1b[2J" in out, out
        lines = out.splitlines()
        assert len(lines) == 1 + len(h.tool_json("checkpoints")), f"a row spans several lines:\n{out}"
        line = refused(h, 2, "delete", "y\x1b]0;owned\x07z")
        assert "\x1b" not in line and "\x07" not in line, repr(line)
    finally:
        with contextlib.closing(sqlite3.connect(h.catalog)) as db:
            db.execute("UPDATE checkpoints SET name = 'base' WHERE name = ?", (forged,))
            db.commit()
    h.tool("verify", "--all")


# --- item 7: --auth-file -------------------------------------------------------------------------

def lockout_failures(h: E2EHost) -> int:
    tcti = Config.load(h.env["XEN_VTPM_CONFIG"]).tcti
    out = subprocess.run(["tpm2_getcap", "-T", tcti, "properties-variable"], capture_output=True, text=True,
                         check=True, timeout=30).stdout
    m = re.search(r"TPM2_PT_LOCKOUT_COUNTER:\s*(0x[0-9a-fA-F]+|\d+)", out)
    assert m, out
    return int(m.group(1), 0)


# The tool runs with a 1 GiB address-space limit: a reader without a bound dies of MemoryError
# (exit 1) on /dev/zero instead of exhausting the machine.
LIMITED = ("prlimit", f"--as={1 << 30}")


@pytest.mark.parametrize("kind", ["empty", "newline only", "dev zero", "too big"])
def test_bad_auth_file_refused_before_the_tpm(host, tmp_path, kind):
    h, _ = host
    path = {"empty": tmp_path / "empty", "newline only": tmp_path / "nl", "dev zero": Path("/dev/zero"),
            "too big": tmp_path / "big"}[kind]
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "newline only":
        path.write_bytes(b"\n")
    elif kind == "too big":
        path.write_bytes(b"s" * (1 << 20))
    failures = lockout_failures(h)
    before = unchanged_state(h)
    t0 = time.monotonic()
    line = refused(h, 2, "rollback", GUEST, "base", "--yes", "--no-safety-checkpoint", "--auth-file", str(path),
                   timeout=60, prefix=LIMITED)
    assert time.monotonic() - t0 < 30
    assert str(path) in line, line
    assert lockout_failures(h) == failures, "a dictionary-attack try was spent"
    assert unchanged_state(h) == before
    init_line = refused(h, 2, "init", "--rollback-auth-file", str(path), timeout=60, prefix=LIMITED)
    assert str(path) in init_line, init_line
    assert unchanged_state(h) == before


def test_good_auth_file_still_authorizes(host):
    h, auth = host
    h.snapshot("auth-ok")
    h.tool("rollback", GUEST, "auth-ok", "--yes", "--no-safety-checkpoint", "--auth-file", str(auth))
    h.tool("delete", "auth-ok")
