"""Scheduled checkpoints: the systemd units `xen-vtpm schedule install` writes, checked by systemd's own
`systemd-analyze verify` and enabled by the real `systemctl --root`; the service's command line, read
from the installed unit, run on the simulated host with a systemd-like environment (systemd itself
need not run); a failed run visible in its exit status, its one stderr line (the journal's) and the
audit log.
"""
from __future__ import annotations

import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from e2e_helpers import GUEST, assert_one_line_error
from sim_fixture import initialised_host

from xen_vtpm import schedule
from xen_vtpm.config import Config

UNITS = Path("etc/systemd/system")
TIMER = f"xen-vtpm-snapshot@{GUEST}.timer"
SERVICE = f"xen-vtpm-snapshot@{GUEST}.service"
# What systemd gives a system service: no XEN_VTPM_CONFIG, no venv on PATH (systemd.exec(5)).
SYSTEMD_ENV = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C.UTF-8"}
DAY_TWO = """
[schedule]
on_calendar = *-*-* 03:15:00
[schedule.guest1]
on_calendar = hourly
[retention]
keep_daily = 7
[retention.guest1]
keep_last = 1
"""


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    with initialised_host(tmp_path_factory.mktemp("sched") / "h", GUEST) as sim:
        yield sim


@pytest.fixture(scope="module")
def config(sim, tmp_path_factory) -> Path:
    """The sim's config with the day-two sections (init kept every key of it, so a copy works)."""
    path = tmp_path_factory.mktemp("conf") / "xen-vtpm.conf"
    path.write_text(sim.config.read_text() + DAY_TWO)
    return path


def tool(sim, config: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    return sim.run([sys.executable, "-m", "xen_vtpm", "--config", str(config), *args], check=check)


def verify_units(root: Path, *units: str) -> subprocess.CompletedProcess:
    analyze = shutil.which("systemd-analyze")
    assert analyze, "systemd-analyze is missing: `make setup` installs Debian's systemd package"
    return subprocess.run([analyze, "verify", *(str(root / UNITS / u) for u in units)],
                          capture_output=True, text=True, timeout=60)


def exec_start(root: Path, guest: str) -> list[str]:
    """The service's ExecStart=, as systemd would run it for instance `guest` (%i, then %% -> %)."""
    lines = [ln for ln in (root / UNITS / "xen-vtpm-snapshot@.service").read_text().splitlines()
             if ln.startswith("ExecStart=")]
    assert len(lines) == 1, lines
    return [word.replace("%i", guest).replace("%%", "%") for word in shlex.split(lines[0][len("ExecStart="):])]


def checkpoint_names(sim, config) -> list[str]:
    return [c["name"] for c in json.loads(tool(sim, config, "--json", "checkpoints", GUEST).stdout)]


def test_install_writes_units_systemd_accepts_and_enables_the_timer(sim, config, tmp_path):
    root = tmp_path / "root"
    out = json.loads(tool(sim, config, "--json", "schedule", "install", GUEST, "--root", str(root)).stdout)
    assert out["unit"] == TIMER and out["on_calendar"] == "hourly" and out["started"] is False
    units = root / UNITS
    assert (units / "timers.target.wants" / TIMER).is_symlink(), "systemctl did not enable the timer"
    assert (units / f"{TIMER}.d" / "schedule.conf").read_text() == "[Timer]\nOnCalendar=\nOnCalendar=hourly\n"
    proc = verify_units(root, TIMER, SERVICE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    service = (units / "xen-vtpm-snapshot@.service").read_text()
    assert "@COMMAND@" not in service and f"--config {config}" in service
    assert "SyslogIdentifier=xen-vtpm-snapshot" in service and "Type=oneshot" in service

    (row,) = json.loads(tool(sim, config, "--json", "schedule", "list", "--root", str(root)).stdout)
    assert row == {"guest": GUEST, "on_calendar": "hourly", "enabled": True, "last_run": None, "unit": TIMER}

    tool(sim, config, "schedule", "remove", GUEST, "--root", str(root))
    assert json.loads(tool(sim, config, "--json", "schedule", "list", "--root", str(root)).stdout) == []
    assert not any(p for p in units.rglob("*") if "xen-vtpm" in p.name), sorted(units.rglob("*"))


def test_verify_catches_a_broken_unit(sim, config, tmp_path):
    """The check above can fail: the same units with a calendar systemd cannot parse are refused."""
    root = tmp_path / "root"
    tool(sim, config, "schedule", "install", GUEST, "--root", str(root))
    (root / UNITS / f"{TIMER}.d" / "schedule.conf").write_text("[Timer]\nOnCalendar=\nOnCalendar=when-ever\n")
    proc = verify_units(root, TIMER)
    assert proc.returncode != 0 and "when-ever" in proc.stderr


@pytest.mark.parametrize("sections,words", [
    ("[schedule.guest1]\non_calendar = every tuesday-ish\n[retention]\nkeep_last = 1\n",
     "is not a systemd calendar expression"),
    ("[schedule]\nprune = yes\n", "no keep_* rule"),
    ("[schedule.guest1]\nprun = yes\n", "unknown key 'prun' in [schedule.guest1]"),
])
def test_install_refuses_a_schedule_that_cannot_work(sim, tmp_path, sections, words):
    bad = tmp_path / "bad.conf"
    bad.write_text(sim.config.read_text() + sections)
    root = tmp_path / "root"
    proc = tool(sim, bad, "schedule", "install", GUEST, "--root", str(root), check=False)
    assert proc.returncode == 2 and words in assert_one_line_error(proc)
    assert not root.exists() or not any(root.rglob("*xen-vtpm*")), "a refused install wrote units"


def test_the_service_command_line_snapshots_and_prunes_on_the_simulated_host(sim, config, tmp_path):
    root = tmp_path / "root"
    tool(sim, config, "schedule", "install", GUEST, "--root", str(root))
    argv = exec_start(root, GUEST)
    assert argv[-3:] == ["schedule", "run", GUEST]
    before = checkpoint_names(sim, config)
    for _ in range(2):
        proc = subprocess.run(argv, env=SYSTEMD_ENV, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
    names = checkpoint_names(sim, config)
    # keep_daily = 7 and guest1's keep_last = 1: both runs fall on one day, only the second run's stays
    assert len(names) == 1 and not set(names) & set(before), names
    runs = [r for r in json.loads(tool(sim, config, "--json", "audit").stdout) if r["action"] == "schedule"]
    assert [r["result"] for r in runs[-2:]] == ["ok"] * 2
    assert runs[-1]["checkpoint"] and runs[-1]["detail"] == f"snapshot {names[0]}, pruned 1"
    (row,) = json.loads(tool(sim, config, "--json", "schedule", "list", "--root", str(root)).stdout)
    assert row["last_run"].endswith(" ok")
    tool(sim, config, "audit", "--verify")


def test_a_failed_run_is_visible(sim, config, tmp_path):
    """A paused guest cannot be snapshotted: the run fails with exit 4, one stderr line for the journal,
    an audit record, and `schedule list` shows it; nothing is pruned."""
    root = tmp_path / "root"
    tool(sim, config, "schedule", "install", GUEST, "--root", str(root))
    before = checkpoint_names(sim, config)
    sim.xl("pause", GUEST)
    try:
        proc = subprocess.run(exec_start(root, GUEST), env=SYSTEMD_ENV, capture_output=True, text=True, timeout=120)
    finally:
        sim.xl("unpause", GUEST)
    assert proc.returncode == 4
    assert "paused" in assert_one_line_error(proc)
    assert checkpoint_names(sim, config) == before
    last = [r for r in json.loads(tool(sim, config, "--json", "audit").stdout) if r["action"] == "schedule"][-1]
    assert last["vm"] == GUEST and last["result"].startswith("failed (exit 4): ")
    (row,) = json.loads(tool(sim, config, "--json", "schedule", "list", "--root", str(root)).stdout)
    assert "failed (exit 4)" in row["last_run"]


def test_a_run_without_retention_rules_refuses_before_it_snapshots(sim, config, tmp_path):
    bare = tmp_path / "bare.conf"
    bare.write_text(sim.config.read_text())
    before = checkpoint_names(sim, config)
    proc = tool(sim, bare, "schedule", "run", GUEST, check=False)
    assert proc.returncode == 2 and "no keep_* rule" in assert_one_line_error(proc)
    assert checkpoint_names(sim, config) == before


def test_command_line_quotes_paths(tmp_path):
    odd = tmp_path / "a dir" / "50%.conf"
    odd.parent.mkdir()
    odd.write_text("[xen-vtpm]\n")
    words = shlex.split(schedule.command(Config.load(odd)))
    assert [w.replace("%%", "%") for w in words[-2:]] == ["--config", str(odd)]
