"""`xen-vtpm demo` as a smoke test of the whole product on a simulated host.

Test names are short on purpose: the host's Unix sockets live under tmp_path.

The demo starts its host under $TMPDIR; pointing TMPDIR at tmp_path lets the
tests prove that no process of that host survives (every simulated process
carries the owner marker of its host directory in its environment).

What the demo claims (the rollback brings PCR 16, the NV counter and the guest's memory back to
the snapshot; the corrupted checkpoint is refused) is checked from outside, not from its own
"[ok]" lines: the demo runs through the test hook (tests/faulty_tool.py), which at chosen steps
runs tests/demo_probe.py to read the vTPM with tpm2-tools and the guest's memory file directly,
and traces every point the tool passes.  The PCR values are computed here from the
labels the demo extends with (the TPM's extend rule), not taken from the demo.

Two full runs (text, --json); -q is run up to a SIGINT the hook sends at a fixed step, so it is
proved silent on the way and on the interrupt path without a third full run.
"""
from __future__ import annotations

import hashlib
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

from crash_helpers import faulty_argv, hook_log

from xen_vtpm_sim.demo import GUEST, HVM_GUEST, NV_COUNTER, PCR
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


def _run(tmp_path: Path, *args: str, hook: list[str] | None = None) -> subprocess.CompletedProcess:
    tool = hook or [sys.executable, "-m", "xen_vtpm"]
    return subprocess.run([*tool, *args, "demo"], env=_demo_env(tmp_path), capture_output=True, text=True,
                          timeout=180)


def _extend(pcr: bytes, label: str) -> bytes:
    """TPM2_PCR_Extend with SHA-256: new = H(old || H(data)); the demo extends with H(label)."""
    return hashlib.sha256(pcr + hashlib.sha256(label.encode()).digest()).digest()


# PCR 16 of a fresh vTPM is zero; the demo extends it once before the snapshot and once after.
AT_SNAPSHOT = _extend(bytes(32), "demo: measured at boot").hex()
CHANGED = _extend(bytes.fromhex(AT_SNAPSHOT), "demo: changed after the snapshot").hex()
# The same story on the swtpm backend's guest.
HVM_AT_SNAPSHOT = _extend(bytes(32), "demo: hvm1 measured at boot").hex()
HVM_CHANGED = _extend(bytes.fromhex(HVM_AT_SNAPSHOT), "demo: hvm1 changed after the snapshot").hex()


PROBES = {   # point -> what to read there
    "snapshot:guest-save": "tpm",              # the guest runs, its vTPM as the snapshot will take it
    "snapshot:manager-checkpoint": "memory",   # the guest is suspended: its memory as saved
    "pre-rollback:guest-save": "tpm",          # the changed state the rollback leaves
    "rollback:unpause-guest": "tpm+memory",    # restored, still paused: nothing has run since
}


def _probed(log: Path) -> tuple[list[tuple[str, dict]], list[str]]:
    """(point, reading) of every probe in order, and every point the tool passed."""
    readings, passed = [], []
    for line in hook_log(log):
        word, point, rest = (line.split(" ", 2) + [""])[:3]
        passed.append(point)
        if word == "reached":
            code, _, err = rest.removeprefix("fault-exit ").partition(" ")
            assert code == "0", f"probe at {point} failed: {err}"
            readings.append((point, json.loads(err.strip("'"))))
    return readings, passed


def test_demo_json(tmp_path):
    """The summary is the only output, and what the demo claims holds when read from outside."""
    log = tmp_path.parent / f"{tmp_path.name}.hook.log"
    probe = [sys.executable, str(Path(__file__).resolve().with_name("demo_probe.py")), str(tmp_path)]
    hook = faulty_argv(faults=[(p, shlex.join([*probe, what, GUEST, str(PCR), NV_COUNTER]))
                               for p, what in PROBES.items()], log=log, trace=True)
    proc = _run(tmp_path, "--json", hook=hook)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    summary = json.loads(proc.stdout)   # nothing but the summary on stdout
    assert summary["ok"] is True
    readings, passed = _probed(log)
    points = [p for p, _ in readings]
    one_rollback = ["snapshot:guest-save", "snapshot:manager-checkpoint", "pre-rollback:guest-save",
                    "rollback:unpause-guest"]
    # guest1's rollback, its second snapshot, then the swtpm guest's snapshot and rollback (the probes
    # still read guest1 there: the other guest's rollback must leave guest1's vTPM alone).
    assert points == [*one_rollback, "snapshot:guest-save", "snapshot:manager-checkpoint", *one_rollback], points
    snap_tpm, snap_mem, changed, rolled_back, second_tpm, _, *during_hvm = (r for _, r in readings)
    assert [(r["pcr"], r["nv"]) for r in during_hvm if "nv" in r] == [(AT_SNAPSHOT, 1)] * 3, during_hvm
    assert snap_tpm == {"pcr": AT_SNAPSHOT, "nv": 1}, snap_tpm
    assert changed == {"pcr": CHANGED, "nv": 2}, changed
    assert rolled_back == {"pcr": AT_SNAPSHOT, "nv": 1, "memory": snap_mem["memory"]}, \
        "the rollback did not bring PCR 16, the NV counter and the memory back to the snapshot"
    assert second_tpm == {"pcr": AT_SNAPSHOT, "nv": 1}, second_tpm
    # The rollback to the corrupted checkpoint never began: after the second snapshot the tool
    # passed no rollback step and took no safety snapshot.
    second = [i for i, p in enumerate(passed) if p == "snapshot:manager-checkpoint"][1]
    hvm_snapshot = [i for i, p in enumerate(passed) if p == "snapshot:begin"][2]
    after_second = passed[second + 1:hvm_snapshot]
    assert not [p for p in after_second if p.startswith(("rollback:", "pre-rollback:"))], after_second
    assert passed.count("rollback:destroy-guest") == 2
    # The summary agrees with the outside view.
    assert summary["pcr16"] == {"snapshot": AT_SNAPSHOT, "changed": CHANGED, "after_rollback": AT_SNAPSHOT}
    assert summary["nv_counter"] == {"snapshot": 1, "changed": 2, "after_rollback": 1}
    hvm = summary["swtpm"]
    assert hvm["snapshot"] == hvm["after_rollback"] == {"pcr16": HVM_AT_SNAPSHOT, "counter": 1}, hvm
    assert hvm["changed"] == {"pcr16": HVM_CHANGED, "counter": 2}, hvm
    assert {(c["domain"], c["backend"]) for c in summary["checkpoints"]} == {(GUEST, "stubdom")}
    assert {r["action"] for r in summary["audit"]} >= {"init", "snapshot", "pre-rollback", "rollback"}
    refused = [r for r in summary["audit"] if r["result"].startswith("refused")]
    assert [r["action"] for r in refused] == ["verify", "rollback"], refused
    assert _left_behind(tmp_path) == []
    assert list(tmp_path.iterdir()) == [], "the demo's temporary directory was not removed"


def test_demo_text(tmp_path):
    """The narration: each step, the commands as a user would type them, the checks and the summary."""
    proc = _run(tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    for line in ("== 1/9 start a throwaway simulated Xen host",
                 "$ tpm2_pcrextend -T swtpm:",
                 "$ tpm2_nvincrement -T swtpm:",
                 "$ xen-vtpm snapshot guest1 --name before-change",
                 "$ xen-vtpm rollback guest1 before-change --yes",
                 f"now: PCR 16 = {AT_SNAPSHOT[:16]}…  NV counter = 1",
                 f"changed: PCR 16 = {CHANGED[:16]}…  NV counter = 2",
                 f"after rollback: PCR 16 = {AT_SNAPSHOT[:16]}…  NV counter = 1",
                 "$ xen-vtpm verify second",
                 "refused: exit 5",
                 f"$ xen-vtpm sim create {HVM_GUEST} --vtpm swtpm",
                 f"$ xen-vtpm rollback {HVM_GUEST} hvm-before --yes",
                 "== stopped the simulated host",
                 "== demo passed: 15/15 checks held"):
        assert line in out, f"missing {line!r} in:\n{out}"
    assert "FAILED" not in out
    # The audit table lists the snapshot, the safety checkpoint and the rollback.
    for action in ("snapshot", "pre-rollback", "rollback"):
        assert f" {action} " in out
    assert _left_behind(tmp_path) == []
    assert list(tmp_path.iterdir()) == [], "the demo's temporary directory was not removed"


def test_demo_sigint(tmp_path):
    """-q prints nothing, and Ctrl-C (sent by the hook in the middle of the first snapshot, when guest,
    vTPM and daemons are all up) still takes the whole host down: exit 130, one line on stderr."""
    sent = tmp_path.parent / f"{tmp_path.name}.sigint"
    # The command notes it ran before it signals its parent, the demo (the interrupt may cut the hook
    # short of writing its own log line).
    interrupt = shlex.join(["sh", "-c", f"echo sent >> {shlex.quote(str(sent))}; kill -INT $PPID"])
    proc = _run(tmp_path, "-q", hook=faulty_argv(faults=[("snapshot:guest-save", interrupt)]))
    assert sent.exists() and sent.read_text() == "sent\n", f"the interrupt was never sent: {proc.stderr}"
    assert proc.returncode == 128 + signal.SIGINT, proc.stderr
    assert proc.stdout == ""
    # The interrupted snapshot and the demo each say so; nothing else is printed.
    (line,) = set(proc.stderr.splitlines())
    assert line.startswith("xen-vtpm: interrupted;") and "xen-vtpm recover" in line, proc.stderr
    assert _left_behind(tmp_path) == []
    assert list(tmp_path.iterdir()) == []


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
