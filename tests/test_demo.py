"""`xen-vtpm demo` as a smoke test of the whole product on a simulated host.

Test names are short on purpose: the host's Unix sockets live under tmp_path.

The demo starts its host under $TMPDIR; pointing TMPDIR at tmp_path lets the
tests prove that no process of that host survives (every simulated process
carries the owner marker of its host directory in its environment).
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from xen_vtpm_sim.domains import OWNER_ENV


def _demo_env(tmp_path: Path) -> dict[str, str]:
    return dict(os.environ, TMPDIR=str(tmp_path), PYTHONUNBUFFERED="1")


def _left_behind(tmp_path: Path) -> list[int]:
    """Live processes whose simulated host lives under tmp_path."""
    marker = f"{OWNER_ENV}={os.path.realpath(tmp_path)}".encode()
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            env = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state != "Z" and any(e.startswith(marker) for e in env):
            pids.append(int(entry))
    return pids


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "xen_vtpm", *args, "demo"], env=_demo_env(tmp_path),
                          capture_output=True, text=True, timeout=180)


def test_demo_text(tmp_path):
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("== 1/8 start a throwaway simulated Xen host",
                 "$ tpm2_pcrextend -T swtpm:",
                 "$ tpm2_nvincrement -T swtpm:",
                 "$ xen-vtpm snapshot guest1 --name before-change",
                 "$ xen-vtpm rollback guest1 before-change --yes",
                 "[ok] PCR 16 back at its snapshot value",
                 "[ok] NV counter back at its snapshot value: 1 (snapshot 1, before rollback 2)",
                 "$ xen-vtpm verify second",
                 "[ok] verify of the corrupted checkpoint refused: exit 5",
                 "[ok] rollback to the corrupted checkpoint refused: exit 5",
                 "[ok] guest memory (SHA-256) unchanged",
                 "[ok] the untouched checkpoint still verifies: exit 0",
                 "[ok] audit chain verifies against the TPM counter: exit 0",
                 "[ok] simulated host stopped, no process left",
                 "== demo passed: 13/13 checks held"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "FAILED" not in out
    # The audit table lists the snapshot, the safety checkpoint and the rollback.
    for action in ("snapshot", "pre-rollback", "rollback"):
        assert f" {action} " in out
    assert _left_behind(tmp_path) == []
    assert list(tmp_path.iterdir()) == [], "the demo's temporary directory was not removed"


def test_demo_json(tmp_path):
    proc = _run(tmp_path, "--json")
    assert proc.returncode == 0, proc.stderr
    summary = json.loads(proc.stdout)   # nothing but the summary on stdout
    assert summary["ok"] is True
    assert summary["checks"] and all(c["ok"] for c in summary["checks"])
    assert summary["pcr16"]["after_rollback"] == summary["pcr16"]["snapshot"] != summary["pcr16"]["changed"]
    assert summary["nv_counter"] == {"snapshot": 1, "changed": 2, "after_rollback": 1}
    assert {r["action"] for r in summary["audit"]} >= {"init", "snapshot", "pre-rollback", "rollback"}
    assert _left_behind(tmp_path) == []

    quiet = _run(tmp_path, "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert quiet.stdout == "" and quiet.stderr == ""
    assert _left_behind(tmp_path) == []


def test_demo_sigint(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "xen_vtpm", "demo"], env=_demo_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stdout:
            seen.append(line)
            if line.startswith("== 4/8"):   # guest, vTPM and daemons are all up now
                break
        assert seen and seen[-1].startswith("== 4/8"), "".join(seen)
        assert _left_behind(tmp_path), "the host should be running at step 4"
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    assert "interrupted" in err
    assert "== stopped the simulated host" in rest
    assert _left_behind(tmp_path) == []


def test_demo_pipe_closed(tmp_path):
    """`xen-vtpm demo | head -3`: the reader goes away early; the host must still come down."""
    proc = subprocess.Popen([sys.executable, "-m", "xen_vtpm", "demo"], env=_demo_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        for _ in range(3):
            proc.stdout.readline()
        proc.stdout.close()
        proc.wait(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert _left_behind(tmp_path) == []
    assert list(tmp_path.iterdir()) == []
